"""The pure transmission-phase module, byte for byte. Expected bytes are
written out by hand (hex), not produced by the module under test."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockfs.errors import ProtocolError
from blockfs.protocol.transmission import (
    CLOSED,
    NEED_DATA,
    Request,
    RequestReader,
    done_chunk,
    encode_request,
    error_chunk,
    read_chunk_header,
    simple_reply,
)

# A write of 4 bytes "abcd" at offset 0x1000, handle 0x0102030405060708, FUA flag.
WRITE = bytes.fromhex(
    "25609513"  # request magic
    "0001"  # command flags: FUA
    "0001"  # type: WRITE
    "0102030405060708"  # handle
    "0000000000001000"  # offset
    "00000004"  # length
) + b"abcd"
# A read of 512 bytes at offset 0, handle 9, flag bits 0xfff0 (unknown ones).
READ = bytes.fromhex("25609513" "fff0" "0000" "0000000000000009" "0000000000000000" "00000200")
# DISC, handle 0xffffffffffffffff.
DISC = bytes.fromhex("25609513" "0000" "0002" "ffffffffffffffff" "0000000000000000" "00000000")

EXPECTED = [
    Request(0x0102030405060708, 1, 1, 0x1000, 4),
    Request(9, 0, 0xFFF0, 0, 512),
    Request(0xFFFFFFFFFFFFFFFF, 2, 0, 0, 0),
]
STREAM = WRITE + READ + DISC


def events(reader: RequestReader) -> list[object]:
    out: list[object] = []
    while True:
        ev = reader.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            return out + [ev]
        assert isinstance(ev, Request)
        out.append(ev._replace(payload=None) if ev.payload is None else ev)


def strip(evs: list[object]) -> list[object]:
    return [e._replace(payload=None) if isinstance(e, Request) else e for e in evs]


def payloads(evs: list[object]) -> list[bytes | None]:
    return [None if e.payload is None else bytes(e.payload) for e in evs if isinstance(e, Request)]


def test_whole_buffer() -> None:
    r = RequestReader()
    r.feed(STREAM)
    evs = events(r)
    assert strip(evs) == [*EXPECTED, NEED_DATA]
    assert payloads(evs) == [b"abcd", None, None]


@pytest.mark.parametrize("buffer_size", [56, 64, 256 * 1024])
def test_one_byte_at_a_time(buffer_size: int) -> None:
    r = RequestReader(buffer_size=buffer_size)
    got: list[object] = []
    for i in range(len(STREAM)):
        r.feed(STREAM[i : i + 1])
        for e in events(r)[:-1]:
            got.append(e if e.payload is None else e._replace(payload=memoryview(bytes(e.payload))))  # type: ignore[attr-defined]
    assert strip(got) == EXPECTED
    assert payloads(got) == [b"abcd", None, None]


def test_trailing_partial_request_waits() -> None:
    r = RequestReader()
    r.feed(WRITE + READ[:10])
    evs = events(r)
    assert strip(evs) == [EXPECTED[0], NEED_DATA]
    assert r.buffered == 10
    r.feed(READ[10:])
    assert strip(events(r)) == [EXPECTED[1], NEED_DATA]


def test_clean_close_and_cut_stream() -> None:
    r = RequestReader()
    r.feed(READ)
    r.feed(b"")
    assert strip(events(r)) == [EXPECTED[1], CLOSED]
    cut = RequestReader()
    cut.feed(WRITE[:-1])
    cut.feed(b"")
    with pytest.raises(ProtocolError, match="closed in the middle of a request"):
        cut.next_event()


def test_bad_magic() -> None:
    r = RequestReader()
    r.feed(b"\x25\x60\x95\x14" + READ[4:])
    with pytest.raises(ProtocolError, match="bad request magic 0x25609514"):
        r.next_event()


def test_write_bigger_than_the_ring_gets_its_own_buffer() -> None:
    r = RequestReader(buffer_size=64)
    payload = bytes(range(256)) * 8
    blob = encode_request(1, 5, 0, len(payload), payload=payload) + READ
    r.feed(blob[:100])
    assert r.next_event() is NEED_DATA
    r.feed(blob[100:])
    evs = events(r)
    assert payloads(evs)[:1] == [payload]
    assert strip(evs)[1:] == [EXPECTED[1], NEED_DATA]


def test_receive_buffer_protocol_is_zero_copy() -> None:
    """The transport's view: write into receive_buffer(), report with received()."""
    r = RequestReader(buffer_size=128)
    src = memoryview(STREAM)
    got: list[Request] = []
    while src:
        target = r.receive_buffer()
        assert len(target) > 0
        n = min(len(target), len(src), 7)
        target[:n] = src[:n]
        r.received(n)
        src = src[n:]
        while isinstance(ev := r.next_event(), Request):
            got.append(ev._replace(payload=None if ev.payload is None else memoryview(bytes(ev.payload))))
    assert strip(got) == EXPECTED


