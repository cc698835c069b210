"""blockfs.run() against a real kernel NBD driver: each test boots user-mode
Linux and runs one scenario from tests/guest/kernel_scenarios.py in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockfs.testing.uml import run_python_in_guest, uml_unavailable_reason

SCENARIOS = Path(__file__).parent / "guest" / "kernel_scenarios.py"

pytestmark = [
    pytest.mark.uml,
    pytest.mark.skipif(uml_unavailable_reason() is not None, reason=f"user-mode Linux: {uml_unavailable_reason()}"),
]


def run_scenario(name: str, timeout: float = 240) -> str:
    result = run_python_in_guest(script=SCENARIOS, args=[name], timeout=timeout, mem="768M")
    assert result.returncode == 0, f"scenario {name} failed:\n{result.output}\n--- console tail ---\n{result.console[-3000:]}"
    assert f"scenario {name}: passed" in result.output
    return result.output


def test_ext4_on_the_sparse_file_example() -> None:
    out = run_scenario("ext4")
    assert "files read back identical after remount" in out


def test_fio_random_writes_verify_crc32c() -> None:
    run_scenario("fio_verify")


def test_read_only_device() -> None:
    run_scenario("read_only")


def test_read_error_on_one_block_does_not_desync() -> None:
    run_scenario("bad_block")


def test_blkdiscard_reaches_trim_and_fsync_reaches_flush() -> None:
    run_scenario("trim_flush")


def test_unmount_from_on_mount_and_reuse() -> None:
    run_scenario("unmount_and_reuse")


def test_clear_errors() -> None:
    run_scenario("errors")


def test_sigterm_under_load_loses_nothing_acknowledged() -> None:
    run_scenario("sigterm_under_load")


def test_xor_mirror_survives_losing_a_file() -> None:
    run_scenario("xor_mirror")


def test_multi_queue_and_thread_pool_under_fio_verify() -> None:
    run_scenario("multi_queue")
