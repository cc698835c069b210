"""Attaching a device to the kernel's NBD driver with ioctls.

The kernel side of NBD is a client: we give it one end of a socketpair
(NBD_SET_SOCK) and it sends requests for /dev/nbdX down that socket while
NBD_DO_IT blocks in a thread of ours. The serve loop answers on the other
end. Teardown order matters: close our end before joining the NBD_DO_IT
thread (the ioctl returns when the kernel sees the socket die), then
NBD_CLEAR_SOCK and NBD_CLEAR_QUE so the device can be used again at once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from ..dispatch.declare import BoundDevice, bind
from ..dispatch.invoke import Invoker
from ..errors import (
    DeviceBusyError,
    DeviceNotFoundError,
    DevicePermissionError,
    KernelDeviceError,
    NbdDriverMissingError,
    NotAnNbdDeviceError,
)
from ..protocol.constants import (
    NBD_CLEAR_QUE,
    NBD_CLEAR_SOCK,
    NBD_DISCONNECT,
    NBD_DO_IT,
    NBD_MAJOR,
    NBD_SET_BLKSIZE,
    NBD_SET_FLAGS,
    NBD_SET_SIZE_BLOCKS,
    NBD_SET_SOCK,
    NBD_SET_TIMEOUT,
    TransmissionFlag,
)
from ..serve_loop import ServeLoop
from .connection import SocketConnection, shutdown_socket
from .signals import stop_on_signals

log = logging.getLogger("blockfs.kernel")

__all__ = ["Mount", "run"]


class Mount:
    """Handed to `on_mount`: the live device, and how to end it."""

    def __init__(self, path: str, fd: int, name: str) -> None:
        self.path = path
        self._fd = fd
        self.name = name
        self._lock = threading.Lock()
        self._closed = False
        self.unmount_requested = threading.Event()

    def unmount(self) -> None:
        """Ask the kernel to disconnect: it sends NBD_CMD_DISC after the
        requests already queued, and `run()` returns once they are answered."""
        with self._lock:
            if self._closed or self.unmount_requested.is_set():
                return
            self.unmount_requested.set()
            try:
                fcntl.ioctl(self._fd, NBD_DISCONNECT)
            except OSError as exc:
                log.warning("%s: NBD_DISCONNECT failed: %s", self.path, exc)

    def set_timeout(self, seconds: int) -> None:
        """How long the kernel waits for a reply before failing a request."""
        if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 0:
            raise ValueError(f"seconds: expected an int >= 0, got {seconds!r}")
        fcntl.ioctl(self._fd, NBD_SET_TIMEOUT, seconds)

    def _close(self) -> None:
        with self._lock:
            self._closed = True

    def __repr__(self) -> str:
        return f"Mount({self.path!r})"


@attrs.frozen
class _Paths:
    dev: str
    name: str  # nbd0
    sysfs: Path


def _check_device(path: str) -> _Paths:
    """Clear errors for everything that can be known before any ioctl."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not Path("/sys/module/nbd").exists():
            raise NbdDriverMissingError(
                errno.ENODEV,
                "this kernel has no NBD driver loaded (try `modprobe nbd`); "
                "or serve over the network with blockfs.serve()",
                path,
            ) from None
        raise DeviceNotFoundError(errno.ENOENT, "no such NBD device", path) from None
    if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != NBD_MAJOR:
        raise NotAnNbdDeviceError(
            errno.ENOTBLK, f"not an NBD block device (expected a block device of major {NBD_MAJOR})", path
        )
    name = Path(os.path.realpath(path)).name
    sysfs = Path("/sys/block") / name
    return _Paths(path, name, sysfs)


def _in_use_by(paths: _Paths) -> str | None:
    try:
        return (paths.sysfs / "pid").read_text().strip()
    except OSError:
        return None


def _ioctl(fd: int, request: int, arg: int, paths: _Paths, what: str) -> None:
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DeviceBusyError(errno.EBUSY, f"device is in use ({what})", paths.dev) from None
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise DevicePermissionError(exc.errno, "attaching an NBD device needs root (CAP_SYS_ADMIN)", paths.dev) from None
        raise KernelDeviceError(exc.errno, f"{what} failed: {exc.strerror}", paths.dev) from None