def test_oversized_write_is_dropped_without_being_buffered() -> None:
    r = RequestReader(buffer_size=1024, max_payload=4096)
    length = 1 << 30
    r.feed(encode_request(1, 3, 0, length))
    chunk = bytes(1 << 16)
    fed = 0
    while fed < length:
        r.feed(chunk)
        fed += len(chunk)
        if fed < length:
            assert r.next_event() is NEED_DATA
        assert r.buffered <= 1024  # memory stays bounded
    r.feed(READ)
    evs = events(r)
    assert strip(evs) == [Request(3, 1, 0, 0, length, oversized=True), EXPECTED[1], NEED_DATA]


def test_reply_encoders_byte_for_byte() -> None:
    assert simple_reply(0x0102030405060708) == bytes.fromhex("67446698" "00000000" "0102030405060708")
    assert simple_reply(7, 5) == bytes.fromhex("67446698" "00000005" "0000000000000007")
    assert read_chunk_header(7, 0x2000, 512) == bytes.fromhex(
        "668e33ef" "0001" "0001" "0000000000000007" "00000208" "0000000000002000"
    )
    assert error_chunk(7, 22, "no") == bytes.fromhex(
        "668e33ef" "0001" "8001" "0000000000000007" "00000008" "00000016" "0002"
    ) + b"no"
    assert done_chunk(7) == bytes.fromhex("668e33ef" "0001" "0000" "0000000000000007" "00000000")
    assert encode_request(0, 9, 0, 512, flags=0xFFF0) == READ


def test_error_message_is_bounded() -> None:
    chunk = error_chunk(1, 5, "x" * 10000)
    (length,) = struct.unpack(">I", chunk[16:20])
    assert length == 6 + 4096 and len(chunk) == 20 + length


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_random_streams_only_raise_protocol_errors(data: bytes, step: int) -> None:
    r = RequestReader(buffer_size=128, max_payload=256)
    try:
        for i in range(0, len(data), step):
            r.feed(data[i : i + step])
            while isinstance(r.next_event(), Request):
                pass
            assert r.buffered <= 256 + 128
        r.feed(b"")
        while isinstance(r.next_event(), Request):
            pass
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**64 - 1), st.integers(0, 300)), max_size=20),
       st.integers(min_value=1, max_value=50))
def test_any_valid_stream_round_trips(reqs: list[tuple[int, int, int]], step: int) -> None:
    blob = b""
    want = []
    for i, (cmd, off, length) in enumerate(reqs):
        payload = bytes([i % 256]) * length if cmd == 1 else b""
        blob += encode_request(cmd, i, off, length, payload=payload)
        want.append((i, cmd, off, length, payload if cmd == 1 else None))
    r = RequestReader(buffer_size=64, max_payload=1024)
    got = []
    for i in range(0, len(blob), step):
        r.feed(blob[i : i + step])
        while isinstance(ev := r.next_event(), Request):
            got.append((ev.handle, ev.command, ev.offset, ev.length, None if ev.payload is None else bytes(ev.payload)))
    assert got == want
