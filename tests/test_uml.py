"""The user-mode Linux kit itself (blockfs.testing.uml), against a real UML kernel."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import blockfs
from blockfs.testing import uml

UNAVAILABLE = uml.uml_unavailable_reason()

pytestmark = [
    pytest.mark.uml,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=f"user-mode Linux unavailable: {UNAVAILABLE}"),
]


def repo_root() -> Path:
    # blockfs.__file__ is None while blockfs is a namespace package (no
    # __init__.py); __path__ works either way.
    return Path(list(blockfs.__path__)[0]).resolve().parent


def test_guest_has_nbd_devices_and_module() -> None:
    script = (
        "for i in 0 1 2; do if [ -b /dev/nbd$i ]; then echo nbd$i=block; else echo nbd$i=none; fi; done; "
        "while read -r name _; do [ $name = nbd ] && echo module=nbd; done < /proc/modules; "
        "read -r n < /sys/module/nbd/parameters/nbds_max; echo nbds_max=$n; "
        "read -r s < /sys/block/nbd0/size; echo size=$s"
    )
    result = uml.run_in_guest(["sh", "-c", script], nbds_max=2, timeout=120)
    assert result.returncode == 0, result.console
    assert result.output.split() == [
        "nbd0=block",
        "nbd1=block",
        "nbd2=none",
        "module=nbd",
        "nbds_max=2",
        "size=0",
    ]
    assert "blockfs-uml: command exited with status 0" in result.console


def test_exit_status_output_env_and_cwd_come_back(tmp_path: Path) -> None:
    script = (
        "echo to-stdout; echo to-stderr >&2; printf '<%s>\\n' \"$@\"; "
        'echo "FOO=$FOO"; pwd; echo from-guest > written-by-guest; exit 7'
    )
    odd_args = ["a b", "it's", "x\ny", "$HOME", ""]
    result = uml.run_in_guest(
        ["sh", "-c", script, "sh", *odd_args],
        env={"FOO": "foo 'bar'"},
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 7
    assert result.output == (
        "to-stdout\nto-stderr\n<a b>\n<it's>\n<x\ny>\n<$HOME>\n<>\n"
        f"FOO=foo 'bar'\n{tmp_path}\n"
    )
    # The guest's root is the host's: files it writes outside /run show up here.
    assert (tmp_path / "written-by-guest").read_text() == "from-guest\n"
    with pytest.raises(uml.UmlError, match="exited with status 7"):
        result.check_returncode()


def test_missing_command_fails() -> None:
    result = uml.run_in_guest(["/nonexistent/command"], nbds_max=0, timeout=120)
    assert result.returncode == 127
    assert "nonexistent" in result.output


def test_guest_python_imports_blockfs() -> None:
    code = (
        "import json, os, sys, attrs, blockfs, blockfs.testing.uml\n"
        "print(json.dumps({'path': [os.path.realpath(p) for p in blockfs.__path__],\n"
        "                  'executable': sys.executable, 'release': os.uname().release}))\n"
    )
    # cwd "/" so that the repository is importable only through PYTHONPATH.
    result = uml.run_python_in_guest(code, cwd="/", timeout=120)
    assert result.returncode == 0, result.output + result.console
    report = json.loads(result.output)
    assert report["path"] == [str(repo_root() / "blockfs")]
    assert report["executable"] == uml.host_python()
    # It really ran under the UML kernel, not on the host.
    kernel_release = subprocess.run(
        ["linux", "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert report["release"] == kernel_release


def test_timeout_kills_uml_and_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Exchange directories are made under tempfile's directory: check it is removed.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    timeout = 6.0
    start = time.monotonic()
    with pytest.raises(uml.UmlTimeoutError) as caught:
        uml.run_in_guest(["sleep", "600"], timeout=timeout, nbds_max=1)
    elapsed = time.monotonic() - start
    assert timeout <= elapsed < timeout + 15
    error = caught.value
    assert isinstance(error, TimeoutError)
    message = str(error)
    assert "did not finish within" in message
    # The console tail is in the message, and shows the command had started.
    assert "blockfs-uml: running command" in message
    assert "blockfs-uml: running command" in error.console
    # Nothing of UML is left alive ...
    assert uml._group_members(error.pgid) == []
    # ... and the dead ones get reaped (by PID 1: UML's helpers are orphaned
    # once the main UML process is killed; some init processes reap lazily).
    deadline = time.monotonic() + 15
    while _any_process_in_group(error.pgid):
        assert time.monotonic() < deadline, "UML processes still listed"
        time.sleep(0.1)
    assert list(tmp_path.iterdir()) == []


def _any_process_in_group(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[2]) == pgid:
                return True
    return False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"env": {"BAD-NAME": "x"}}, "invalid environment variable name"),
        ({"mem": "lots"}, "mem must look like"),
        ({"nbds_max": -1}, "nbds_max"),
    ],
)
def test_bad_arguments_are_rejected_before_booting(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        uml.run_in_guest(["true"], **kwargs)  # type: ignore[arg-type]
