"""What the serve loop needs from a transport: receive into a buffer, send a
list of buffers, shut down. Plain sockets send with scatter-gather
`sendmsg` (headers and payloads in one system call, no joining copies); TLS
sockets, which have no `sendmsg`, send part by part."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from typing import Any, Protocol

IOV_MAX = 1024  # Linux's limit on buffers per sendmsg


class Connection(Protocol):
    def recv_into(self, buf: memoryview) -> int: ...
    def recv_into_nowait(self, buf: memoryview) -> int | None: ...
    def recv_into_all(self, buf: memoryview) -> int: ...
    def send_parts(self, parts: Sequence[Any]) -> None: ...
    def shutdown(self) -> None: ...
    def close(self) -> None: ...


class SocketConnection:
    """A connected stream socket (Unix, TCP, or the kernel's socketpair)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.recv_into = sock.recv_into  # type: ignore[method-assign]

    def recv_into(self, buf: memoryview) -> int:  # replaced per instance by the bound method
        return self.sock.recv_into(buf)

    def recv_into_all(self, buf: memoryview) -> int:
        """Fill all of `buf` in one system call (fewer only at end of stream):
        for the rest of a payload whose length is known."""
        return self.sock.recv_into(buf, 0, socket.MSG_WAITALL)

    def recv_into_nowait(self, buf: memoryview) -> int | None:
        """Like recv_into, or None at once if nothing has arrived."""
        try:
            return self.sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    def send_parts(self, parts: Sequence[Any]) -> None:
        """Send every part, in order. Parts are bytes or byte-format memoryviews."""
        sendmsg = self.sock.sendmsg
        if len(parts) <= IOV_MAX:
            sent = sendmsg(parts)
            if sent == sum(map(len, parts)):
                return  # the usual case: everything went out in one call
        else:
            sent = 0
        # A partial send (full socket buffer) or too many parts for one call.
        pending = [memoryview(p).cast("B") for p in parts]
        while True:
            i = 0  # drop what went out; a partial send leaves the tail of one part
            while i < len(pending) and sent >= pending[i].nbytes:
                sent -= pending[i].nbytes
                i += 1
            del pending[:i]
            if sent:
                pending[0] = pending[0][sent:]
            if not pending:
                return
            sent = sendmsg(pending[:IOV_MAX])

    def shutdown(self) -> None:
        shutdown_socket(self.sock)

    def close(self) -> None:
        self.sock.close()


class StreamConnection(SocketConnection):
    """A TLS socket: no sendmsg, so small parts are joined and sent in order."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        super().__init__(sock)

    def recv_into_nowait(self, buf: memoryview) -> int | None:
        return None  # TLS records cannot be read without blocking this way: never overlap

    def recv_into_all(self, buf: memoryview) -> int:
        return self.sock.recv_into(buf)  # TLS has no MSG_WAITALL; the loop asks again

    def send_parts(self, parts: Sequence[Any]) -> None:
        small: list[Any] = []
        for part in parts:
            if len(part) < 64 * 1024:
                small.append(part)
                continue
            if small:
                self.sock.sendall(b"".join(small))
                small.clear()
            self.sock.sendall(part)
        if small:
            self.sock.sendall(b"".join(small))


def shutdown_socket(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """Shut down a socket's descriptor without tearing down TLS: ssl.SSLSocket.shutdown
    drops the TLS session first, so replies still in flight would go out in plaintext."""
    try:
        socket.socket.shutdown(sock, how)
    except (OSError, ValueError):
        pass


def connection_for(sock: socket.socket) -> Connection:
    if isinstance(sock, ssl.SSLSocket):
        return StreamConnection(sock)
    return SocketConnection(sock)