def _wait_until_live(paths: _Paths, done: threading.Event, slow: float = 10.0) -> bool:
    """The device is usable once the kernel has started it (pid file + size).
    Waits until then or until serving ends; says so if it takes long."""
    warn_at: float | None = time.monotonic() + slow
    while not done.is_set():
        if warn_at is not None and time.monotonic() > warn_at:
            log.warning("%s: still not live after %.0f s (waiting for %s)", paths.dev, slow, paths.sysfs / "pid")
            warn_at = None
        try:
            if (paths.sysfs / "pid").exists() and int((paths.sysfs / "size").read_text()) > 0:
                return True
        except (OSError, ValueError):
            pass
        done.wait(0.005)
    return False


def run(
    device: object,
    path: str,
    *,
    on_mount: Callable[[Mount], Any] | None = None,
    timeout: int | None = None,
    connections: int = 1,
    read_only: bool = False,
) -> None:
    """Attach `device` to the kernel NBD device `path` (e.g. "/dev/nbd0") and
    serve it until it is disconnected: by `Mount.unmount()`, SIGINT/SIGTERM
    (when called from the main thread), `nbd-client -d`, or an error.

    on_mount(mount) runs in its own thread once the device is live; if it
    raises, the device is unmounted and the error re-raised here.
    timeout: seconds the kernel waits for a reply before failing a request.
    connections: sockets (kernel queues) to serve in parallel; more than one
    needs a device declared with multi_conn=True.
    """
    bound = bind(device, read_only=read_only)
    if not isinstance(connections, int) or connections < 1:
        raise ValueError(f"connections: expected an int >= 1, got {connections!r}")
    if connections > 1 and not bound.table.multi_conn:
        raise ValueError(
            f"connections: {connections} sockets need a device declared with multi_conn=True; "
            f"{type(device).__qualname__} is not"
        )
    paths = _check_device(path)
    holder = _in_use_by(paths)
    if holder:
        raise DeviceBusyError(errno.EBUSY, f"device is in use (served by pid {holder})", path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        raise DevicePermissionError(errno.EACCES, "opening an NBD device needs root (CAP_SYS_ADMIN)", path) from None
    try:
        _Attachment(bound, paths, fd, on_mount, timeout, connections).run()
    finally:
        os.close(fd)


class _Attachment:
    def __init__(
        self,
        bound: BoundDevice,
        paths: _Paths,
        fd: int,
        on_mount: Callable[[Mount], Any] | None,
        timeout: int | None,
        connections: int,
    ) -> None:
        self.bound = bound
        self.paths = paths
        self.fd = fd
        self.on_mount = on_mount
        self.timeout = timeout
        self.connections = connections
        self.invoker = Invoker(bound)
        self.mount = Mount(paths.dev, fd, paths.name)
        self.done = threading.Event()  # the serve loops or NBD_DO_IT ended
        self.errors: list[BaseException] = []
        self.ours: list[socket.socket] = []
        self.started = False  # NBD_DO_IT is running: the device was attached

    def configure(self) -> None:
        fd, paths, bound = self.fd, self.paths, self.bound
        # A previous owner that died before NBD_DO_IT may have left sockets.
        _ioctl(fd, NBD_CLEAR_SOCK, 0, paths, "NBD_CLEAR_SOCK")
        _ioctl(fd, NBD_SET_BLKSIZE, bound.geometry.block_size, paths, "NBD_SET_BLKSIZE")
        _ioctl(fd, NBD_SET_SIZE_BLOCKS, bound.geometry.blocks, paths, "NBD_SET_SIZE_BLOCKS")
        if self.timeout is not None:
            _ioctl(fd, NBD_SET_TIMEOUT, self.timeout, paths, "NBD_SET_TIMEOUT")
        flags = bound.transmission_flags
        if self.connections > 1:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        _ioctl(fd, NBD_SET_FLAGS, int(flags), paths, "NBD_SET_FLAGS")
        for _ in range(self.connections):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.ours.append(ours)
            try:
                _ioctl(fd, NBD_SET_SOCK, theirs.fileno(), paths, "NBD_SET_SOCK")
            finally:
                theirs.close()  # the kernel holds its own reference now

    def run(self) -> None:
        loops: list[threading.Thread] = []
        do_it = threading.Thread(target=self._do_it, name=f"blockfs-{self.paths.name}-do-it", daemon=True)
        restore = stop_on_signals(self.mount.unmount, self.paths.dev)
        try:
            self.configure()
            do_it.start()
            for i, sock in enumerate(self.ours):
                t = threading.Thread(
                    target=self._serve, args=(sock, i), name=f"blockfs-{self.paths.name}-q{i}", daemon=True
                )
                t.start()
                loops.append(t)
            if _wait_until_live(self.paths, self.done):
                self.started = True
                log.info("%s is live: %d bytes, flags 0x%x", self.paths.dev, self.bound.size, self.bound.transmission_flags)
                if self.on_mount is not None:
                    threading.Thread(target=self._call_on_mount, name="blockfs-on-mount", daemon=True).start()
            while not self.done.wait(0.5):
                pass
        except BaseException:
            self._force_disconnect()
            raise
        finally:
            self._teardown(do_it, loops)
            restore()
        if self.errors:
            raise self.errors[0]

    def _do_it(self) -> None:
        try:
            fcntl.ioctl(self.fd, NBD_DO_IT)
        except OSError as exc:
            # EINTR/EPIPE/ECONNRESET here are the normal result of a disconnect;
            # anything else (the kernel refused to start the device) is run()'s error.
            normal = exc.errno in (errno.EINTR, errno.EPIPE, errno.ECONNRESET, errno.ESHUTDOWN)
            if not normal and not self.mount.unmount_requested.is_set():
                log.error("%s: NBD_DO_IT failed: %s", self.paths.dev, exc)
                self.errors.append(KernelDeviceError(exc.errno, f"NBD_DO_IT failed: {exc.strerror}", self.paths.dev))
        finally:
            self.done.set()

    def _serve(self, sock: socket.socket, index: int) -> None:
        label = f"{self.paths.dev}[{index}]"
        try:
            loop = ServeLoop(SocketConnection(sock), self.invoker, label=label)
            why = loop.run()
            log.info("%s: serve loop ended (%s) after %d requests", label, why, loop.requests)
        except BaseException as exc:  # never lose an error in a thread
            log.exception("%s: serve loop failed", label)
            self.errors.append(exc)
        finally:
            self.done.set()

    def _call_on_mount(self) -> None:
        try:
            assert self.on_mount is not None
            self.on_mount(self.mount)
        except BaseException as exc:
            log.error("on_mount raised %s; unmounting", type(exc).__name__, exc_info=exc)
            self.errors.append(exc)
            self.mount.unmount()

    def _force_disconnect(self) -> None:
        try:
            fcntl.ioctl(self.fd, NBD_DISCONNECT)
        except OSError:
            pass

    def _teardown(self, do_it: threading.Thread, loops: list[threading.Thread]) -> None:
        if not self.mount.unmount_requested.is_set() and (self.errors or not do_it.is_alive()):
            self._force_disconnect()
        # Let serve loops finish replies to what the kernel already sent.
        for t in loops:
            t.join(timeout=30)
        for sock in self.ours:
            shutdown_socket(sock)
            sock.close()
        if do_it.is_alive():
            do_it.join(timeout=30)
            if do_it.is_alive():
                self._force_disconnect()
                do_it.join(timeout=10)
        for request, what in ((NBD_CLEAR_QUE, "NBD_CLEAR_QUE"), (NBD_CLEAR_SOCK, "NBD_CLEAR_SOCK")):
            try:
                fcntl.ioctl(self.fd, request)
            except OSError as exc:
                log.debug("%s: %s: %s", self.paths.dev, what, exc)
        self.mount._close()
        stuck = [t.name for t in loops if t.is_alive()]
        if stuck:  # a handler still running: unmount must not run beside it
            log.error("%s: not calling unmount: %s still running", self.paths.dev, ", ".join(stuck))
        self.invoker.shutdown(unmount=self.started and not stuck)
