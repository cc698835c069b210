"""Helpers for code that runs inside a test guest (or any Linux with NBD):
start a device server, wait for the kernel to bring the device up or down,
run commands with their output kept for the report."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


class GuestFailure(AssertionError):
    pass


def sysfs(dev: str) -> Path:
    return Path("/sys/block") / Path(dev).name


def device_size(dev: str) -> int:
    try:
        return int((sysfs(dev) / "size").read_text()) * 512
    except (OSError, ValueError):
        return 0


def is_live(dev: str) -> bool:
    return (sysfs(dev) / "pid").exists() and device_size(dev) > 0


def wait_for(predicate: object, what: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise GuestFailure(f"server exited with {proc.returncode} while waiting for {what}:\n{out}")
        time.sleep(0.01)
    raise GuestFailure(f"timed out after {timeout} s waiting for {what}")


def wait_live(dev: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    wait_for(lambda: is_live(dev), f"{dev} to come up", timeout, proc)


def wait_down(dev: str, timeout: float = 30.0) -> None:
    wait_for(lambda: not (sysfs(dev) / "pid").exists(), f"{dev} to go down", timeout)


def sh(*argv: str, check: bool = True, input: bytes | None = None) -> str:
    """Run a command; its output is echoed for the test report."""
    proc = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.decode(errors="replace")
    print(f"$ {' '.join(argv)}  -> {proc.returncode}\n{out}", end="" if out.endswith("\n") or not out else "\n")
    if check and proc.returncode != 0:
        raise GuestFailure(f"{argv[0]} failed with status {proc.returncode}")
    return out


def start_server(argv: Sequence[str], dev: str, *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a device server process (the host's Python) and wait until the
    kernel has the device up."""
    proc = subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    wait_live(dev, proc)
    return proc


def terminate(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    """Send `sig` and wait; a process that ignores it for `timeout` s is
    killed and that is a GuestFailure. Returns the exit status."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise GuestFailure(f"{proc.args!r} ignored {signal.Signals(sig).name} for {timeout} s") from None


def stop_server(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60.0) -> tuple[int, str]:
    """terminate() a server started by start_server; its status and output."""
    try:
        status = terminate(proc, sig, timeout)
    finally:
        out = proc.stdout.read() if proc.stdout else b""
        if proc.stdout:
            proc.stdout.close()
    return status, out.decode(errors="replace")


def wait_connectable(path: str | Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
    """Until something accepts connections on the Unix socket `path`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise GuestFailure(f"{proc.args!r} exited with {proc.returncode} before listening on {path}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
        time.sleep(0.02)
    raise GuestFailure(f"nothing listening on {path} after {timeout} s")


def tree_digest(root: str) -> dict[str, str]:
    """sha256 of every file below `root`, by relative path."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if rel.startswith("lost+found"):
                continue
            with open(path, "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def write_tree(root: str, files: int = 60, seed: int = 1) -> None:
    """A tree of files of assorted sizes with pseudo-random content."""
    import random

    rng = random.Random(seed)
    for i in range(files):
        d = os.path.join(root, f"dir{i % 7}", f"sub{i % 3}")
        os.makedirs(d, exist_ok=True)
        size = rng.choice([0, 1, 511, 4096, 10_000, 65_536, 300_000, 1_500_000])
        with open(os.path.join(d, f"file{i}.bin"), "wb") as f:
            f.write(rng.randbytes(size))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
