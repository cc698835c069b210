"""The blockfs side of the benchmark: a 1 GiB RAM disk over one bytearray.

Served by bench/run.py as
    python -m blockfs serve bench/ramdisk_1g.py:RamDisk1G --socket SOCK
and, in the kernel part (bench/kernel_guest.py), attached with blockfs.run().
The same RAM disk as bench/nbdkit_ramdisk.py (nbdkit's Python plugin): both
fill the buffer they are given from a memoryview of one bytearray, one copy.

BLOCKFS_BENCH_BLOCKS overrides the size in 4 KiB blocks (the UML guest uses a
smaller disk, see docs/performance.md).
"""

from __future__ import annotations

import os

import blockfs
from blockfs.testing.devices import MemoryDisk

BLOCK_SIZE = 4096
BLOCKS = int(os.environ.get("BLOCKFS_BENCH_BLOCKS", 262144))  # 262144 * 4 KiB = 1 GiB


@blockfs.device(block_size=BLOCK_SIZE, blocks=BLOCKS, multi_conn=True)
class RamDisk1G(MemoryDisk):
    """blockfs.testing.devices.MemoryDisk: read is `buf[:] = view[a:b]` (one
    memcpy into blockfs's reply buffer), write a bytearray slice assignment."""

    def __init__(self) -> None:
        super().__init__(BLOCK_SIZE * BLOCKS, BLOCK_SIZE)
