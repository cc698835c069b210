"""The `blockfs` command, and errors the kernel transport gives on this host."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import blockfs
from blockfs.cli import UsageError, load_class, main, make_device
from blockfs.protocol.constants import Command
from blockfs.testing.hostile import HostileClient

ROOT = Path(__file__).resolve().parents[1]
RAMDISK = f"{ROOT}/examples/ramdisk.py:RamDisk"


def test_load_class_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="expected FILE.py:Class or module:Class, got 'nocolon'"):
        load_class("nocolon")
    with pytest.raises(UsageError, match="no such file"):
        load_class(f"{tmp_path}/missing.py:X")
    with pytest.raises(UsageError, match="has no 'Nope'"):
        load_class(f"{ROOT}/examples/ramdisk.py:Nope")
    plain = tmp_path / "plain.py"
    plain.write_text("class NotADevice:\n    pass\n")
    with pytest.raises(blockfs.DefinitionError, match="NotADevice is not a @blockfs.device class"):
        load_class(f"{plain}:NotADevice")


def test_make_device_arguments(tmp_path: Path) -> None:
    dev = make_device(f"{ROOT}/examples/sparse_file.py:SparseFile", [f"path={tmp_path}/d.img", "size=1M"])
    assert blockfs.bind(dev).size == 1 << 20
    dev.unmount()
    with pytest.raises(UsageError, match="expected NAME=VALUE, got 'size'"):
        make_device(f"{ROOT}/examples/sparse_file.py:SparseFile", ["size"])
    with pytest.raises(UsageError, match=r"SparseFile\(bogus=...\)"):
        make_device(f"{ROOT}/examples/sparse_file.py:SparseFile", ["bogus=1"])


def test_errors_are_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "nocolon", "--socket", "/tmp/x.sock"]) == 1
    assert capsys.readouterr().err.startswith("blockfs: error: device: expected FILE.py:Class")
    assert main(["serve", RAMDISK, "--listen", "localhost:notaport"]) == 1
    assert "port from 0 to 65535" in capsys.readouterr().err
    assert main(["serve", RAMDISK, "--socket", "/tmp/x.sock", "--tls-cert", "c.pem"]) == 1
    assert "expected both --tls-cert and --tls-key" in capsys.readouterr().err


@pytest.mark.skipif(os.path.exists("/sys/module/nbd"), reason="this host has an NBD driver")
def test_run_without_an_nbd_driver_says_modprobe() -> None:
    with pytest.raises(blockfs.NbdDriverMissingError) as info:
        blockfs.run(make_device(RAMDISK, []), "/dev/nbd0")
    assert "modprobe nbd" in str(info.value) and info.value.errno == errno.ENODEV
    assert isinstance(info.value, OSError)


def test_run_checks_connections_before_touching_the_device(tmp_path: Path) -> None:
    dev = make_device(f"{ROOT}/examples/sparse_file.py:SparseFile", [f"path={tmp_path}/d.img", "size=1M"])
    with pytest.raises(ValueError, match="need a device declared with multi_conn=True"):
        blockfs.run(dev, "/dev/nbd0", connections=2)
    dev.unmount()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_prints_the_uri_serves_and_stops_on_a_signal(tmp_path: Path, sig: int) -> None:
    sock_path = tmp_path / "cli.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockfs", "serve", RAMDISK, "--socket", str(sock_path), "--export-name", "ram"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"nbd+unix:///ram?socket={sock_path}"
        with HostileClient.connect(blockfs.transports.network.parse_address(str(sock_path))) as c:
            c.negotiate("ram", structured=True)
            raw = c.transmission()
            assert raw.write(4096, b"cli").error == 0
            assert raw.read(4096, 3).data == b"cli"
            raw.send(Command.DISC)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert not sock_path.exists(), "the socket file is removed on exit"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_listen_defaults_to_loopback() -> None:
    addr = blockfs.transports.network.parse_address(":10809")
    assert (addr.host, addr.port, addr.unix) == ("127.0.0.1", 10809, None)
    assert addr.uri("x", tls=True) == "nbds://127.0.0.1:10809/x"
    assert blockfs.transports.network.parse_address("[::1]:99").uri("", tls=False) == "nbd://[::1]:99/"
    with socket.socket() as s:  # bind() really uses loopback
        s.bind(("127.0.0.1", 0))
