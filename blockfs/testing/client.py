"""A deliberately simple, blocking NBD transmission-phase client for tests.

It speaks raw bytes so tests can send anything (bad magics, unknown
commands, lies about lengths) and read exactly what came back."""

from __future__ import annotations

import socket
import struct

import attrs

from ..protocol.constants import (
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    ReplyFlag,
    ReplyType,
)
from ..protocol.transmission import encode_request


@attrs.frozen
class Reply:
    handle: int
    error: int
    data: bytes = b""
    message: str = ""


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


class RawClient:
    """Sends requests and reads replies on an already negotiated socket."""

    def __init__(self, sock: socket.socket, *, structured: bool = False) -> None:
        self.sock = sock
        self.structured = structured
        self._next_handle = 1
        self.read_lengths: dict[int, int] = {}

    def send(self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
             payload: bytes = b"", handle: int | None = None) -> int:
        if handle is None:
            handle = self._next_handle
            self._next_handle += 1
        if command == Command.READ:
            self.read_lengths[handle] = length
        self.sock.sendall(encode_request(command, handle, offset, length, flags, payload))
        return handle

    def reply(self) -> Reply:
        """Read one reply (all chunks of a structured one)."""
        head = recv_exactly(self.sock, 4)
        (magic,) = struct.unpack(">I", head)
        if magic == SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", recv_exactly(self.sock, 12))
            data = b""
            if error == 0 and handle in self.read_lengths:
                data = recv_exactly(self.sock, self.read_lengths.pop(handle))
            return Reply(handle, error, data)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise AssertionError(f"bad reply magic 0x{magic:08x}")
        return self._structured(head)

    def _structured(self, head: bytes) -> Reply:
        data = bytearray()
        while True:
            flags, rtype, handle, length = struct.unpack(">HHQI", recv_exactly(self.sock, 16))
            body = recv_exactly(self.sock, length)
            if rtype == ReplyType.OFFSET_DATA:
                data += body[8:]
            elif rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
                error, mlen = struct.unpack(">IH", body[:6])
                self.read_lengths.pop(handle, None)
                return Reply(handle, error, b"", body[6 : 6 + mlen].decode())
            if flags & ReplyFlag.DONE:
                self.read_lengths.pop(handle, None)
                return Reply(handle, 0, bytes(data))
            head = recv_exactly(self.sock, 4)
            (magic,) = struct.unpack(">I", head)
            assert magic == STRUCTURED_REPLY_MAGIC, f"bad chunk magic 0x{magic:08x}"

    def request(self, command: int, offset: int = 0, length: int = 0, **kw: object) -> Reply:
        handle = self.send(command, offset, length, **kw)  # type: ignore[arg-type]
        reply = self.reply()
        assert reply.handle == handle, (reply, handle)
        return reply

    def read(self, offset: int, length: int) -> Reply:
        return self.request(Command.READ, offset, length)

    def write(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        return self.request(Command.WRITE, offset, len(data), payload=data, flags=flags)

    def disconnect(self) -> None:
        self.send(Command.DISC)
