"""Calling a device's handlers under the contract.

`Invoker` owns everything about *how* a handler runs: the checks on what it
returns, turning its exceptions into NBD errors (logged, never fatal), and
the device-wide concurrency limit shared by every connection to the device.
Sync handlers run inline in the caller's thread (serialized when the device
declares concurrency=1) or on a thread pool; `async def` handlers run on one
asyncio loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import inspect
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import attrs

from ..errors import HandlerResultError
from ..protocol.constants import Command, wire_errno
from .declare import BoundDevice

log = logging.getLogger("blockfs.handlers")

ZERO_CHUNK = 1024 * 1024
ZEROES = memoryview(bytes(ZERO_CHUNK))  # shared, read-only


@attrs.frozen
class Failure:
    """A handler failed: the errno to send and a message for humans."""

    errno: int
    message: str


def failure_from(exc: BaseException, what: str) -> Failure:
    """Map a handler's exception onto the errnos NBD allows, logging it."""
    if isinstance(exc, OSError) and exc.errno is not None:
        code = wire_errno(exc.errno)
        log.info("%s failed: %s (sent as errno %d)", what, exc, code)
        return Failure(code, f"{what}: {exc.strerror or exc}")
    if isinstance(exc, HandlerResultError):
        log.error("%s: %s", what, exc)
        return Failure(errno.EIO, f"{what}: {exc}")
    log.error("%s raised %s; sent EIO", what, type(exc).__name__, exc_info=exc)
    return Failure(errno.EIO, f"{what}: internal error ({type(exc).__name__})")


def _is_async(func: Callable[..., Any] | None) -> bool:
    return func is not None and inspect.iscoroutinefunction(func)


