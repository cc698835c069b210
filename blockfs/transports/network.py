"""Serving devices over the NBD network protocol (fixed newstyle), on a Unix
socket, TCP, or a single connection on stdin/stdout.

Each client gets its own thread: the handshake (pure state machine in
protocol.handshake, bounded by a timeout), then the shared serve loop, the
same one the kernel transport uses. One client's errors end that client's
connection only.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..dispatch.declare import BoundDevice, bind
from ..dispatch.invoke import Invoker
from ..errors import HandshakeError
from ..protocol.constants import MAX_PAYLOAD
from ..protocol.handshake import NEED_DATA, Aborted, Export, Negotiated, ServerHandshake, StartTLS
from ..serve_loop import ServeLoop
from .connection import Connection, connection_for, shutdown_socket
from .signals import stop_on_signals

log = logging.getLogger("blockfs.server")

__all__ = ["TLS", "Server", "serve", "serve_stdio", "parse_address"]

CLOSE_GRACE = 2.0  # seconds clients get to take their last replies when the server stops


@attrs.frozen
class TLS:
    """X.509 TLS for the server: STARTTLS offered ("on") or demanded ("require").
    With `ca`, clients must present a certificate signed by it."""

    cert: str
    key: str
    ca: str | None = None
    mode: str = attrs.field(default="require")

    @mode.validator
    def _check_mode(self, attribute: object, value: str) -> None:
        if value not in ("on", "require"):
            raise ValueError(f"mode: expected 'on' or 'require', got {value!r}")

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the spec's minimum
        ctx.load_cert_chain(self.cert, self.key)
        if self.ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca)
        return ctx


@attrs.frozen
class Address:
    """Where to listen: a Unix socket path, or a TCP host and port."""

    unix: str | None = None
    host: str = "127.0.0.1"
    port: int = 10809

    def uri(self, export: str, tls: bool) -> str:
        scheme = "nbds" if tls else "nbd"
        if self.unix is not None:
            return f"{scheme}+unix:///{export}?socket={self.unix}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{export}"


def parse_address(text: str) -> Address:
    """'/tmp/disk.sock' -> Unix socket; 'HOST:PORT', ':PORT', '[::1]:PORT' -> TCP
    (an empty host means 127.0.0.1: never all interfaces unless asked)."""
    if "/" in text or ":" not in text:
        return Address(unix=text)
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address: expected HOST:PORT with a port from 0 to 65535, got {text!r}")
    return Address(host=host, port=int(port))


@attrs.define
class _ExportEntry:
    export: Export
    invoker: Invoker


def _export_for(name: str, bound: BoundDevice, description: str | None) -> Export:
    return Export(
        name=name,
        size=bound.size,
        flags=bound.transmission_flags,
        description=description,
        min_block=1,  # handlers take any byte range
        preferred_block=bound.geometry.block_size,
        max_block=MAX_PAYLOAD,
    )


class Server:
    """A listening NBD server for one or more devices.

    Usable as a context manager (tests, embedding) or through `serve()`.
    `start()` binds and accepts in a background thread; `close()` stops
    accepting, ends every connection after its in-flight requests, flushes
    and calls each device's unmount handler.
    """

    def __init__(
        self,
        devices: Mapping[str, object] | object,
        address: str | Address,
        *,
        export_name: str = "",
        read_only: bool = False,
        description: str | Mapping[str, str] | None = None,
        tls: TLS | None = None,
        max_clients: int = 64,
        handshake_timeout: float = 10.0,
    ) -> None:
        if not isinstance(max_clients, int) or max_clients < 1:
            raise ValueError(f"max_clients: expected an int >= 1, got {max_clients!r}")
        if not isinstance(devices, Mapping):
            devices = {export_name: devices}
        if not devices:
            raise ValueError("devices: expected at least one device to serve")
        self.address = address if isinstance(address, Address) else parse_address(address)
        self.tls = tls
        self._ssl = tls.context() if tls is not None else None
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.exports: dict[str, _ExportEntry] = {}
        for name, dev in devices.items():
            bound = bind(dev, read_only=read_only)
            desc = description.get(name) if isinstance(description, Mapping) else description
            self.exports[name] = _ExportEntry(_export_for(name, bound, desc), Invoker(bound))
        self.default_export = next(iter(self.exports))
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._clients: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()  # close() has begun
        self._close_lock = threading.Lock()  # a second close() waits for the first
        self._closed = False
        self.connections_served = 0

    # --- lifecycle ----------------------------------------------------------------
    def start(self) -> Server:
        self._listener = self._bind()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="blockfs-accept", daemon=True)
        self._accept_thread.start()
        log.info("serving %s", ", ".join(self.uris()))
        return self

    def uris(self) -> list[str]:
        return [self.address.uri(name, self.tls is not None) for name in self.exports]

    def _bind(self) -> socket.socket:
        addr = self.address
        if addr.unix is not None:
            path = Path(addr.unix)
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise FileExistsError(errno.EEXIST, "exists and is not a socket; not replacing it", str(path))
                path.unlink()  # a stale socket from an earlier run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
        else:
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr.host, addr.port))
            if addr.port == 0:  # let the OS pick; report the real one
                self.address = attrs.evolve(addr, port=sock.getsockname()[1])
        sock.listen(128)
        return sock

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self) -> None:
        """Block until close() is called (from another thread or a signal)."""
        while not self._closing.wait(0.5):
            pass

    def close(self) -> None:
        with self._close_lock:
            if not self._closed:
                self._closing.set()
                self._close()
                self._closed = True

    def _close(self) -> None:
        if self._listener is not None:
            shutdown_socket(self._listener)  # wakes accept()
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=10)
        with self._lock:
            clients = list(self._clients.values())
        for sock, _ in clients:
            shutdown_socket(sock, socket.SHUT_RD)  # the loop sees EOF, answers what it has, ends
        grace = time.monotonic() + CLOSE_GRACE
        for sock, thread in clients:
            thread.join(timeout=max(0.0, grace - time.monotonic()))
            if thread.is_alive():
                # Stuck sending to a client that does not read: cut it off.
                log.warning("closing a client that did not take its replies within %s s", CLOSE_GRACE)
                shutdown_socket(sock)
        for _, thread in clients:
            thread.join(timeout=10)
        stuck = [t.name for _, t in clients if t.is_alive()]
        if stuck:  # a handler still running: unmount must not run beside it
            log.error("not calling unmount: %s still running after close()", ", ".join(stuck))
        for entry in self.exports.values():
            entry.invoker.shutdown(unmount=not stuck)
        if self.address.unix is not None:
            try:
                os.unlink(self.address.unix)
            except FileNotFoundError:
                pass
        log.info("server stopped after %d connections", self.connections_served)

    # --- connections --------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError as exc:
                if self._closing.is_set():
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The connection stays queued; retrying at once would spin.
                    log.warning("accept: %s; retrying in 0.1 s", exc.strerror)
                    self._closing.wait(0.1)
                else:
                    log.warning("accept failed: %s", exc)
                continue
            with self._lock:
                if len(self._clients) >= self.max_clients:
                    log.warning("refusing a client: already serving max_clients=%d", self.max_clients)
                    sock.close()
                    continue
                self.connections_served += 1
                key = self.connections_served  # not the fd: a closed fd number is reused at once
                label = f"client {key} ({peer or 'unix'})"
                thread = threading.Thread(target=self._client, args=(sock, label, key), name=label, daemon=True)
                self._clients[key] = (sock, thread)
            thread.start()

    def _client(self, sock: socket.socket, label: str, key: int) -> None:
        def track(wrapped: socket.socket) -> None:
            # After STARTTLS the TLS socket owns the descriptor: close() must reach it.
            with self._lock:
                if key in self._clients:
                    self._clients[key] = (wrapped, self._clients[key][1])

        try:
            sock = serve_connection(sock, self, label, on_tls=track)
        except Exception:
            log.exception("%s: unexpected error", label)
        finally:
            with self._lock:
                entry = self._clients.pop(key, None)
            for s in {id(sock): sock, **({id(entry[0]): entry[0]} if entry else {})}.values():
                try:
                    s.close()
                except OSError:
                    pass

    def handshake(self) -> ServerHandshake:
        return ServerHandshake(
            {name: e.export for name, e in self.exports.items()},
            default_export=self.default_export,
            tls="off" if self.tls is None else self.tls.mode,
        )


def serve_connection(
    sock: socket.socket, server: Server, label: str, on_tls: Callable[[socket.socket], None] | None = None
) -> socket.socket:
    """Handshake, then the serve loop, on one accepted socket. Returns the
    socket in use at the end (a TLS socket after STARTTLS), for the caller to close."""
    # One deadline for the whole handshake: a client trickling a byte at a
    # time must not hold a thread forever.
    deadline = time.monotonic() + server.handshake_timeout
    sock.settimeout(server.handshake_timeout)
    hs = server.handshake()
    try:
        sock.sendall(hs.initial_bytes())
        while True:
            event = hs.next_event()
            out = hs.data_to_send()
            if out:
                sock.sendall(out)
            if event is NEED_DATA:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                hs.receive_data(sock.recv(65536))
            elif isinstance(event, StartTLS):
                assert server._ssl is not None
                sock = server._ssl.wrap_socket(sock, server_side=True)
                if on_tls is not None:
                    on_tls(sock)
                hs.tls_started()
                log.debug("%s: TLS %s", label, sock.version())  # type: ignore[attr-defined]
            elif isinstance(event, Aborted):
                log.debug("%s: client ended the handshake", label)
                return sock
            else:
                assert isinstance(event, Negotiated)
                break
    except HandshakeError as exc:
        try:
            out = hs.data_to_send()
            if out:
                sock.sendall(out)
        except OSError:
            pass
        log.warning("%s: handshake failed: %s", label, exc)
        return sock
    except (TimeoutError, socket.timeout):
        log.warning("%s: no handshake within %s s; dropped", label, server.handshake_timeout)
        return sock
    except ssl.SSLError as exc:
        log.warning("%s: TLS failed: %s", label, exc)
        return sock
    except OSError as exc:
        log.info("%s: connection lost during the handshake: %s", label, exc)
        return sock
    sock.settimeout(None)
    entry = server.exports[event.export.name]
    log.info("%s: export %r, structured replies %s", label, event.export.name, event.structured_replies)
    conn: Connection = connection_for(sock)
    why = ServeLoop(
        conn, entry.invoker, structured=event.structured_replies, initial=event.trailing, label=label
    ).run()
    log.info("%s: ended (%s)", label, why)
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.settimeout(2.0)  # a vanished client never answers close_notify
            sock.unwrap()  # the spec asks for a TLS shutdown before closing
        except (OSError, ValueError):
            pass
    return sock


def serve(
    device: object | Mapping[str, object],
    address: str,
    *,
    export_name: str = "",
    read_only: bool = False,
    description: str | Mapping[str, str] | None = None,
    tls: TLS | None = None,
    max_clients: int = 64,
    handshake_timeout: float = 10.0,
    on_ready: Callable[[Server], Any] | None = None,
) -> None:
    """Serve a device (or {export name: device}) to NBD clients until SIGINT
    or SIGTERM (from the main thread) or until `on_ready`'s server is closed.

    address: a Unix socket path, or HOST:PORT (default host 127.0.0.1).
    """
    server = Server(
        device,
        address,
        export_name=export_name,
        read_only=read_only,
        description=description,
        tls=tls,
        max_clients=max_clients,
        handshake_timeout=handshake_timeout,
    )
    restore = stop_on_signals(server.close, "server")
    try:
        server.start()
        if on_ready is not None:
            on_ready(server)
        server.wait()
    finally:
        server.close()
        restore()


def serve_stdio(
    device: object, *, export_name: str = "", read_only: bool = False, description: str | None = None
) -> None:
    """Serve one connection on stdin/stdout (like `nbdkit -s`), for libnbd's
    connect_command and `nbdsh -c`. stdin must be a socket (libnbd gives a
    socketpair); logs go to stderr."""
    sock = socket.socket(fileno=os.dup(0))
    if sock.type != socket.SOCK_STREAM:
        raise ValueError("stdin: expected a stream socket (as libnbd's connect_command provides)")
    server = Server({export_name: device}, Address(unix=None), read_only=read_only, description=description)
    restore = stop_on_signals(lambda: shutdown_socket(sock, socket.SHUT_RD), "stdio server")
    try:
        sock = serve_connection(sock, server, "stdio")
    finally:
        sock.close()
        server._closed = True
        for entry in server.exports.values():
            entry.invoker.shutdown(unmount=True)
        restore()
