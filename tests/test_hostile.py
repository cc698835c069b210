"""A malicious client against a real `blockfs.Server`, on a Unix socket and
on TCP: garbage, lies about lengths, abrupt disconnects, idling, floods.

After each attack the server must still serve a well-behaved client (GO with
structured replies, write then read back a pattern), its memory and thread
count must stay bounded, and the misbehaviour must be logged as a warning or
an info line, never as an exception with a traceback. Every socket has a
timeout, so a server bug shows up as a failure, not as a hung test."""

from __future__ import annotations

import errno
import logging
import os
import random
import resource
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockfs
from blockfs import Server
from blockfs.errors import HandshakeError, ProtocolError
from blockfs.protocol.constants import (
    MAX_PAYLOAD,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
)
from blockfs.protocol.handshake import NEED_DATA, Negotiated, ServerHandshake, StartTLS
from blockfs.protocol.transmission import Request, RequestReader, encode_request
from blockfs.testing.client import RawClient, recv_exactly
from blockfs.testing.devices import FaultyDisk, MemoryDisk
from blockfs.testing.hostile import (
    DEFAULT_FLAGS,
    ExportInfo,
    HostileClient,
    OptReply,
    connect,
    encode_option,
    go_data,
    wait_closed,
)

BS = 4096
BLOCKS = 64
SIZE = BS * BLOCKS
BAD_BLOCK = 5  # reading it raises OSError(EIO)
BUGGY_BLOCK = 6  # reading it raises ValueError (a handler bug)
MiB = 1024 * 1024
RSS_BOUND = 50 * MiB
FOUR_GIB = 0xFFFFFFFF


def Disk() -> FaultyDisk:
    return FaultyDisk(SIZE, BS, bad={BAD_BLOCK}, buggy={BUGGY_BLOCK})


# --- measuring ------------------------------------------------------------------
def rss() -> int:
    """This process's resident set size in bytes (the server runs in it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Memory:
    """Memory growth over an attack, two ways: VmRSS (what the brief bounds)
    and tracemalloc's peak of Python allocations (not masked by memory an
    earlier test freed and the allocator kept, which RSS would not show)."""

    def __enter__(self) -> Memory:
        self.started = not tracemalloc.is_tracing()
        if self.started:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self.traced0 = tracemalloc.get_traced_memory()[0]
        self.rss0 = rss()
        self.rss = self.peak = 0
        return self

    def sample(self) -> None:
        self.rss = max(self.rss, rss() - self.rss0)
        self.peak = max(self.peak, tracemalloc.get_traced_memory()[1] - self.traced0)

    def __exit__(self, *exc: object) -> None:
        self.sample()
        if self.started:
            tracemalloc.stop()

    def check(self, what: str) -> None:
        print(f"{what}: RSS +{self.rss / MiB:.1f} MiB, Python allocations peak +{self.peak / MiB:.1f} MiB")
        assert self.rss < RSS_BOUND and self.peak < RSS_BOUND, (
            f"{what}: RSS grew by {self.rss / MiB:.1f} MiB, Python allocations peaked at "
            f"+{self.peak / MiB:.1f} MiB (bound {RSS_BOUND / MiB:.0f} MiB)"
        )


def wait_until(condition: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def wait_clients(server: Server, n: int, timeout: float = 3.0) -> None:
    wait_until(lambda: len(server._clients) == n, timeout, f"{n} clients (have {len(server._clients)})")


def tracebacks(caplog: pytest.LogCaptureFixture, allow: tuple[str, ...] = ()) -> list[logging.LogRecord]:
    """blockfs log records that carry an exception or are errors (minus allowed loggers)."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("blockfs")
        and r.name not in allow
        and (r.exc_info is not None or r.levelno >= logging.ERROR)
    ]


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture, allow: tuple[str, ...] = ()) -> None:
    bad = tracebacks(caplog, allow)
    assert not bad, "unexpected errors/tracebacks logged:\n" + "\n".join(
        f"{r.name} {r.levelname}: {r.getMessage()}" for r in bad[:5]
    )


