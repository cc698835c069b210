"""send_parts: everything arrives in order, whatever the socket takes per call."""

from __future__ import annotations

import socket
import threading

from blockfs.testing.client import recv_exactly
from blockfs.transports.connection import IOV_MAX, SocketConnection


def test_partial_sends_and_more_parts_than_iov_max() -> None:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # force partial sends
    parts = [bytes([i % 251]) * (1 + i % 700) for i in range(IOV_MAX + 300)]
    parts.append(memoryview(bytes(range(256)) * 4096))  # one big part, 1 MiB
    want = b"".join(parts)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_exactly(theirs, len(want))))
    reader.start()
    try:
        SocketConnection(ours).send_parts(parts)
        reader.join(timeout=20)
        assert got and got[0] == want
    finally:
        ours.close()
        theirs.close()
