"""Reference devices for tests and benchmarks: a RAM disk of any size, and
one that records what reached its handlers. Subclass them (and decorate the
subclass) to inject failures or delays."""

from __future__ import annotations

import errno
from collections.abc import Iterable

import blockfs


@blockfs.device(block_size=None)
class MemoryDisk:
    """A bytearray disk; geometry per instance."""

    def __init__(self, size: int, block_size: int = 4096) -> None:
        self.block_size = block_size
        self.blocks = size // block_size
        self.data = bytearray(size)
        self.view = memoryview(self.data)  # slicing a view copies nothing

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.view[offset : offset + len(buf)]

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        self.data[offset : offset + len(data)] = data


@blockfs.device(block_size=None)
class RecordingDisk(MemoryDisk):
    """A MemoryDisk that counts trims, flushes and unmounts, and logs the
    order of writes and flushes."""

    def __init__(self, size: int, block_size: int = 4096) -> None:
        super().__init__(size, block_size)
        self.trims: list[tuple[int, int]] = []
        self.flushes = 0
        self.unmounted = 0
        self.log: list[str] = []

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        self.log.append(f"write {offset}")
        super().write(offset, data)

    @blockfs.on_trim
    def trim(self, offset: int, length: int) -> None:
        self.trims.append((offset, length))

    @blockfs.on_flush
    def flush(self) -> None:
        self.log.append("flush")
        self.flushes += 1

    @blockfs.on_unmount
    def unmount(self) -> None:
        self.unmounted += 1


@blockfs.device(block_size=None)
class FaultyDisk(RecordingDisk):
    """A RecordingDisk whose reads fail on some blocks: those in `bad` with
    OSError(EIO), a media error; those in `buggy` with ValueError, a bug in
    the handler (which blockfs must log and answer with EIO)."""

    def __init__(self, size: int, block_size: int = 4096, *, bad: Iterable[int] = (), buggy: Iterable[int] = ()) -> None:
        super().__init__(size, block_size)
        self.bad, self.buggy = frozenset(bad), frozenset(buggy)

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        first, last = offset // self.block_size, (offset + len(buf) - 1) // self.block_size
        if any(first <= b <= last for b in self.bad):
            raise OSError(errno.EIO, "bad block")
        if any(first <= b <= last for b in self.buggy):
            raise ValueError("a bug in the handler")
        super().read(offset, buf)