def warned(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(r.levelno == logging.WARNING and text in r.getMessage() for r in caplog.records)


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send, tolerating the server having already hung up; False if it had."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def send_stream(sock: socket.socket, total: int, chunk: int = MiB) -> bool:
    """Send `total` filler bytes without holding them in memory at once."""
    block = b"\xa5" * chunk
    while total > 0:
        n = min(total, chunk)
        if not send_quietly(sock, block[:n]):
            return False
        total -= n
    return True


def read_chunks(sock: socket.socket) -> list[tuple[int, int, int, bytes]]:
    """Raw structured reply chunks up to the one with DONE: (flags, type, handle, body)."""
    chunks = []
    while True:
        magic, flags, rtype, handle, length = struct.unpack(">IHHQI", recv_exactly(sock, 20))
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic 0x{magic:08x}"
        assert length < 4 * MiB, f"unexpectedly long chunk ({length} bytes)"
        chunks.append((flags, rtype, handle, recv_exactly(sock, length)))
        if flags & ReplyFlag.DONE:
            return chunks


# --- the server and a well-behaved client ------------------------------------------------
@pytest.fixture(params=["unix", "tcp"])
def make_server(
    request: pytest.FixtureRequest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> Iterator[Callable[..., Server]]:
    """make_server(device=None, **Server kwargs): a started Server serving {"disk": device or Disk()}."""
    caplog.set_level(logging.INFO, logger="blockfs")
    servers: list[Server] = []

    def make(device: object = None, **kwargs: object) -> Server:
        if request.param == "unix":
            address = str(tmp_path / f"nbd{len(servers)}.sock")
        else:
            address = "127.0.0.1:0"
        server = Server({"disk": device or Disk()}, address, **kwargs).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()


def negotiated(server: Server, *, structured: bool = True) -> tuple[HostileClient, RawClient]:
    c = HostileClient.connect(server.address)
    try:
        info = c.negotiate("disk", structured=structured)
        assert info.size == server.exports["disk"].export.size
    except BaseException:
        c.close()
        raise
    return c, c.transmission()


def pattern(seed: int, n: int = 2 * BS) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def check_good_client(server: Server, seed: int = 1) -> None:
    """A well-behaved client: GO with structured replies, write, read back, DISC."""
    c, raw = negotiated(server)
    with c:
        offset = (seed % 3) * BS  # within blocks 0..3, clear of BAD_BLOCK and BUGGY_BLOCK
        data = pattern(seed)
        assert raw.write(offset, data).error == 0
        got = raw.read(offset, len(data))
        assert got.error == 0 and got.data == data
        raw.disconnect()
        assert c.wait_closed() == b""


def check_still_works(raw: RawClient, seed: int) -> None:
    data = pattern(seed, 512)
    offset = 8 * BS + (seed % 8) * 512
    assert raw.write(offset, data).error == 0
    r = raw.read(offset, len(data))
    assert r.error == 0 and r.data == data


def healthy(server: Server, caplog: pytest.LogCaptureFixture, clients: int = 0,
            allow: tuple[str, ...] = ()) -> None:
    """After an attack: the attacker's connection is cleaned up, a good client
    works, and nothing was logged as an exception."""
    wait_clients(server, clients)
    check_good_client(server)
    wait_clients(server, clients)
    assert_no_tracebacks(caplog, allow)


# --- garbage ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "garbage",
    [
        b"\xde\xad\xbe\xef",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x00\x00\x00" + b"IHAVEOPT",  # no FIXED_NEWSTYLE: we only speak fixed newstyle
        bytes(range(256)) * 256,  # 64 KiB
    ],
    ids=["deadbeef", "http", "zero-flags", "64k"],
)
def test_garbage_instead_of_client_flags(server: Server, caplog: pytest.LogCaptureFixture, garbage: bytes) -> None:
    with HostileClient.connect(server.address) as c:
        c.read_greeting()
        send_quietly(c.sock, garbage)
        assert c.wait_closed() == b""
    assert warned(caplog, "handshake failed")
    healthy(server, caplog)


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0xFFFFFFFF, DEFAULT_FLAGS | 1 << 7])
def test_unknown_client_flag_bits_drop_the_connection(
    server: Server, caplog: pytest.LogCaptureFixture, flags: int
) -> None:
    with HostileClient.connect(server.address) as c:
        c.read_greeting()
        c.send_flags(flags)
        send_quietly(c.sock, encode_option(Option.GO, go_data("disk")))
        assert c.wait_closed() == b""  # the spec: MUST drop; no reply to the GO
    assert warned(caplog, "unknown client flags")
    healthy(server, caplog)


@pytest.mark.parametrize(
    "after_flags",
    [
        encode_option(Option.GO, go_data("disk"), magic=0x1122334455667788),
        b"IHAVEOP",  # short, then garbage
        random.Random(1234).randbytes(4096),
    ],
    ids=["bad-magic", "truncated-magic", "random"],
)
def test_garbage_during_option_haggling(
    server: Server, caplog: pytest.LogCaptureFixture, after_flags: bytes
) -> None:
    with HostileClient.connect(server.address) as c:
        c.hello()
        reply = c.info("disk")  # one valid option first
        assert isinstance(reply, ExportInfo)
        stream = after_flags if len(after_flags) >= 16 else after_flags + b"\xff" * 16
        if stream.startswith(b"IHAVEOPT"):
            stream = b"X" + stream  # make sure random bytes are not accidentally valid
        send_quietly(c.sock, stream)
        assert c.wait_closed() == b""
    assert warned(caplog, "bad option magic")
    healthy(server, caplog)


# --- oversized options --------------------------------------------------------------
OVERSIZED = [
    (Option.GO, OptionReply.ERR_TOO_BIG),
    (Option.INFO, OptionReply.ERR_TOO_BIG),
    (0x1234, OptionReply.ERR_UNSUP),
    (Option.SET_META_CONTEXT, OptionReply.ERR_UNSUP),
    (Option.LIST, OptionReply.ERR_INVALID),
    (Option.STRUCTURED_REPLY, OptionReply.ERR_INVALID),
    (Option.STARTTLS, OptionReply.ERR_POLICY),
]


