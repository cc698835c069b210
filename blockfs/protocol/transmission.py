"""The NBD transmission phase as a pure state machine: bytes in, events out,
bytes out. No sockets here (the h11 way), so every rule is testable byte for
byte.

Receiving is zero-copy: the transport asks `RequestReader.receive_buffer()`
for a writable memoryview, `recv_into`s it, and reports the count with
`received(n)`. `next_event()` then returns one `Request` at a time, or
`NEED_DATA` / `CLOSED`. A write's payload is a read-only memoryview into the
reader's own buffers: it stays valid until the next `receive_buffer()` or
`feed()`, except a payload too big for the ring (`fits_in_ring` false), which
has a buffer of its own and stays valid until the *second* next such payload
starts arriving.
"""

from __future__ import annotations

import enum
import mmap
import struct
from typing import NamedTuple

from ..errors import ProtocolError
from .constants import (
    MAX_PAYLOAD,
    REQUEST_HEADER_SIZE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    ReplyFlag,
    ReplyType,
)

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_OFFSET_DATA = struct.Struct(">IHHQIQ")  # chunk header + data offset
# The raw packers, for the serve loop's fast path (same bytes as simple_reply
# and read_chunk_header, which the tests check byte for byte).
pack_simple = _SIMPLE_REPLY.pack
pack_read_chunk = _OFFSET_DATA.pack
_ERROR_CHUNK = struct.Struct(">IHHQIIH")  # chunk header + error + message length


class Request(NamedTuple):
    """One transmission request. `command` and `flags` are the raw low and
    high 16 bits of the command word, so unknown values reach the serve loop
    (which answers them with EINVAL) instead of crashing a decoder.

    `payload` is the complete write payload, or None for other commands and
    for a write whose payload was too large to keep (`oversized` is then
    True: the bytes were read and dropped so the stream stays in sync)."""

    handle: int
    command: int
    flags: int
    offset: int
    length: int
    payload: memoryview | None = None
    oversized: bool = False


class Signal(enum.Enum):
    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA = Signal.NEED_DATA
CLOSED = Signal.CLOSED

Event = Request | Signal


