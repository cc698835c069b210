"""A RAM disk: the smallest useful block device.

Run it on the kernel's NBD driver (root; `modprobe nbd` first):
    python examples/ramdisk.py /dev/nbd0
then, in another shell:
    mkfs.ext4 /dev/nbd0 && mount /dev/nbd0 /mnt

Or serve it to NBD clients, no root needed:
    blockfs serve examples/ramdisk.py:RamDisk --socket /tmp/ram.sock
and connect:
    nbdinfo 'nbd+unix:///?socket=/tmp/ram.sock'
    qemu-img info 'nbd+unix:///?socket=/tmp/ram.sock'
"""

from __future__ import annotations

import sys

import blockfs

BLOCK_SIZE = 4096
BLOCKS = 16384  # 64 MiB


@blockfs.device(block_size=BLOCK_SIZE, blocks=BLOCKS, multi_conn=True)
class RamDisk:
    def __init__(self) -> None:
        self.data = bytearray(BLOCK_SIZE * BLOCKS)
        # Slicing a memoryview copies nothing: the read below is one memcpy
        # straight into blockfs's reply buffer (a bytearray slice would copy twice).
        self.view = memoryview(self.data)

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.view[offset : offset + len(buf)]

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        self.data[offset : offset + len(data)] = data

    @blockfs.on_trim
    def trim(self, offset: int, length: int) -> None:
        # Trimmed ranges read back as zeroes (not required, but tidy).
        self.data[offset : offset + length] = bytes(length)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/ramdisk.py /dev/nbdX")
    blockfs.run(RamDisk(), sys.argv[1])