@pytest.mark.parametrize("option,expected", OVERSIZED, ids=[str(o) for o, _ in OVERSIZED])
def test_oversized_option_is_skipped_not_buffered(
    server: Server, caplog: pytest.LogCaptureFixture, option: int, expected: int
) -> None:
    """80 MiB of option data is read and dropped; the answer comes after it,
    the connection stays in sync, and GO then works on it."""
    length = 80 * MiB
    with HostileClient.connect(server.address) as c, Memory() as memory:
        c.hello()
        c.send_option(option, length=length)
        assert send_stream(c.sock, length)
        r = c.read_reply()
        memory.sample()
        assert (r.option, r.type) == (option, expected)
        info = c.go("disk")
        assert isinstance(info, ExportInfo) and info.size == SIZE
        check_still_works(c.transmission(), 3)
    memory.check(f"skipping 80 MiB of option {option}")
    healthy(server, caplog)


@pytest.mark.parametrize("option", [Option.GO, Option.INFO, 0x1234, Option.LIST], ids=str)
@pytest.mark.parametrize("then", ["disconnect", "reset", "stall"])
def test_four_gib_option_then_client_gives_up(
    make_server: Callable[..., Server], caplog: pytest.LogCaptureFixture, option: int, then: str
) -> None:
    """A 4 GiB option, 64 MiB of it sent, then the client vanishes (or goes
    silent: the handshake timeout drops it). Nothing is buffered."""
    server = make_server(handshake_timeout=0.5)
    c = HostileClient.connect(server.address)
    try:
        with Memory() as memory:
            c.hello()
            c.send_option(option, length=FOUR_GIB)
            assert send_stream(c.sock, 64 * MiB)
        if then == "stall":
            start = time.monotonic()
            assert c.wait_closed(timeout=2.0) == b""
            assert time.monotonic() - start < 2.0
    finally:
        if then == "reset":
            c.reset()
        else:
            c.close()
    memory.check(f"64 MiB of a 4 GiB option {option}")
    healthy(server, caplog)


