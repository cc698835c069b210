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

import concurrent.futures
import errno
import mmap
import logging
import threading
from collections.abc import Callable
from typing import Any

from .dispatch.invoke import Failure, Invoker
from .errors import ProtocolError
from .protocol.constants import MAX_PAYLOAD, Command, CommandFlag
from .protocol.transmission import (
    CLOSED,
    NEED_DATA,
    Request,
    RequestReader,
    done_chunk,
    error_chunk,
    read_chunk_header,
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
        if self.structured and req.command == _READ:
            return [done_chunk(req.handle)]
        return [simple_reply(req.handle)]

    def _execute_sync(self, req: Request, buf: memoryview | None) -> list[Any]:
        """Run a checked, non-read request (or a read into `buf`) and return the reply parts."""
        inv = self.invoker
        command = req.command
        fua = bool(req.flags & _FUA)
        if command == _READ:
            assert buf is not None
            result = inv.read(req.offset, buf)
            if isinstance(result, Failure):
                return self._error_parts(req, result)
            return self._read_parts(req, result)
        if command == _WRITE:
            assert req.payload is not None
            failure = inv.write(req.offset, req.payload.toreadonly(), fua)
        elif command == _FLUSH:
            failure = inv.flush()
        elif command == _TRIM:
            failure = inv.trim(req.offset, req.length, fua)
        else:  # _WRITE_ZEROES
            failure = inv.write_zeroes(req.offset, req.length, fua)
        return self._ok_parts(req) if failure is None else self._error_parts(req, failure)

    # --- inline mode: handlers run in this thread, replies batched --------------
    def _run_inline(self) -> str:
        conn, reader = self.conn, self.reader
        arena = _Arena(ARENA_SIZE)
        out: list[Any] = []
        next_event = reader.next_event
        check = self.check
        execute = self._execute_sync
        while True:
            req = next_event()
            if req is NEED_DATA:
                if out:
                    conn.send_parts(out)
                    out.clear()
                    arena.used = 0
                n = conn.recv_into(reader.receive_buffer())
                reader.received(n)
                continue
            if req is CLOSED:
                if out:
                    conn.send_parts(out)
                self._finish()
                return "closed"
            assert isinstance(req, Request)
            self.requests += 1
            if req.command == _DISC:
                if out:
                    conn.send_parts(out)
                self._finish()
                return "disconnect"
            failure = check(req)
            if failure is not None:
                out += self._error_parts(req, failure)
                continue
            buf = None
            if req.command == _READ:
                buf = arena.take(req.length)
                if buf is None:
                    if out:  # the arena is full of payloads waiting to go out
                        conn.send_parts(out)
                        out.clear()
                    arena.used = 0
                    buf = arena.take(req.length) or arena.take_big(req.length)
            out += execute(req, buf)
            if buf is not None and buf.obj is arena.big.obj:
                conn.send_parts(out)  # the big buffer is reused by the next large read
                out.clear()

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
            req = req._replace(payload=memoryview(bytearray(req.payload)))
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
        exc = future.exception()
        if exc is not None:
            log.error("%s: request failed outside its handler", self.label, exc_info=exc)

    def _execute_in_worker(self, req: Request, earlier: list[concurrent.futures.Future[Any]]) -> None:
        if earlier:
            concurrent.futures.wait(earlier)
        buf = memoryview(_worker_buffer(req.length)) if req.command == _READ else None
        self._send(self._execute_sync(req, buf))

    async def _execute_async(self, req: Request, earlier: list[concurrent.futures.Future[Any]]) -> None:
        import asyncio

        inv, device = self.invoker, self.device
        fua = bool(req.flags & _FUA)
        if earlier:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in earlier), return_exceptions=True)
        if req.command == _READ:
            result = await inv.read_async(req.offset, memoryview(bytearray(req.length)))
            parts = (
                self._error_parts(req, result)
                if isinstance(result, Failure)
                else self._read_parts(req, result)
            )
            self._send(parts)
            return
        failure: Failure | None
        if req.command == _WRITE:
            assert req.payload is not None and device.write is not None
            failure = await inv.call_async(f"write({req.offset}, {req.length})", device.write, req.offset, req.payload.toreadonly())
        elif req.command == _TRIM:
            assert device.trim is not None
            failure = await inv.call_async(f"trim({req.offset}, {req.length})", device.trim, req.offset, req.length)
        elif req.command == _WRITE_ZEROES:
            assert device.write is not None
            failure = await inv.call_async(
                f"write_zeroes({req.offset}, {req.length})", device.write, req.offset, memoryview(bytes(req.length))
            )
        else:
            failure = None
        if failure is None and device.flush is not None and (req.command == _FLUSH or fua):
            failure = await inv.call_async("flush()", device.flush)
        self._send(self._ok_parts(req) if failure is None else self._error_parts(req, failure))

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


ServeLoopFactory = Callable[..., ServeLoop]
