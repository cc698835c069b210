"""The transmission-phase serve loop, shared by every transport.

The kernel's socket (ioctl transport) and every network client run exactly
this code: the transports only bring a connected `Connection`.

Rules (each has a test):
- a failed read gets an error reply and never a payload (a payload after an
  error reply desyncs the kernel);
- an unknown command or flag gets EINVAL and the loop goes on;
- a request past the end gets EINVAL (ENOSPC for writes), a read or write
  over MAX_PAYLOAD gets EOVERFLOW (a write's payload is read and dropped);
- a bad magic or a stream cut inside a request ends this connection only;
- NBD_CMD_DISC ends the loop with no reply, after in-flight requests are
  answered and the device is flushed;
- replies are keyed by handle: with a concurrent device they go out as
  requests complete, in any order.

Replies for requests parsed from one receive are gathered and sent with one
`sendmsg` when the loop would otherwise block on the socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import mmap
import logging
import threading
from collections.abc import Callable
from typing import Any

from .dispatch.invoke import Failure, Invoker, checked_read_result, failure_from
from .errors import ProtocolError
from .protocol.constants import (
    MAX_PAYLOAD,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
)
from .protocol.transmission import (
    CLOSED,
    NEED_DATA,
    Request,
    RequestReader,
    error_chunk,
    read_chunk_header,
    pack_read_chunk,
    pack_simple,
    simple_reply,
)
from .transports.connection import Connection

log = logging.getLogger("blockfs.serve")

_FUA = int(CommandFlag.FUA)
_READ, _WRITE, _DISC, _FLUSH, _TRIM, _WRITE_ZEROES = (
    Command.READ,
    Command.WRITE,
    Command.DISC,
    Command.FLUSH,
    Command.TRIM,
    Command.WRITE_ZEROES,
)
ARENA_SIZE = 4 * 1024 * 1024  # read payloads gathered before one sendmsg
HANDOFF_BYTES = 256 * 1024  # batches with this much read data are sent by the sender thread
# Concurrent devices: what one connection may have in flight before the loop
# stops reading (and the socket pushes back on the client).
MAX_INFLIGHT_REQUESTS = 256
MAX_INFLIGHT_BYTES = 32 * 1024 * 1024  # one largest request always fits


class _Arena:
    """Read buffers carved from one preallocated block, reused after each send."""

    def __init__(self, size: int) -> None:
        # mmap: pages are committed only when a read fills them, so idle
        # connections cost next to nothing.
        self.view = memoryview(mmap.mmap(-1, size))
        self.used = 0
        self.big = memoryview(bytearray(0))

    def take(self, n: int) -> memoryview | None:
        if self.used + n <= len(self.view):
            start, self.used = self.used, self.used + n
            return self.view[start : self.used]
        return None

    def take_big(self, n: int) -> memoryview:
        """A buffer for one read larger than the arena (kept for the next one)."""
        if len(self.big) < n:
            self.big = memoryview(bytearray(n))
        return self.big[:n]


class _Offload:
    """One job at a time on a thread of its own, so that the serve loop goes on
    receiving meanwhile. Used for sending a large reply batch and for running
    a large write's handler: both release the GIL for most of their time
    (sendmsg, a file write), which is what lets the two threads overlap."""

    def __init__(self, name: str) -> None:
        self._cv = threading.Condition()
        self._job: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        self._running = False
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._job is not None or self._running

    def start(self, fn: Callable[..., Any], *args: Any) -> None:
        """Hand over a job; the previous one must have been waited for."""
        with self._cv:
            assert not self.busy
            self._job = (fn, args)
            self._cv.notify_all()

    def wait(self) -> BaseException | None:
        """Until the job handed over has finished; what it raised, if anything."""
        with self._cv:
            while self.busy:
                self._cv.wait()
            exc, self._error = self._error, None
        return exc

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._job is None and not self._stopped:
                    self._cv.wait()
                if self._job is None:
                    return
                (fn, args), self._job, self._running = self._job, None, True
            error: BaseException | None = None
            try:
                fn(*args)
            except BaseException as exc:  # handed to the loop by wait()
                error = exc
            with self._cv:
                self._running, self._error = False, error
                self._cv.notify_all()


class ServeLoop:
    """Serves one connection until the client disconnects or breaks the protocol."""

    def __init__(
        self,
        conn: Connection,
        invoker: Invoker,
        *,
        structured: bool = False,
        initial: bytes = b"",
        label: str = "connection",
    ) -> None:
        self.conn = conn
        self.invoker = invoker
        self.device = invoker.device
        self.structured = structured
        self.label = label
        self.reader = RequestReader()
        if initial:
            self.reader.feed(initial)
        self._send_lock = threading.Lock()
        self._inflight: dict[concurrent.futures.Future[Any], int] = {}  # future -> bytes it holds
        self._inflight_writes: set[concurrent.futures.Future[Any]] = set()
        self._inflight_lock = threading.Lock()
        self._room = threading.Condition(self._inflight_lock)  # signalled as requests complete
        self._inflight_bytes = 0
        self._broken = False
        self.requests = 0
        device = self.device
        # Flags each command may carry; a command missing here is unsupported.
        allowed: dict[int, int] = {_READ: 0, _WRITE: _FUA, _WRITE_ZEROES: _FUA | int(CommandFlag.NO_HOLE)}
        if device.trim is not None or device.read_only:
            allowed[_TRIM] = _FUA
        if device.flush is not None:
            allowed[_FLUSH] = 0
        self._allowed = allowed

    # --- entry point ------------------------------------------------------------
    def run(self) -> str:
        """Serve until the end; returns why it ended ("disconnect", "closed",
        "protocol error", "connection lost")."""
        try:
            if self.invoker.concurrent:
                return self._run_concurrent()
            return self._run_inline()
        except ProtocolError as exc:
            log.warning("%s: %s; closing this connection", self.label, exc)
            return "protocol error"
        except OSError as exc:
            log.info("%s: connection lost: %s", self.label, exc)
            return "connection lost"
        finally:
            self._drain()

    def _finish(self) -> None:
        """Clean end (DISC or EOF): wait for in-flight work, then flush."""
        self._drain()
        failure = self.invoker.flush()
        if failure is not None:
            log.error("%s: flush at disconnect failed: %s", self.label, failure.message)

    # --- validation (shared by both modes) -------------------------------------
    def check(self, req: Request) -> Failure | None:
        """The protocol's rules for a request, before any handler runs."""
        command = req.command
        allowed = self._allowed.get(command)
        if allowed is None:
            return Failure(errno.EINVAL, f"unsupported command {command}")
        if req.flags & ~allowed:
            return Failure(errno.EINVAL, f"unsupported flags 0x{req.flags:x} for command {command}")
        if command == _FLUSH:
            return None
        if req.oversized or (command == _READ and req.length > MAX_PAYLOAD):
            return Failure(errno.EOVERFLOW, f"request of {req.length} bytes is over {MAX_PAYLOAD}")
        if command != _READ and self.device.read_only:
            return Failure(errno.EPERM, "the device is read-only")
        if req.length == 0:
            return Failure(errno.EINVAL, "zero-length request")
        if req.offset + req.length > self.device.size:
            code = errno.ENOSPC if command in (_WRITE, _WRITE_ZEROES) else errno.EINVAL
            return Failure(code, f"request {req.offset}+{req.length} is past the end ({self.device.size})")
        return None

    # --- replies ----------------------------------------------------------------
    def _error_parts(self, req: Request, failure: Failure) -> list[Any]:
        if self.structured:
            return [error_chunk(req.handle, failure.errno, failure.message)]
        return [simple_reply(req.handle, failure.errno)]

    def _read_parts(self, req: Request, payload: memoryview) -> list[Any]:
        if self.structured:
            return [read_chunk_header(req.handle, req.offset, req.length), payload]
        return [simple_reply(req.handle), payload]

    def _ok_parts(self, req: Request) -> list[Any]:
        return [simple_reply(req.handle)]  # success without data: simple even when structured

    def _reply(self, req: Request, result: memoryview | Failure | None) -> list[Any]:
        if isinstance(result, Failure):
            return self._error_parts(req, result)
        if result is not None:
            return self._read_parts(req, result)
        return self._ok_parts(req)

    def _execute_sync(self, req: Request, buf: memoryview | None) -> list[Any]:
        """Run a checked request (a read into `buf`) and return the reply parts."""
        result = self.invoker.execute(
            req.command, req.offset, req.length, req.payload, buf, bool(req.flags & _FUA)
        )
        return self._reply(req, result)

    # --- inline mode: handlers run in this thread, replies batched --------------
    def _run_inline(self) -> str:
        sender = _Offload(f"{self.label} sender")  # large reply batches
        runner = _Offload(f"{self.label} writer")  # large writes' handlers
        try:
            return self._inline(sender, runner)
        finally:
            runner.wait()
            sender.wait()
            runner.stop()
            sender.stop()

    def _inline(self, sender: _Offload, runner: _Offload) -> str:
        conn, reader, inv, device = self.conn, self.reader, self.invoker, self.device
        # Two arenas: one being sent by the sender while the other fills.
        arenas = [_Arena(ARENA_SIZE), _Arena(ARENA_SIZE)]
        arena = arenas[0]
        out: list[Any] = []
        next_event = reader.next_event
        check = self.check
        execute = self._execute_sync
        # The fast path for plain reads and writes, the bulk of all traffic:
        # the same rules as check() + _execute_sync(), without the calls.
        size = device.size
        read, write = device.read, device.write
        lock = inv.lock
        structured = self.structured
        arena_len = ARENA_SIZE
        fits_in_ring = reader.fits_in_ring

        def sent() -> None:
            """Until the batch the sender has is out (replies never interleave)."""
            exc = sender.wait()
            if exc is not None:
                raise exc

        def flush_out() -> None:
            nonlocal out, arena
            sent()  # and so the other arena is free again
            if arena.used < HANDOFF_BYTES:
                # Small batch: a thread handoff costs more than the send saves.
                conn.send_parts(out)
                out.clear()
                arena.used = 0
                return
            sender.start(conn.send_parts, out)
            out = []
            arena = arenas[1] if arena is arenas[0] else arenas[0]
            arena.used = 0

        def write_locked(offset: int, payload: memoryview) -> None:
            with lock:
                write(offset, payload)

        running: Request | None = None  # the large write whose handler the runner has

        def collect() -> None:
            """Wait for the large write on the runner, and queue its reply."""
            nonlocal running
            exc, done, running = runner.wait(), running, None
            assert done is not None
            if exc is None:
                out.append(pack_simple(SIMPLE_REPLY_MAGIC, 0, done.handle))
            elif isinstance(exc, Exception):
                out.extend(self._error_parts(done, failure_from(exc, f"write({done.offset}, {done.length})")))
            else:
                raise exc

        try:
            while True:
                req = next_event()
                if req.__class__ is not Request:
                    if req is NEED_DATA:
                        if out:
                            flush_out()
                        target = reader.receive_buffer()
                        if reader.in_large_payload:
                            # The rest of a large payload, in one system call that
                            # runs without the GIL (while the runner copies the last one).
                            n = conn.recv_into_all(target)
                        elif running is not None:
                            # A large write is running: receive what is already here
                            # meanwhile, but never block while its reply is unsent.
                            n = conn.recv_into_nowait(target)
                            if n is None:
                                collect()
                                flush_out()
                                n = conn.recv_into(target)
                        else:
                            n = conn.recv_into(target)
                        reader.received(n)
                        continue
                    if running is not None:
                        collect()
                    if out:  # CLOSED
                        flush_out()
                    sent()
                    self._finish()
                    return "closed"
                self.requests += 1
                if running is not None:
                    collect()  # handlers never overlap, and run in the order received
                handle, command, flags, offset, length, payload, _ = req
                if not flags and 0 < length and offset + length <= size:
                    if command == _READ and length <= arena_len:
                        used = arena.used
                        if used + length > arena_len:  # this arena is full of payloads waiting to go out
                            flush_out()
                            used = 0
                        arena.used = used + length
                        buf = arena.view[used : used + length]
                        try:
                            with lock:
                                result = read(offset, buf)
                            if result is not None:
                                buf = checked_read_result(result, buf)
                        except Exception as exc:
                            out += self._error_parts(req, failure_from(exc, f"read({offset}, {length})"))
                            continue
                        if structured:
                            out += (pack_read_chunk(STRUCTURED_REPLY_MAGIC, 1, 1, handle, 8 + length, offset), buf)
                        else:
                            out += (pack_simple(SIMPLE_REPLY_MAGIC, 0, handle), buf)
                        continue
                    if command == _WRITE and write is not None and payload is not None:
                        if not fits_in_ring(length):  # large: its handler overlaps the next receive
                            runner.start(write_locked, offset, payload)
                            running = req
                            continue
                        try:
                            with lock:
                                write(offset, payload)
                        except Exception as exc:
                            out += self._error_parts(req, failure_from(exc, f"write({offset}, {length})"))
                            continue
                        out.append(pack_simple(SIMPLE_REPLY_MAGIC, 0, handle))
                        continue
                # Everything else: the general path.
                if command == _DISC:
                    if out:
                        flush_out()
                    sent()
                    self._finish()
                    return "disconnect"
                failure = check(req)
                if failure is not None:
                    out += self._error_parts(req, failure)
                    continue
                buf = None
                if command == _READ:
                    buf = arena.take(length)
                    if buf is None:
                        if out:
                            flush_out()
                        buf = arena.take(length) or arena.take_big(length)
                out += execute(req, buf)
                if buf is not None and buf.obj is arena.big.obj:
                    flush_out()  # the big buffer is reused by the next large read:
                    sent()  # it must be out first
        except ProtocolError:
            # Answer the requests that already ran before giving up on the stream.
            if running is not None:
                collect()
            if out:
                flush_out()
            sent()
            raise

    # --- concurrent mode: handlers on workers, replies as they complete ---------
    def _run_concurrent(self) -> str:
        conn, reader = self.conn, self.reader
        while True:
            req = reader.next_event()
            if req is NEED_DATA:
                if self._broken:
                    return "connection lost"
                n = conn.recv_into(reader.receive_buffer())
                reader.received(n)
                continue
            if req is CLOSED:
                self._finish()
                return "closed"
            assert isinstance(req, Request)
            self.requests += 1
            if req.command == _DISC:
                self._finish()
                return "disconnect"
            failure = self.check(req)
            if failure is not None:
                self._send(self._error_parts(req, failure))
                continue
            self._dispatch(req)

    def _dispatch(self, req: Request) -> None:
        inv = self.invoker
        cost = req.length if req.command in (_READ, _WRITE) else 0
        with self._room:
            # Backpressure: wait for room (one request always fits).
            while self._inflight and (
                len(self._inflight) >= MAX_INFLIGHT_REQUESTS or self._inflight_bytes + cost > MAX_INFLIGHT_BYTES
            ):
                self._room.wait()
            self._inflight_bytes += cost
            # A flush waits for every write received before it.
            earlier_writes = list(self._inflight_writes) if req.command == _FLUSH else []
        if req.payload is not None:
            # The reader reuses its buffer: the worker gets its own copy.
            req = req._replace(payload=memoryview(bytearray(req.payload)).toreadonly())
        if inv.is_async:
            future = inv.submit_async(lambda: self._execute_async(req, earlier_writes))
        else:
            future = inv.submit(self._execute_in_worker, req, earlier_writes)
        with self._room:
            self._inflight[future] = cost
            if req.command in (_WRITE, _WRITE_ZEROES, _TRIM):
                self._inflight_writes.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._room:
            # Recorded before the callback was added, so always present.
            self._inflight_bytes -= self._inflight.pop(future)
            self._inflight_writes.discard(future)
            self._room.notify_all()
        exc = None if future.cancelled() else future.exception()
        if exc is not None and not isinstance(exc, Exception):
            log.error("%s: request ended by %s", self.label, type(exc).__name__)

    def _execute_in_worker(self, req: Request, earlier: list[concurrent.futures.Future[Any]]) -> None:
        try:
            if earlier:
                concurrent.futures.wait(earlier)
            buf = _worker_buffer(req.length) if req.command == _READ else None
            parts = self._execute_sync(req, buf)
        except BaseException as exc:  # every request gets a reply, whatever happened
            self._send(self._error_parts(req, failure_from(exc, f"command {req.command}")))
            raise
        self._send(parts)

    async def _execute_async(self, req: Request, earlier: list[concurrent.futures.Future[Any]]) -> None:
        try:
            parts = await self._run_async(req, earlier)
        except BaseException as exc:  # cancelled, or failed outside a handler: still a reply
            self._send(self._error_parts(req, failure_from(exc, f"command {req.command}")))
            raise
        self._send(parts)

    async def _run_async(self, req: Request, earlier: list[concurrent.futures.Future[Any]]) -> list[Any]:
        if earlier:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in earlier), return_exceptions=True)
        result = await self.invoker.execute_async(
            req.command, req.offset, req.length, req.payload, bool(req.flags & _FUA)
        )
        return self._reply(req, result)

    def _send(self, parts: list[Any]) -> None:
        try:
            with self._send_lock:
                self.conn.send_parts(parts)
        except OSError as exc:
            if not self._broken:
                log.info("%s: cannot send reply: %s", self.label, exc)
            self._broken = True
            self.conn.shutdown()  # wakes the reading thread

    def _drain(self) -> None:
        """Wait until every dispatched request has been answered."""
        while True:
            with self._inflight_lock:
                pending = list(self._inflight)
            if not pending:
                return
            concurrent.futures.wait(pending)


_local = threading.local()


def _worker_buffer(n: int) -> memoryview:
    """A read buffer per worker thread, reused for every request it serves."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = bytearray(max(n, 128 * 1024))
    return memoryview(buf)[:n]

