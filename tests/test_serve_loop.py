"""The shared serve loop, driven over a socketpair by a raw client: every rule
from the module docstring, in both reply modes (simple and structured)."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import blockfs
from blockfs.dispatch.invoke import Invoker
from blockfs.protocol.constants import MAX_PAYLOAD, Command, CommandFlag
from blockfs.protocol.transmission import encode_request
from blockfs.serve_loop import ServeLoop
from blockfs.testing.client import RawClient, recv_exactly
from blockfs.testing.devices import FaultyDisk, MemoryDisk
from blockfs.transports.connection import SocketConnection

BS = 4096
BLOCKS = 64
SIZE = BS * BLOCKS
BAD_BLOCK = 5


@blockfs.device(block_size=BS, blocks=BLOCKS)
class Disk(FaultyDisk):
    """Records what reached it; block BAD_BLOCK cannot be read."""

    def __init__(self) -> None:
        super().__init__(SIZE, BS, bad={BAD_BLOCK})

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        assert data.readonly
        super().write(offset, data)


@blockfs.device(block_size=BS, blocks=BLOCKS)
class ReadOnlyDisk:
    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> bytes:
        return bytes([offset // BS % 256]) * len(buf)


class Served:
    def __init__(self, device: object, structured: bool) -> None:
        self.device = device
        ours, theirs = socket.socketpair()
        self.loop = ServeLoop(SocketConnection(ours), Invoker(blockfs.bind(device)), structured=structured)
        self.result: list[str] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.loop.run()), daemon=True)
        self.thread.start()
        self.sock = theirs
        self.client = RawClient(theirs, structured=structured)
        self.ours = ours

    def end(self) -> str:
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "serve loop did not end"
        return self.result[0]

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=10)
        self.ours.close()
        self.loop.invoker.shutdown(unmount=False)


@pytest.fixture
def serve() -> Iterator[type[Served]]:
    """Served(...) whose sockets and threads are cleaned up after the test."""
    made: list[Served] = []

    class Tracked(Served):
        def __init__(self, device: object, structured: bool) -> None:
            super().__init__(device, structured)
            made.append(self)

    yield Tracked
    for s in made:
        s.close()


@pytest.fixture(params=[False, True], ids=["simple", "structured"])
def served(request: pytest.FixtureRequest, serve: type[Served]) -> Served:
    return serve(Disk(), structured=request.param)


def test_write_then_read_round_trip(served: Served) -> None:
    c = served.client
    assert c.write(8192, b"hello" * 1000).error == 0
    r = c.read(8192, 5000)
    assert r.error == 0 and r.data == b"hello" * 1000


def test_failed_read_sends_no_payload_and_the_stream_stays_in_sync(served: Served) -> None:
    c = served.client
    c.write(0, b"A" * BS)
    bad = c.read(BAD_BLOCK * BS, BS)
    assert bad.error == errno.EIO and bad.data == b""
    # Every other block still reads correctly afterwards.
    assert c.read(0, BS).data == b"A" * BS
    assert c.read((BAD_BLOCK + 1) * BS, BS).data == bytes(BS)


def test_unknown_command_gets_einval_and_the_loop_goes_on(served: Served) -> None:
    c = served.client
    assert c.request(99, 0, 0).error == errno.EINVAL
    assert c.request(Command.BLOCK_STATUS, 0, BS).error == errno.EINVAL
    assert c.read(0, 16).error == 0


def test_unknown_flag_gets_einval(served: Served) -> None:
    c = served.client
    assert c.request(Command.READ, 0, BS, flags=1 << 9).error == errno.EINVAL
    assert c.write(0, b"x" * 10, flags=1 << 12).error == errno.EINVAL
    assert c.read(0, 1).data == b"\0"  # the write's payload was consumed, not applied


def test_requests_past_the_end(served: Served) -> None:
    c = served.client
    assert c.read(SIZE - 10, 20).error == errno.EINVAL
    assert c.write(SIZE, b"x").error == errno.ENOSPC
    assert c.request(Command.TRIM, SIZE, 1).error == errno.EINVAL
    assert c.read(2**64 - 1, 1).error == errno.EINVAL  # offset + length overflows 64 bits
    assert c.read(SIZE - 1, 1).error == 0


def test_zero_length_request_is_einval(served: Served) -> None:
    assert served.client.read(0, 0).error == errno.EINVAL


def test_oversized_requests_get_eoverflow_without_desync(served: Served) -> None:
    c = served.client
    assert c.read(0, MAX_PAYLOAD + 1).error == errno.EOVERFLOW
    big = MAX_PAYLOAD + 4096
    h = c.send(Command.WRITE, 0, big)
    chunk = b"z" * 65536
    sent = 0
    while sent < big:
        n = min(len(chunk), big - sent)
        c.sock.sendall(chunk[:n])
        sent += n
    r = c.reply()
    assert r.handle == h and r.error == errno.EOVERFLOW
    assert c.read(0, 4).data == b"\0\0\0\0"


def test_large_write_and_read_at_the_limit(serve: type[Served]) -> None:
    """A payload bigger than the receive ring goes through its own buffer."""
    s = serve(MemoryDisk(MAX_PAYLOAD), structured=False)
    c = s.client
    data = bytes(range(256)) * (MAX_PAYLOAD // 256)
    assert c.write(0, data).error == 0
    assert c.read(0, MAX_PAYLOAD).data == data
    c.disconnect()
    assert s.end() == "disconnect"


def test_handler_errno_mapping(caplog: pytest.LogCaptureFixture, serve: type[Served]) -> None:
    @blockfs.device(block_size=512, blocks=8)
    class Failing:
        @blockfs.on_read
        def read(self, offset: int, buf: memoryview) -> None:
            raise {0: OSError(errno.ENOSPC, "full"), 512: OSError(errno.ENOENT, "gone"),
                   1024: ValueError("bug"), 1536: OSError("no errno")}[offset]

    s = serve(Failing(), structured=True)
    c = s.client
    with caplog.at_level(logging.INFO, logger="blockfs.handlers"):
        assert c.read(0, 512).error == errno.ENOSPC
        assert c.read(512, 512).error == errno.EIO  # not in NBD's set
        r = c.read(1024, 512)
        assert r.error == errno.EIO and "ValueError" in r.message
        assert c.read(1536, 512).error == errno.EIO
    assert any("Traceback" in (rec.exc_text or "") or rec.exc_info for rec in caplog.records)
    c.disconnect()
    assert s.end() == "disconnect"


def test_read_handler_may_return_bytes_of_the_right_length(serve: type[Served]) -> None:
    s = serve(ReadOnlyDisk(), structured=False)
    assert s.client.read(3 * BS, 8).data == b"\x03" * 8
    s.client.disconnect()
    s.end()


def test_read_handler_returning_the_wrong_length_is_eio(caplog: pytest.LogCaptureFixture, serve: type[Served]) -> None:
    @blockfs.device(block_size=512, blocks=8)
    class Short:
        @blockfs.on_read
        def read(self, offset: int, buf: memoryview) -> bytes:
            return b"abc" if offset == 0 else 42  # type: ignore[return-value]

    s = serve(Short(), structured=False)
    with caplog.at_level(logging.ERROR):
        assert s.client.read(0, 512).error == errno.EIO
        assert s.client.read(512, 512).error == errno.EIO
    assert "expected exactly 512" in caplog.text and "returned int" in caplog.text
    s.client.disconnect()
    s.end()


def test_read_only_device_refuses_writes_with_eperm(serve: type[Served]) -> None:
    s = serve(ReadOnlyDisk(), structured=False)
    c = s.client
    assert c.write(0, b"x" * 512).error == errno.EPERM
    assert c.request(Command.TRIM, 0, 512).error == errno.EPERM
    assert c.read(0, 1).data == b"\0"
    c.disconnect()
    s.end()


def test_fua_write_and_trim_are_flushed(served: Served) -> None:
    c = served.client
    assert c.write(0, b"x", flags=CommandFlag.FUA).error == 0
    assert served.device.log == ["write 0", "flush"]
    assert c.request(Command.TRIM, 0, BS, flags=CommandFlag.FUA).error == 0
    assert served.device.trims == [(0, BS)] and served.device.flushes == 2


def test_write_zeroes_is_emulated_with_the_write_handler(served: Served) -> None:
    c = served.client
    c.write(0, b"\xff" * (3 * BS))
    assert c.request(Command.WRITE_ZEROES, 100, 2 * BS).error == 0
    assert c.read(0, 3 * BS).data == b"\xff" * 100 + bytes(2 * BS) + b"\xff" * (BS - 100)


def test_disc_ends_the_loop_with_no_reply_and_flushes(served: Served) -> None:
    c = served.client
    c.write(0, b"q")
    c.disconnect()
    assert served.end() == "disconnect"
    assert served.device.flushes == 1
    served.ours.close()  # the transport closes the socket after the loop
    served.sock.settimeout(5)
    assert served.sock.recv(100) == b""  # nothing was sent after DISC


def test_bad_magic_ends_this_connection_cleanly(served: Served) -> None:
    served.sock.sendall(b"\x00" * 28)
    assert served.end() == "protocol error"


def test_stream_cut_inside_a_request(served: Served) -> None:
    served.sock.sendall(encode_request(Command.WRITE, 1, 0, 100)[:20])
    served.sock.shutdown(socket.SHUT_WR)
    assert served.end() == "protocol error"


def test_short_reads_one_byte_at_a_time(served: Served) -> None:
    blob = (
        encode_request(Command.WRITE, 7, 4096, 6, payload=b"abcdef")
        + encode_request(Command.READ, 8, 4096, 6)
    )
    for b in blob:
        served.sock.send(bytes([b]))
        time.sleep(0.0005)
    c = served.client
    c.read_lengths[8] = 6
    assert c.reply().handle == 7
    r = c.reply()
    assert r.handle == 8 and r.data == b"abcdef"


def test_pipelined_requests_are_answered_by_handle(served: Served) -> None:
    c = served.client
    handles = [c.send(Command.WRITE, i * BS, 4, payload=b"%04d" % i) for i in range(10, 60)]
    handles += [c.send(Command.READ, i * BS, 4) for i in range(10, 60)]
    replies = {r.handle: r for r in (c.reply() for _ in handles)}
    assert sorted(replies) == sorted(handles)
    for i, h in enumerate(handles[50:], start=10):
        assert replies[h].data == b"%04d" % i


# --- concurrent devices: out-of-order replies, flush ordering ------------------------
@blockfs.device(block_size=512, blocks=64, concurrency=4)
class SlowFirst:
    def __init__(self) -> None:
        self.data = bytearray(512 * 64)
        self.release = threading.Event()
        self.order: list[str] = []

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        if offset == 0:
            self.release.wait(5)
        buf[:] = self.data[offset : offset + len(buf)]

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        time.sleep(0.05)
        self.data[offset : offset + len(data)] = data
        self.order.append(f"write {offset}")

    @blockfs.on_flush
    def flush(self) -> None:
        self.order.append("flush")


def test_concurrent_device_replies_out_of_order(serve: type[Served]) -> None:
    dev = SlowFirst()
    s = serve(dev, structured=False)
    c = s.client
    slow = c.send(Command.READ, 0, 512)
    fast = c.send(Command.READ, 512, 512)
    assert c.reply().handle == fast  # the second finished first
    dev.release.set()
    assert c.reply().handle == slow
    c.disconnect()
    assert s.end() == "disconnect"


def test_flush_waits_for_every_earlier_write(serve: type[Served]) -> None:
    dev = SlowFirst()
    dev.release.set()
    s = serve(dev, structured=False)
    c = s.client
    writes = [c.send(Command.WRITE, i * 512, 512, payload=bytes([i]) * 512) for i in range(3)]
    flush = c.send(Command.FLUSH)
    got = [c.reply().handle for _ in range(4)]
    assert set(got) == {*writes, flush}
    assert dev.order.index("flush") == 3, dev.order
    c.disconnect()
    s.end()


@blockfs.device(block_size=512, blocks=16, concurrency=8)
class AsyncDisk:
    def __init__(self) -> None:
        self.data = bytearray(512 * 16)

    @blockfs.on_read
    async def read(self, offset: int, buf: memoryview) -> None:
        import asyncio

        await asyncio.sleep(0.05 if offset == 0 else 0)
        if offset == 512:
            raise OSError(errno.ENOSPC, "async failure")
        buf[:] = self.data[offset : offset + len(buf)]

    @blockfs.on_write
    async def write(self, offset: int, data: memoryview) -> None:
        self.data[offset : offset + len(data)] = data


def test_async_handlers_run_on_an_event_loop(serve: type[Served]) -> None:
    s = serve(AsyncDisk(), structured=True)
    c = s.client
    assert c.write(1024, b"async!").error == 0
    slow = c.send(Command.READ, 0, 512)
    bad = c.send(Command.READ, 512, 512)
    good = c.send(Command.READ, 1024, 6)
    replies = {r.handle: r for r in (c.reply() for _ in range(3))}
    assert replies[bad].error == errno.ENOSPC and replies[good].data == b"async!"
    assert replies[slow].data == bytes(512)
    c.disconnect()
    assert s.end() == "disconnect"


def test_client_vanishing_mid_payload_ends_only_that_connection(served: Served) -> None:
    served.sock.sendall(encode_request(Command.WRITE, 1, 0, 4096) + b"x" * 100)
    served.sock.close()
    assert served.end() == "protocol error"


def test_recv_exactly_reports_short_stream() -> None:
    a, b = socket.socketpair()
    a.sendall(b"abc")
    a.close()
    with pytest.raises(ConnectionError):
        recv_exactly(b, 4)
    b.close()


# --- regressions from review --------------------------------------------------------------
@blockfs.device(block_size=512, blocks=1 << 16, concurrency=4)
class AsyncRecorder:
    """Async handlers that count flushes and write sizes; reads can misbehave."""

    def __init__(self) -> None:
        self.flushes = 0
        self.write_sizes: list[int] = []

    @blockfs.on_read
    async def read(self, offset: int, buf: memoryview) -> None:
        import asyncio

        if offset == 0:
            raise asyncio.CancelledError()  # a BaseException, not an Exception

    @blockfs.on_write
    async def write(self, offset: int, data: memoryview) -> None:
        self.write_sizes.append(len(data))

    @blockfs.on_flush
    async def flush(self) -> None:
        self.flushes += 1


def test_async_device_is_flushed_at_disconnect(serve: type[Served]) -> None:
    dev = AsyncRecorder()
    s = serve(dev, structured=False)
    assert s.client.write(512, b"x" * 512).error == 0
    s.client.disconnect()
    assert s.end() == "disconnect"
    assert dev.flushes == 1


def test_cancelled_async_handler_still_gets_a_reply(serve: type[Served]) -> None:
    s = serve(AsyncRecorder(), structured=True)
    s.sock.settimeout(5)
    assert s.client.read(0, 512).error == errno.EIO
    assert s.client.read(512, 512).error == 0  # and the connection goes on


def test_async_write_zeroes_goes_in_bounded_chunks(serve: type[Served]) -> None:
    dev = AsyncRecorder()
    s = serve(dev, structured=False)
    assert s.client.request(Command.WRITE_ZEROES, 0, 8 << 20).error == 0
    assert sum(dev.write_sizes) == 8 << 20 and max(dev.write_sizes) <= 1 << 20


@pytest.mark.parametrize("concurrency", [1, 4])
def test_non_contiguous_read_result_is_eio_not_a_crash(serve: type[Served], concurrency: int) -> None:
    @blockfs.device(block_size=512, blocks=8, concurrency=concurrency)
    class Strided:
        @blockfs.on_read
        def read(self, offset: int, buf: memoryview) -> memoryview:
            return memoryview(bytearray(2 * len(buf)))[::2]

    s = serve(Strided(), structured=False)
    s.sock.settimeout(5)
    assert s.client.read(0, 512).error == errno.EIO
    assert s.client.read(512, 512).error == errno.EIO  # still serving


def test_replies_before_a_protocol_error_are_sent(serve: type[Served]) -> None:
    dev = Disk()
    s = serve(dev, structured=False)
    s.sock.sendall(
        encode_request(Command.WRITE, 1, 0, 4, payload=b"abcd") + encode_request(Command.READ, 2, 0, 4) + bytes(28)
    )
    s.sock.settimeout(5)
    s.client.read_lengths[2] = 4
    got = {r.handle: r for r in (s.client.reply(), s.client.reply())}
    assert got[1].error == 0 and got[2].data == b"abcd"
    assert s.end() == "protocol error"