class Invoker:
    """Runs one device's handlers. Shared by every connection to the device."""

    def __init__(self, device: BoundDevice) -> None:
        self.device = device
        self.concurrency = device.table.concurrency
        handlers = (device.read, device.write, device.trim, device.flush)
        self.is_async = any(_is_async(h) for h in handlers)
        if self.is_async and not all(h is None or _is_async(h) for h in handlers):
            # One model per device keeps ordering rules (flush after writes) simple.
            raise HandlerResultError(
                f"{type(device.instance).__qualname__}: handlers must be all `async def` or all plain "
                "`def`, not a mix"
            )
        # Requests are handed to workers (and may complete out of order) when
        # the device allows overlap or its handlers are coroutines.
        self.concurrent = self.is_async or self.concurrency > 1
        # Serializes handler calls across connections when the device allows
        # no overlap; a no-op when its own pool or loop bounds concurrency.
        self.lock: threading.Lock | _NoLock = _NO_LOCK if self.concurrent else threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._slots: asyncio.Semaphore | None = None
        self._start_lock = threading.Lock()

    # --- the contract, one operation at a time (sync handlers) ---------------
    def read(self, offset: int, buf: memoryview) -> memoryview | Failure:
        """Fill `buf` (or take the bytes the handler returns); the payload to send."""
        try:
            with self.lock:
                result = self.device.read(offset, buf)
            return checked_read_result(result, buf)
        except Exception as exc:
            return failure_from(exc, f"read({offset}, {len(buf)})")

    def call(self, what: str, func: Callable[..., Any], *args: Any) -> Failure | None:
        """Run one sync handler under the device lock; its failure, if any."""
        try:
            with self.lock:
                func(*args)
        except Exception as exc:
            return failure_from(exc, what)
        return None

    def write(self, offset: int, data: memoryview, fua: bool) -> Failure | None:
        assert self.device.write is not None
        failure = self.call(f"write({offset}, {len(data)})", self.device.write, offset, data)
        return self.flush() if fua and failure is None else failure

    def write_zeroes(self, offset: int, length: int, fua: bool) -> Failure | None:
        # Emulated with the write handler, a bounded zero buffer at a time.
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            failure = self.write(offset, ZEROES[:n], False)
            if failure is not None:
                return failure
            offset += n
        return self.flush() if fua else None

    def trim(self, offset: int, length: int, fua: bool) -> Failure | None:
        assert self.device.trim is not None
        failure = self.call(f"trim({offset}, {length})", self.device.trim, offset, length)
        return self.flush() if fua and failure is None else failure

    def flush(self) -> Failure | None:
        flush = self.device.flush
        if flush is None:
            return None
        if self.is_async:  # on the device's own loop, and awaited
            return asyncio.run_coroutine_threadsafe(self.call_async("flush()", flush), self._event_loop()).result()
        return self.call("flush()", flush)

    def execute(
        self, command: int, offset: int, length: int, payload: memoryview | None, buf: memoryview | None, fua: bool
    ) -> memoryview | Failure | None:
        """Run one checked request: a read's payload, a failure, or None (done)."""
        if command == Command.READ:
            assert buf is not None
            return self.read(offset, buf)
        if command == Command.WRITE:
            assert payload is not None
            return self.write(offset, payload, fua)
        if command == Command.FLUSH:
            return self.flush()
        if command == Command.TRIM:
            return self.trim(offset, length, fua)
        return self.write_zeroes(offset, length, fua)

    # --- the same, for async handlers ------------------------------------------
    async def execute_async(
        self, command: int, offset: int, length: int, payload: memoryview | None, fua: bool
    ) -> memoryview | Failure | None:
        """execute() for a device whose handlers are coroutines."""
        device = self.device
        if command == Command.READ:
            return await self.read_async(offset, memoryview(bytearray(length)))
        failure: Failure | None = None
        if command == Command.WRITE:
            assert payload is not None and device.write is not None
            failure = await self.call_async(f"write({offset}, {length})", device.write, offset, payload)
        elif command == Command.TRIM:
            assert device.trim is not None
            failure = await self.call_async(f"trim({offset}, {length})", device.trim, offset, length)
        elif command == Command.WRITE_ZEROES:
            assert device.write is not None
            end = offset + length
            while offset < end and failure is None:  # a bounded zero buffer at a time
                n = min(ZERO_CHUNK, end - offset)
                failure = await self.call_async(f"write_zeroes({offset}, {n})", device.write, offset, ZEROES[:n])
                offset += n
        if failure is None and device.flush is not None and (command == Command.FLUSH or fua):
            failure = await self.call_async("flush()", device.flush)
        return failure

    async def read_async(self, offset: int, buf: memoryview) -> memoryview | Failure:
        try:
            result = await self.device.read(offset, buf)
            return checked_read_result(result, buf)
        except Exception as exc:
            return failure_from(exc, f"read({offset}, {len(buf)})")

    async def call_async(self, what: str, func: Callable[..., Any], *args: Any) -> Failure | None:
        try:
            await func(*args)
        except Exception as exc:
            return failure_from(exc, what)
        return None

    # --- running work off the connection's thread -----------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run a sync callable on the device's pool."""
        if self._pool is None:
            with self._start_lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        max_workers=self.concurrency, thread_name_prefix="blockfs-handler"
                    )
        return self._pool.submit(fn, *args)

    def submit_async(self, coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> concurrent.futures.Future[Any]:
        """Run a coroutine on the device's event loop, at most `concurrency` at once."""
        loop = self._event_loop()
        slots = self._slots
        assert slots is not None

        async def limited() -> Any:
            async with slots:
                return await coro_fn()

        return asyncio.run_coroutine_threadsafe(limited(), loop)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            with self._start_lock:
                if self._loop is None:
                    loop = asyncio.new_event_loop()
                    ready = threading.Event()

                    def run() -> None:
                        asyncio.set_event_loop(loop)
                        self._slots = asyncio.Semaphore(self.concurrency)
                        ready.set()
                        loop.run_forever()

                    thread = threading.Thread(target=run, name="blockfs-asyncio", daemon=True)
                    thread.start()
                    ready.wait()
                    self._loop_thread, self._loop = thread, loop
        return self._loop

    def shutdown(self, *, unmount: bool) -> None:
        """After the last connection: call the unmount handler (once, if the
        device was attached), then stop the pool and the event loop."""
        if unmount and self.device.unmount is not None:
            try:
                if self.is_async or inspect.iscoroutinefunction(self.device.unmount):
                    # On the device's own loop, where its resources live.
                    asyncio.run_coroutine_threadsafe(self.device.unmount(), self._event_loop()).result()
                else:
                    self.device.unmount()
            except Exception:
                log.exception("unmount() raised")
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join()
            self._loop.close()
            self._loop = None


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


def checked_read_result(result: object, buf: memoryview) -> memoryview:
    """The read contract: fill `buf` and return None, or return exactly
    len(buf) bytes-like."""
    if result is None:
        return buf
    try:
        view = memoryview(result)  # type: ignore[arg-type]
    except TypeError:
        raise HandlerResultError(
            f"read handler returned {type(result).__name__}; expected None (buf filled) "
            f"or a bytes-like object of {len(buf)} bytes"
        ) from None
    if view.nbytes != len(buf):
        raise HandlerResultError(
            f"read handler returned {view.nbytes} bytes; expected exactly {len(buf)}"
        )
    if not view.c_contiguous:  # sendmsg cannot send it, and a copy would hide the cost
        raise HandlerResultError("read handler returned a non-contiguous buffer; return bytes or fill buf")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view
