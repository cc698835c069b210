"""Start and stop `python -m blockfs serve ...` as a child process, for tests
that drive real NBD clients against it.

    with ServerProcess(["examples/ramdisk.py:RamDisk", "--socket", path]) as srv:
        subprocess.run(["nbdinfo", srv.uri], ...)
    assert srv.returncode == 0   # it was stopped with SIGTERM and exited cleanly

The server's stdout is where the CLI prints the URI of each export once it
listens (that is what `start()` waits for); its stderr (the log) goes to a
file, readable at any time with `log()`, so a chatty server can never block
on a full pipe.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = ["ServerProcess", "ServerProcessError", "python_executable"]


class ServerProcessError(AssertionError):
    """The server did not start, or did not stop the way it should."""


def python_executable() -> str:
    """The real interpreter running us (not a pyenv shim or other wrapper)."""
    if sys.prefix != sys.base_prefix:
        return sys.executable  # a venv is found through the path it is started as
    return os.path.realpath(sys.executable)


class ServerProcess:
    """`python -m blockfs serve ARGS...` in a child process.

    `args` are the arguments after `serve`. `start()` returns once the server
    printed `exports` URIs (it prints one per export when listening) and
    raises :class:`ServerProcessError` if it exits first or takes longer
    than `start_timeout`. `stop()` sends SIGTERM and waits (SIGKILL after
    `stop_timeout`, which is then an error). Leaving the `with` block always
    stops it.
    """

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        exports: int = 1,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 20.0,
        verbose: int = 0,
    ) -> None:
        self.argv = [python_executable(), "-m", "blockfs", *(["-" + "v" * verbose] if verbose else []), "serve",
                     *(os.fspath(a) for a in args)]
        self.exports = exports
        self.cwd = cwd
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.uris: list[str] = []
        self.returncode: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_path: Path | None = None
        self._final_log: str | None = None

    @property
    def uri(self) -> str:
        return self.uris[0]

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(check=exc[0] is None)

    def start(self) -> ServerProcess:
        fd, name = tempfile.mkstemp(prefix="blockfs-server-", suffix=".log")
        self._log_path = Path(name)
        self._log = os.fdopen(fd, "w+b")
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
            cwd=self.cwd, env=self.env,
        )
        try:
            self._read_uris()
        except BaseException:
            self.stop(check=False)
            raise
        return self

    def _read_uris(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        out = self._proc.stdout.fileno()
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        while buf.count(b"\n") < self.exports:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerProcessError(
                    f"server printed no URI within {self.start_timeout} s: {self.argv}\n{self.log()}")
            ready, _, _ = select.select([out], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(out, 4096)
                if not chunk:
                    self._proc.wait(timeout=self.stop_timeout)
                    raise ServerProcessError(
                        f"server exited with status {self._proc.returncode} before listening: "
                        f"{self.argv}\n{self.log()}")
                buf += chunk
        self.uris = buf.decode().split()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """Everything the server logged so far (its stderr)."""
        if self._log_path is None:
            return ""
        try:
            return self._log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, *, check: bool = True) -> int:
        """Signal the server, wait for it, and return its exit status.

        With `check`, a server that had already died, did not exit within
        `stop_timeout` or exited non-zero raises ServerProcessError."""
        proc = self._proc
        if proc is None:
            return self.returncode if self.returncode is not None else 0
        problem = None
        if proc.poll() is not None:
            problem = f"server had already exited with status {proc.returncode}"
        else:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                problem = f"server did not exit within {self.stop_timeout} s of {signal.Signals(sig).name}"
        if proc.stdout is not None:
            proc.stdout.close()
        self._proc = None
        self.returncode = proc.returncode
        text = self.log()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._log_path is not None:
            self._final_log = text
            self._log_path.unlink(missing_ok=True)
            self._log_path = None
        if check and problem is None and proc.returncode != 0:
            problem = f"server exited with status {proc.returncode}"
        if check and problem is not None:
            raise ServerProcessError(f"{problem}: {self.argv}\n{text}")
        return proc.returncode

    def final_log(self) -> str:
        """The whole log, also after stop()."""
        return self._final_log if self._final_log is not None else self.log()