def test_four_gib_export_name_is_refused_on_the_header(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    with HostileClient.connect(server.address) as c:
        c.hello()
        c.send_option(Option.EXPORT_NAME, length=FOUR_GIB)
        send_stream(c.sock, 4 * MiB)
        assert c.wait_closed() == b""
    assert warned(caplog, "NBD_OPT_EXPORT_NAME")
    healthy(server, caplog)


# --- transmission: lengths, ranges, commands, flags ----------------------------------
@pytest.fixture(params=[False, True], ids=["simple", "structured"])
def structured(request: pytest.FixtureRequest) -> bool:
    return request.param  # type: ignore[no-any-return]


def error_of(raw: RawClient, command: int, offset: int, length: int, *, flags: int = 0,
             payload: bytes = b"") -> int:
    """Send one request and return its errno, checking that no data came with an error."""
    handle = raw.send(command, offset, length, flags=flags, payload=payload)
    raw.read_lengths.pop(handle, None)  # never let a bogus reply make us read gigabytes
    if raw.structured:
        chunks = read_chunks(raw.sock)
        assert all(c[2] == handle for c in chunks)
        types = [c[1] for c in chunks]
        if any(t in (ReplyType.ERROR, ReplyType.ERROR_OFFSET) for t in types):
            assert types == [ReplyType.ERROR], f"an error must be the only chunk, got {types}"
            (err,) = struct.unpack_from(">I", chunks[0][3])
            return err
        return 0
    magic, err, got = struct.unpack(">IIQ", recv_exactly(raw.sock, 16))
    assert got == handle
    return err


def test_four_gib_read_is_refused(server: Server, caplog: pytest.LogCaptureFixture, structured: bool) -> None:
    c, raw = negotiated(server, structured=structured)
    with c:
        with Memory() as memory:
            assert error_of(raw, Command.READ, 0, FOUR_GIB) in (errno.EOVERFLOW, errno.EINVAL)
            assert error_of(raw, Command.READ, SIZE, FOUR_GIB) in (errno.EOVERFLOW, errno.EINVAL)
            assert error_of(raw, Command.READ, 0, MAX_PAYLOAD + 1) in (errno.EOVERFLOW, errno.EINVAL)
        memory.check("4 GiB reads")
        check_still_works(raw, 4)
    healthy(server, caplog)


@pytest.mark.parametrize("then", ["disconnect", "reset"])
def test_four_gib_write_then_client_vanishes(
    server: Server, caplog: pytest.LogCaptureFixture, then: str
) -> None:
    c, raw = negotiated(server)
    with Memory() as memory:
        raw.send(Command.WRITE, 0, FOUR_GIB)
        assert send_stream(c.sock, 64 * MiB)
    wait_clients(server, 1)  # still connected, reading and dropping
    c.reset() if then == "reset" else c.close()
    memory.check("64 MiB of a 4 GiB write")
    healthy(server, caplog)


RANGES = [
    (Command.READ, SIZE, 1, errno.EINVAL),
    (Command.READ, SIZE - 1, 2, errno.EINVAL),
    (Command.READ, 2**63, BS, errno.EINVAL),
    (Command.READ, 2**64 - 1, 1, errno.EINVAL),  # offset + length overflows 64 bits
    (Command.READ, 2**64 - BS, 2 * BS, errno.EINVAL),
    (Command.WRITE, SIZE, 1, errno.ENOSPC),
    (Command.WRITE, 2**64 - 1, 16, errno.ENOSPC),
    (Command.WRITE_ZEROES, 2**64 - 1, 2, errno.ENOSPC),
    (Command.TRIM, 2**64 - BS, 2 * BS, errno.EINVAL),
    (Command.READ, 0, 0, errno.EINVAL),
]


@pytest.mark.parametrize("command,offset,length,expected", RANGES)
def test_requests_out_of_range(
    server: Server, caplog: pytest.LogCaptureFixture, structured: bool,
    command: int, offset: int, length: int, expected: int,
) -> None:
    c, raw = negotiated(server, structured=structured)
    with c:
        payload = b"w" * length if command == Command.WRITE else b""
        assert error_of(raw, command, offset, length, payload=payload) == expected
        check_still_works(raw, 5)
        raw.disconnect()
        assert c.wait_closed() == b""
    healthy(server, caplog)


UNKNOWN = [
    (Command.CACHE, 0, 0, BS),
    (Command.BLOCK_STATUS, 0, 0, BS),
    (Command.RESIZE, 0, 0, 0),
    (99, 0, 0, BS),
    (0xFFFF, 0, 0, FOUR_GIB),
    (Command.READ, 1 << 9, 0, BS),  # unknown flag bit
    (Command.READ, 0xFFFF, 0, BS),
    (Command.READ, int(CommandFlag.FUA), 0, BS),  # a known flag not allowed on a read
    (Command.FLUSH, int(CommandFlag.FUA), 0, 0),
    (Command.WRITE, 1 << 12, 0, 64),  # the payload must still be consumed
    (Command.TRIM, int(CommandFlag.NO_HOLE), 0, BS),
]


@pytest.mark.parametrize("command,flags,offset,length", UNKNOWN)
def test_unknown_commands_and_flags_get_einval(
    server: Server, caplog: pytest.LogCaptureFixture, structured: bool,
    command: int, flags: int, offset: int, length: int,
) -> None:
    c, raw = negotiated(server, structured=structured)
    with c:
        payload = b"u" * length if command == Command.WRITE else b""
        assert error_of(raw, command, offset, length, flags=flags, payload=payload) == errno.EINVAL
        if command == Command.WRITE:
            assert raw.read(0, length).data == bytes(length)  # refused, not applied
        check_still_works(raw, 6)
    healthy(server, caplog)


@pytest.mark.parametrize(
    "header",
    [bytes(28), struct.pack(">IIQ", 0x67446698, 0, 1) + bytes(12), b"\xff" * 28],
    ids=["zeroes", "reply-magic", "ones"],
)
def test_bad_request_magic_closes_only_that_connection(
    server: Server, caplog: pytest.LogCaptureFixture, header: bytes
) -> None:
    gc_, good = negotiated(server)
    with gc_:
        check_still_works(good, 7)
        c, raw = negotiated(server)
        with c:
            check_still_works(raw, 8)
            c.send(header)
            assert c.wait_closed() == b""
        wait_clients(server, 1)
        check_still_works(good, 9)
        assert warned(caplog, "bad request magic")
        healthy(server, caplog, clients=1)
        check_still_works(good, 10)


# --- idling, vanishing -------------------------------------------------------------------
def test_write_payload_that_never_arrives(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    gc_, good = negotiated(server)
    with gc_:
        c, raw = negotiated(server)
        raw.send(Command.WRITE, 0, 64 * 1024)
        c.send(b"p" * 100)
        # That connection just waits for the rest: no reply, no close.
        c.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.sock.recv(1)
        wait_clients(server, 2)
        check_still_works(good, 11)
        check_good_client(server, 2)
        wait_clients(server, 2)
        c.close()  # the server sees the stream cut inside the request and cleans up
        wait_clients(server, 1)
        check_still_works(good, 12)
    healthy(server, caplog)
    assert warned(caplog, "in the middle of a request")


def test_idle_big_write_headers_do_not_commit_memory(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """Four clients each declare a MAX_PAYLOAD write and send one byte of it.
    112 bytes from the attackers must not pin 4 x 32 MiB of server memory."""
    clients = []
    try:
        with Memory() as memory:
            for _ in range(4):
                c, raw = negotiated(server)
                clients.append(c)
                raw.send(Command.WRITE, 0, MAX_PAYLOAD)
                c.send(b"x")
            wait_clients(server, 4)
            time.sleep(0.2)  # let the server threads take the headers
    finally:
        for c in clients:
            c.close()
    wait_clients(server, 0)
    memory.check("4 idle MAX_PAYLOAD write headers (112 bytes sent)")
    healthy(server, caplog)


def _to_greeting(c: HostileClient) -> None:
    c.read_greeting()


def _mid_flags(c: HostileClient) -> None:
    c.read_greeting()
    c.send(b"\x00\x00")


def _mid_option_header(c: HostileClient) -> None:
    c.hello()
    c.send(encode_option(Option.GO, go_data("disk"))[:10])


def _mid_option_data(c: HostileClient) -> None:
    c.hello()
    c.send(encode_option(Option.GO, go_data("disk") + bytes(100), length=200)[:16 + 20])


def _mid_request_header(c: HostileClient) -> None:
    c.negotiate("disk")
    c.send(encode_request(Command.READ, 1, 0, BS)[:10])


def _mid_write_payload(c: HostileClient) -> None:
    c.negotiate("disk")
    c.send(encode_request(Command.WRITE, 1, 0, 64 * 1024) + b"x" * 1000)


def _mid_big_write_payload(c: HostileClient) -> None:
    c.negotiate("disk")
    c.send(encode_request(Command.WRITE, 1, 0, MiB) + b"x" * (300 * 1024))  # bigger than the ring


def _unread_replies(c: HostileClient) -> None:
    c.negotiate("disk", structured=False)
    c.send(b"".join(encode_request(Command.READ, h, 0, 4 * BS) for h in range(800)))  # 12.5 MiB of replies
    time.sleep(0.1)


STAGES = [_to_greeting, _mid_flags, _mid_option_header, _mid_option_data, _mid_request_header,
          _mid_write_payload, _mid_big_write_payload, _unread_replies]


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("stage", STAGES, ids=[f.__name__.strip("_") for f in STAGES])
def test_abrupt_disconnect(
    server: Server, caplog: pytest.LogCaptureFixture, stage: Callable[[HostileClient], None], how: str
) -> None:
    gc_, good = negotiated(server)
    with gc_:
        c = HostileClient.connect(server.address)
        try:
            stage(c)
            wait_clients(server, 2)
        finally:
            c.reset() if how == "reset" else c.close()
        wait_clients(server, 1)
        check_still_works(good, 13)
        healthy(server, caplog, clients=1)


@pytest.mark.parametrize("stage", ["silent", "after-greeting-flags", "mid-option", "after-info"])
def test_silent_client_is_dropped_after_the_handshake_timeout(
    make_server: Callable[..., Server], caplog: pytest.LogCaptureFixture, stage: str
) -> None:
    server = make_server(handshake_timeout=0.5)
    with HostileClient.connect(server.address) as c:
        if stage != "silent":
            c.hello()
        if stage == "mid-option":
            c.send(encode_option(Option.GO, go_data("disk"))[:20])
        if stage == "after-info":
            assert isinstance(c.info("disk"), ExportInfo)
        start = time.monotonic()
        c.wait_closed(timeout=2.0)  # (the greeting may still be unread for "silent")
        elapsed = time.monotonic() - start
    assert 0.3 < elapsed < 2.0
    assert warned(caplog, "no handshake within")
    healthy(server, caplog)


def test_trickling_client_is_dropped_after_the_handshake_timeout(
    make_server: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    """Slowloris: a valid handshake, one byte every 0.25 s. handshake_timeout
    must bound the whole handshake, not each recv(), or such clients hold a
    max_clients slot forever."""
    server = make_server(handshake_timeout=0.5)
    with HostileClient.connect(server.address) as c:
        c.read_greeting()
        stream = struct.pack(">I", DEFAULT_FLAGS) + encode_option(Option.LIST) * 1000
        start = time.monotonic()
        closed = False
        for byte in stream:
            if time.monotonic() - start > 2.5:
                break
            if not send_quietly(c.sock, bytes([byte])):
                closed = True
                break
            c.sock.settimeout(0.25)
            try:
                while c.sock.recv(65536):
                    pass
                closed = True
                break
            except (TimeoutError, socket.timeout):
                pass
            except ConnectionResetError:
                closed = True
                break
        elapsed = time.monotonic() - start
    assert closed and elapsed < 2.5, (
        f"a client sending one byte per 0.25 s was still connected after {elapsed:.1f} s "
        f"(handshake_timeout=0.5)"
    )
    healthy(server, caplog)


def test_client_that_never_reads_does_not_block_server_close(
    make_server: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    """A client asks for 12.5 MiB and reads none of it: the server's thread
    blocks in send. close() must still end that connection promptly."""
    server = make_server()
    c, raw = negotiated(server, structured=False)
    try:
        c.send(b"".join(encode_request(Command.READ, h, 0, 4 * BS) for h in range(800)))
        time.sleep(0.3)  # the server is now blocked sending
        closer = threading.Thread(target=server.close, daemon=True)
        start = time.monotonic()
        closer.start()
        closer.join(timeout=3.0)
        took = time.monotonic() - start
        stuck = closer.is_alive()
    finally:
        c.reset()  # unblocks the server's send if close() could not
    closer.join(timeout=10)
    assert not stuck, f"Server.close() was still waiting after {took:.1f} s for a client that does not read"


SLOW_SIZE = 2 * MiB


@blockfs.device(block_size=BS, blocks=SLOW_SIZE // BS, concurrency=2)
class SlowThreadedDisk(MemoryDisk):
    """A concurrent device slower than the network: 10 ms per write."""

    def __init__(self) -> None:
        super().__init__(SLOW_SIZE, BS)

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        time.sleep(0.01)
        super().write(offset, data)


@blockfs.device(block_size=BS, blocks=SLOW_SIZE // BS, concurrency=2)
class SlowAsyncDisk:
    def __init__(self) -> None:
        self.data = bytearray(SLOW_SIZE)

    @blockfs.on_read
    async def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset : offset + len(buf)]

    @blockfs.on_write
    async def write(self, offset: int, data: memoryview) -> None:
        import asyncio

        await asyncio.sleep(0.01)
        self.data[offset : offset + len(data)] = data


@pytest.mark.parametrize("device", [SlowThreadedDisk, SlowAsyncDisk], ids=["threads", "async"])
def test_pipelined_writes_to_a_slow_concurrent_device_are_not_all_buffered(
    make_server: Callable[..., Server], caplog: pytest.LogCaptureFixture, device: type
) -> None:
    """120 pipelined writes of 1 MiB each, faster than the device
    takes them: the server must stop reading (backpressure), not queue a copy
    of every payload for the workers."""
    server = make_server(device())
    c, raw = negotiated(server, structured=False)
    try:
        blob = encode_request(Command.WRITE, 1, 0, MiB) + b"w" * MiB
        with Memory() as memory:
            for _ in range(120):
                c.send(blob)  # the device needs >= 0.6 s for these; the socket takes them in a blink
            memory.sample()
        replies = [raw.reply() for _ in range(3)]
        assert all(r.error == 0 for r in replies), replies  # the writes are being served
    finally:
        c.reset()
    wait_clients(server, 0, timeout=5.0)  # in-flight writes finish first
    memory.check("120 MiB of pipelined writes to a slow concurrent device")
    healthy(server, caplog)


# --- floods and limits ------------------------------------------------------------------
def _cycle(server: Server, i: int) -> None:
    kind = i % 3
    if kind == 0:
        connect(server.address).close()
    elif kind == 1:
        with HostileClient.connect(server.address) as c:
            c.hello()
            ack = c.abort()
            assert ack.type == OptionReply.ACK
            c.wait_closed()
    else:
        with HostileClient.connect(server.address) as c:
            c.negotiate("disk", structured=bool(i % 2))
            c.transmission().disconnect()
            assert c.wait_closed() == b""


def test_a_thousand_connect_disconnect_cycles(
    server: Server, caplog: pytest.LogCaptureFixture, record_property: Callable[[str, object], None]
) -> None:
    caplog.set_level(logging.WARNING, logger="blockfs")  # keep 3000 info lines out of the RSS numbers
    for i in range(60):  # warm up allocator arenas and caches
        _cycle(server, i)
    wait_clients(server, 0)
    time.sleep(0.05)
    threads_before = threading.active_count()
    rss_before = rss()
    start = time.monotonic()
    for i in range(1000):
        _cycle(server, i)
    took = time.monotonic() - start
    wait_clients(server, 0)
    wait_until(lambda: threading.active_count() <= threads_before, 3.0,
               f"threads to end (have {threading.active_count()}, baseline {threads_before})")
    grown = rss() - rss_before
    record_property("rss_growth_mib", round(grown / MiB, 1))
    record_property("seconds", round(took, 2))
    print(f"1000 cycles in {took:.2f} s; RSS {rss_before / MiB:.1f} -> {rss() / MiB:.1f} MiB; "
          f"threads {threads_before} -> {threading.active_count()}")
    assert grown < 32 * MiB, f"RSS grew by {grown / MiB:.1f} MiB over 1000 connections"
    assert server.connections_served >= 1060 * 2 // 3  # refusals (kind 0 racing) are allowed
    healthy(server, caplog)


def test_more_clients_than_max_clients(make_server: Callable[..., Server], caplog: pytest.LogCaptureFixture) -> None:
    server = make_server(max_clients=4)
    clients = [negotiated(server) for _ in range(4)]
    try:
        wait_clients(server, 4)
        start = time.monotonic()
        with HostileClient.connect(server.address) as fifth:
            assert fifth.wait_closed(timeout=2.0) == b""  # no greeting: refused
        assert time.monotonic() - start < 2.0
        assert warned(caplog, "max_clients=4")
        for i, (_, raw) in enumerate(clients):
            check_still_works(raw, 20 + i)
        clients.pop(0)[0].close()
        wait_clients(server, 3)
        check_good_client(server, 3)  # a slot is free again
        wait_clients(server, 3)
        for i, (_, raw) in enumerate(clients):
            check_still_works(raw, 30 + i)
    finally:
        for c, _ in clients:
            c.close()
    healthy(server, caplog)


def test_fd_exhaustion_does_not_spin_the_accept_loop(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """accept() failing with EMFILE leaves the connection queued: retrying at
    once spins a CPU and logs a traceback per try. The loop must back off."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    client = None
    failures = 0

    def count_and_drop(record: logging.LogRecord) -> bool:
        nonlocal failures
        if record.getMessage().startswith("accept failed"):
            failures += 1
            return False  # thousands of tracebacks would drown the report
        return True

    server_log = logging.getLogger("blockfs.server")
    server_log.addFilter(count_and_drop)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        os.close(fillers.pop())  # exactly one free descriptor: the client's socket
        client = connect(server.address)  # queued; the server's accept() gets EMFILE
        time.sleep(0.3)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            if client is not None:
                with HostileClient(client) as c:
                    c.read_greeting()  # served once descriptors are available again
                    c.send_flags()
                    c.abort()
        finally:
            server_log.removeFilter(count_and_drop)
    assert failures <= 20, f"accept() was retried {failures} times in 0.3 s, each logged with a traceback"
    healthy(server, caplog)


# --- structured replies and exports ---------------------------------------------------------
def test_structured_failing_read_gets_one_error_chunk_and_no_data(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    c, raw = negotiated(server, structured=True)
    with c:
        for offset, length, expected in [
            (BAD_BLOCK * BS, BS, errno.EIO),  # OSError(EIO) from the handler
            (BAD_BLOCK * BS - 512, 1024, errno.EIO),  # a read that only touches the bad block
            (BUGGY_BLOCK * BS, BS, errno.EIO),  # a handler bug: EIO, traceback logged
            (SIZE - 512, 1024, errno.EINVAL),  # past the end
            (SIZE, BS, errno.EINVAL),
        ]:
            handle = raw.send(Command.READ, offset, length)
            raw.read_lengths.pop(handle)
            chunks = read_chunks(c.sock)
            assert [(f, t, h) for f, t, h, _ in chunks] == [(ReplyFlag.DONE, ReplyType.ERROR, handle)], chunks
            err, mlen = struct.unpack_from(">IH", chunks[0][3])
            assert err == expected and len(chunks[0][3]) == 6 + mlen
            check_still_works(raw, offset % 97)
    healthy(server, caplog, allow=("blockfs.handlers",))
    assert any(r.name == "blockfs.handlers" and r.exc_info for r in caplog.records)  # the ValueError
    assert_no_tracebacks(caplog, allow=("blockfs.handlers",))


def test_export_name_with_unknown_name_closes(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    for name in ["nope", "\u00e9", "disk\0", "x" * 4096]:
        with HostileClient.connect(server.address) as c:
            c.hello()
            c.send_option(Option.EXPORT_NAME, name.encode("utf-8"))
            assert c.wait_closed() == b""
    with HostileClient.connect(server.address) as c:
        c.hello()
        c.send_option(Option.EXPORT_NAME, b"\xff\xfe")  # not UTF-8
        assert c.wait_closed() == b""
    healthy(server, caplog)


def test_info_and_go_on_unknown_export_then_go_on_the_right_one(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with HostileClient.connect(server.address) as c:
        c.hello()
        assert c.structured_reply().type == OptionReply.ACK
        for option in (Option.INFO, Option.GO):
            for name in ["nope", "DISK", "x" * 4096]:
                r = c.info_or_go(option, name)
                assert isinstance(r, OptReply) and r.type == OptionReply.ERR_UNKNOWN, r
        r = c.info_or_go(Option.GO, b"\xff")  # not UTF-8
        assert isinstance(r, OptReply) and r.type == OptionReply.ERR_INVALID
        info = c.go("disk")
        assert isinstance(info, ExportInfo) and info.size == SIZE
        check_still_works(c.transmission(), 40)
    healthy(server, caplog)


# --- property-based: random streams through real sockets ----------------------------------------
@st.composite
def option_piece(draw: st.DrawFn) -> bytes:
    number = draw(st.sampled_from([*range(0, 12), 99, 2**31, 2**32 - 1]))
    if draw(st.booleans()):
        data = go_data(draw(st.sampled_from(["", "disk", "nope"])), draw(st.lists(st.integers(0, 4), max_size=3)))
    else:
        data = draw(st.binary(max_size=40))
    length = draw(st.one_of(st.just(len(data)), st.just(len(data)), st.integers(0, 2**32 - 1)))
    magic = draw(st.sampled_from([0x49484156454F5054] * 9 + [0]))
    return encode_option(number, data, length=length, magic=magic)


@st.composite
def request_piece(draw: st.DrawFn) -> bytes:
    command = draw(st.sampled_from([*range(0, 9), 99, 0xFFFF]))
    flags = draw(st.sampled_from([0, 0, 1, 2, 1 << 15, 0xFFFF]))
    offset = draw(st.sampled_from([0, BS, BAD_BLOCK * BS, SIZE - 1, SIZE, 2**63, 2**64 - 1]))
    length = draw(st.sampled_from([0, 1, 512, BS, SIZE, MAX_PAYLOAD + 1, FOUR_GIB]))
    handle = draw(st.integers(0, 2**64 - 1))
    payload = b""
    if command == Command.WRITE:
        payload = b"\x5a" * draw(st.sampled_from([length, 0, min(length, 100)]) if length <= SIZE else st.just(0))
    return encode_request(command, handle, offset, length, flags, payload)


def _prefix(structured: bool) -> bytes:
    out = struct.pack(">I", DEFAULT_FLAGS)
    if structured:
        out += encode_option(Option.STRUCTURED_REPLY)
    return out + encode_option(Option.GO, go_data("disk"))


prefixes = st.one_of(
    st.builds(_prefix, st.booleans()),
    st.sampled_from([struct.pack(">I", f) for f in (1, 3)]),
    st.binary(min_size=0, max_size=8),
)
streams = st.tuples(
    prefixes,
    st.lists(st.one_of(option_piece(), request_piece(), st.binary(max_size=64)), max_size=8),
)


def throw_stream(server: Server, prefix: bytes, pieces: list[bytes]) -> None:
    """Send a stream after the server's greeting, end it, and wait for the server to hang up."""
    with connect(server.address, timeout=5.0) as sock:
        recv_exactly(sock, 18)
        if send_quietly(sock, prefix + b"".join(pieces)):
            try:
                sock.shutdown(socket.SHUT_WR)  # the server sees the end of the stream
            except OSError:
                pass
        wait_closed(sock, timeout=5.0)  # the server answers what it can, then closes


def test_random_streams_over_a_real_socket(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """One server takes 100 random streams (after a valid or a random
    greeting reply); each connection ends, none logs a traceback, and a good
    client works after the whole run."""
    for prefix, pieces in [  # a few known-nasty ones first
        (_prefix(True), [encode_request(Command.READ, 1, 0, FOUR_GIB)]),
        (struct.pack(">I", 1), [encode_option(7, b"x", length=FOUR_GIB)]),
        (_prefix(False), [encode_request(Command.WRITE, 2, SIZE - 1, MAX_PAYLOAD, 0, b"z" * 77)]),
    ]:
        throw_stream(server, prefix, pieces)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(stream=streams)
    def attack(stream: tuple[bytes, list[bytes]]) -> None:
        throw_stream(server, *stream)
        wait_clients(server, 0)
        assert_no_tracebacks(caplog)

    attack()
    healthy(server, caplog)
    # The fuzzer must get past the handshake often enough to attack the serve loop too.
    negotiated_runs = sum("structured replies" in r.getMessage() for r in caplog.records)
    protocol_errors = sum("closing this connection" in r.getMessage() for r in caplog.records)
    print(f"random streams: {negotiated_runs} negotiated, {protocol_errors} transmission protocol errors")
    assert negotiated_runs >= 10


# --- property-based: the pure machines, handshake then transmission ------------------------------
EXPORTS = {"disk": Server({"disk": Disk()}, "127.0.0.1:0").exports["disk"].export}


@settings(max_examples=200, deadline=None)
@given(stream=streams, cuts=st.lists(st.integers(1, 97), max_size=30))
def test_handshake_hands_over_to_the_reader_with_only_protocol_errors(
    stream: tuple[bytes, list[bytes]], cuts: list[int]
) -> None:
    """Random bytes through ServerHandshake and, once negotiated, the trailing
    bytes and the rest through RequestReader: only HandshakeError/ProtocolError."""
    prefix, pieces = stream
    data = prefix + b"".join(pieces)
    chunks = []
    for cut in cuts:
        chunks.append(data[:cut])
        data = data[cut:]
    chunks += [data, b""]
    chunks = [c for c in chunks[:-1] if c] + [b""]
    hs = ServerHandshake(EXPORTS, default_export="disk")
    hs.initial_bytes()
    reader: RequestReader | None = None
    try:
        for chunk in chunks:
            if reader is None:
                hs.receive_data(chunk)
                while True:
                    event = hs.next_event()
                    hs.data_to_send()
                    if event is NEED_DATA:
                        break
                    assert not isinstance(event, StartTLS)  # TLS is off
                    if not isinstance(event, Negotiated):
                        return  # Aborted
                    reader = RequestReader()
                    if event.trailing:
                        reader.feed(event.trailing)
                    break
                if reader is None:
                    continue
            else:
                reader.feed(chunk)
            while isinstance(reader.next_event(), Request):
                pass
            assert reader.buffered <= 256 * 1024 + MAX_PAYLOAD
    except (HandshakeError, ProtocolError):
        pass
