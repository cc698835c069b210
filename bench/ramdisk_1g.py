"""The blockfs side of the benchmark: a 1 GiB RAM disk over one bytearray.

Served by bench/run.py as
    python -m blockfs serve bench/ramdisk_1g.py:RamDisk1G --socket SOCK
and, in the kernel part (bench/kernel_guest.py), attached with blockfs.run().
The same RAM disk as bench/nbdkit_ramdisk.py (nbdkit's Python plugin), so the
two Python servers do the same work per request: one slice copy.

BLOCKFS_BENCH_BLOCKS overrides the size in 4 KiB blocks (the UML guest uses a
smaller disk, see docs/performance.md).
"""

from __future__ import annotations

import os

import blockfs

BLOCK_SIZE = 4096
BLOCKS = int(os.environ.get("BLOCKFS_BENCH_BLOCKS", 262144))  # 262144 * 4 KiB = 1 GiB


@blockfs.device(block_size=BLOCK_SIZE, blocks=BLOCKS, multi_conn=True)
class RamDisk1G:
    def __init__(self) -> None:
        self.data = bytearray(BLOCK_SIZE * BLOCKS)

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset : offset + len(buf)]

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        self.data[offset : offset + len(data)] = data