class RequestReader:
    """Parses the client-to-server byte stream of the transmission phase."""

    def __init__(self, buffer_size: int = 256 * 1024, max_payload: int = MAX_PAYLOAD) -> None:
        if buffer_size < 2 * REQUEST_HEADER_SIZE:
            raise ValueError(f"buffer_size: expected at least {2 * REQUEST_HEADER_SIZE}, got {buffer_size}")
        self.max_payload = max_payload
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._payloads = self._view.toreadonly()  # handlers get read-only views
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received data
        self._eof = False
        # A write payload too big for the ring goes straight into its own
        # buffer: anonymous mmap, so pages are committed only as bytes arrive
        # (a client announcing 32 MiB and sending 1 byte pins 1 page, not 32 MiB).
        # Two of them, used in turn, so that a large payload handed out stays
        # intact while the next one is received (the serve loop overlaps them).
        self._bigs = [memoryview(b""), memoryview(b"")]
        self._big_view = self._bigs[0]
        self._big_header: Request | None = None
        self._big_filled = 0
        # An oversized write's payload is read and dropped, `_discard` bytes to go.
        self._discard = 0
        self._discard_header: Request | None = None
        # Requests parsed early by feed() to make room, handed out first.
        self._pending: list[Request] = []

    # --- receiving ----------------------------------------------------------
    def receive_buffer(self) -> memoryview:
        """Where the next `recv_into` should write. Never empty."""
        if self._big_header is not None:
            return self._big_view[self._big_filled : self._big_header.length]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < REQUEST_HEADER_SIZE or self._needs_room():
            # Move the unparsed tail to the front so a whole request fits.
            n = self._end - self._start
            self._view[:n] = self._view[self._start : self._end]
            self._start, self._end = 0, n
        return self._view[self._end :]

    def _needs_room(self) -> bool:
        """Does the partial write at the front need more room than is left?"""
        if self._end - self._start < REQUEST_HEADER_SIZE:
            return False
        _, _, command, _, _, length = _REQUEST.unpack_from(self._buf, self._start)
        return command == Command.WRITE and self._start + REQUEST_HEADER_SIZE + length > len(self._buf)

    def received(self, n: int) -> None:
        """Report that `n` bytes were written into `receive_buffer()`; 0 is end of stream."""
        if n == 0:
            self._eof = True
        elif self._big_header is not None:
            self._big_filled += n
        else:
            self._end += n

    def feed(self, data: bytes) -> None:
        """Copy `data` in (for tests and for transports that cannot `recv_into`)."""
        if not data:
            self.received(0)
            return
        mv = memoryview(data)
        while mv:
            target = self.receive_buffer()
            if not target:
                # Full of complete requests: parse them out to make room. Their
                # payloads are copied, since the ring is about to be reused.
                self._pending.extend(self._drain())
                continue
            n = min(len(target), len(mv))
            target[:n] = mv[:n]
            self.received(n)
            mv = mv[n:]

    def _drain(self) -> list[Request]:
        out = []
        while True:
            ev = self._parse()
            if not isinstance(ev, Request):
                return out
            if ev.payload is not None:
                ev = ev._replace(payload=memoryview(bytes(ev.payload)))
            out.append(ev)

    # --- parsing ------------------------------------------------------------
    def next_event(self) -> Event:
        """The next complete request, or NEED_DATA, or CLOSED at a clean end.

        Raises ProtocolError for a bad magic or a stream that ends inside a
        request; the connection cannot continue after that."""
        if self._pending:
            return self._pending.pop(0)
        return self._parse()

    def _parse(self) -> Event:
        if self._big_header is not None:
            header = self._big_header
            if self._big_filled < header.length:
                return self._closed_or_need()
            self._big_header = None
            return header._replace(payload=self._big_view[: header.length].toreadonly())
        if self._discard:
            take = min(self._discard, self._end - self._start)
            self._start += take
            self._discard -= take
            if self._discard:
                return self._closed_or_need()
            header, self._discard_header = self._discard_header, None
            assert header is not None
            return header
        available = self._end - self._start
        if available < REQUEST_HEADER_SIZE:
            if available == 0 and self._eof:
                return CLOSED
            return self._closed_or_need()
        start = self._start
        magic, flags, command, handle, offset, length = _REQUEST.unpack_from(self._buf, start)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic 0x{magic:08x} (expected 0x{REQUEST_MAGIC:08x})")
        if command != Command.WRITE:
            self._start = start + REQUEST_HEADER_SIZE
            return Request(handle, command, flags, offset, length)
        body = start + REQUEST_HEADER_SIZE
        if self._end - body >= length and length <= self.max_payload:
            # The common case: the whole write is here. One tuple, no copy.
            self._start = body + length
            return Request(handle, command, flags, offset, length, self._payloads[body : body + length])
        header = Request(handle, command, flags, offset, length)
        if length > self.max_payload:
            self._start = body
            self._discard = length
            self._discard_header = header._replace(oversized=True)
            return self._parse()
        if REQUEST_HEADER_SIZE + length <= len(self._buf):
            return self._closed_or_need()  # fits once compacted
        # Too big for the ring: give it a buffer of its own (kept for reuse).
        # The other buffer of the two: the last large payload may still be in use.
        spare = 1 if self._big_view is self._bigs[0] else 0
        if len(self._bigs[spare]) < length:
            self._bigs[spare] = memoryview(mmap.mmap(-1, length))
        self._big_view = self._bigs[spare]
        have = self._end - body
        self._big_view[:have] = self._view[body : self._end]
        self._start = self._end = 0
        self._big_header, self._big_filled = header, have
        return self._parse()

    def _closed_or_need(self) -> Event:
        if self._eof:
            raise ProtocolError("connection closed in the middle of a request")
        return NEED_DATA

    @property
    def in_large_payload(self) -> bool:
        """receive_buffer() is exactly the rest of a large write's payload."""
        return self._big_header is not None

    def fits_in_ring(self, length: int) -> bool:
        """Whether a write of `length` bytes is received into the shared ring."""
        return REQUEST_HEADER_SIZE + length <= len(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as requests (for tests/metrics)."""
        return self._end - self._start + (self._big_filled if self._big_header else 0)


# --- encoding ---------------------------------------------------------------
def encode_request(
    command: int, handle: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
) -> bytes:
    """A request as a client sends it (tests, and the hostile-client kit)."""
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length) + payload


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header; a successful read's data follows it directly."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def read_chunk_header(handle: int, offset: int, length: int, done: bool = True) -> bytes:
    """Structured reply: NBD_REPLY_TYPE_OFFSET_DATA header; `length` data bytes follow."""
    return _OFFSET_DATA.pack(
        STRUCTURED_REPLY_MAGIC,
        ReplyFlag.DONE if done else 0,
        ReplyType.OFFSET_DATA,
        handle,
        8 + length,
        offset,
    )


def error_chunk(handle: int, error: int, message: str = "") -> bytes:
    """Structured reply: a final NBD_REPLY_TYPE_ERROR chunk with a message."""
    text = message.encode("utf-8")[:4096]
    return (
        _ERROR_CHUNK.pack(
            STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.ERROR, handle, 6 + len(text), error, len(text)
        )
        + text
    )


def done_chunk(handle: int) -> bytes:
    """Structured reply: NBD_REPLY_TYPE_NONE with DONE (success, no data)."""
    return _CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.NONE, handle, 0)
