"""XOR mirror: data striped over two files plus a parity file (RAID 4 with
two data disks). Lose any one of the three and every read still returns the
right data, rebuilt from the other two.

Run it on the kernel's NBD driver (root; `modprobe nbd` first):
    python examples/xor_mirror.py /var/tmp/mirror 256M /dev/nbd0
then mkfs.ext4 /dev/nbd0 && mount /dev/nbd0 /mnt, copy files in,
`rm /var/tmp/mirror/data1`, and read them all back: still intact.

Or serve it to NBD clients, no root needed:
    blockfs serve examples/xor_mirror.py:XorMirror --arg directory=/var/tmp/mirror \
        --arg size=256M --socket /tmp/mirror.sock
and connect:
    nbdinfo 'nbd+unix:///?socket=/tmp/mirror.sock'

Layout: logical block i lives in data file i % 2, at block i // 2 of that
file ("stripe" i // 2); parity block s = data0[s] XOR data1[s].
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator

import blockfs

BS = 4096
NAMES = ("data0", "data1", "parity")
log = logging.getLogger("xor_mirror")


def xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def pieces(offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
    """Split a byte range into (block, offset in block, count, position in
    range): requests need not be block aligned, blocks are the unit here."""
    pos = 0
    while pos < length:
        block, skip = divmod(offset + pos, BS)
        n = min(BS - skip, length - pos)
        yield block, skip, n, pos
        pos += n


class Member:
    """One backing file. It counts as lost once it is deleted (its link count
    drops to 0) or an I/O on it fails; a lost member is never used again."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        self.lost = False

    def alive(self) -> bool:
        if not self.lost and os.fstat(self.fd).st_nlink == 0:
            log.warning("%s was removed: running on the other two", self.path)
            self.lost = True
        return not self.lost

    def read_block(self, stripe: int) -> bytes:
        data = os.pread(self.fd, BS, stripe * BS)
        return data + bytes(BS - len(data))

    def write_block(self, stripe: int, data: bytes) -> None:
        try:
            os.pwrite(self.fd, data, stripe * BS)
        except OSError as exc:
            log.warning("%s failed (%s): running on the other two", self.path, exc)
            self.lost = True


@blockfs.device(block_size=BS)
class XorMirror:
    def __init__(self, directory: str, size: int | str) -> None:
        size = blockfs.parse_size(size)
        if size <= 0 or size % (2 * BS):
            raise ValueError(f"size: expected a positive multiple of {2 * BS}, got {size}")
        os.makedirs(directory, exist_ok=True)
        self.blocks = size // BS
        half = size // 2
        self.members = [Member(os.path.join(directory, n), half) for n in NAMES]

    def _data_block(self, block: int) -> bytes:
        """Logical block `block`, rebuilt from the other two if its file is lost."""
        stripe, disk = divmod(block, 2)
        own = self.members[disk]
        if own.alive():
            return own.read_block(stripe)
        other, parity = self.members[1 - disk], self.members[2]
        if not (other.alive() and parity.alive()):
            raise OSError(5, "two of three backing files are lost")
        return xor(other.read_block(stripe), parity.read_block(stripe))

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        for block, skip, n, pos in pieces(offset, len(buf)):
            buf[pos : pos + n] = self._data_block(block)[skip : skip + n]

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        for block, skip, n, pos in pieces(offset, len(data)):
            stripe, disk = divmod(block, 2)
            # Both halves of the stripe as they will be, then parity from them.
            halves = [self._data_block(2 * stripe), self._data_block(2 * stripe + 1)]
            new = bytearray(halves[disk])
            new[skip : skip + n] = data[pos : pos + n]
            halves[disk] = bytes(new)
            if self.members[disk].alive():
                self.members[disk].write_block(stripe, halves[disk])
            if self.members[2].alive():
                self.members[2].write_block(stripe, xor(halves[0], halves[1]))
            if sum(not m.alive() for m in self.members) > 1:
                raise OSError(5, "two of three backing files are lost")

    @blockfs.on_flush
    def flush(self) -> None:
        for m in self.members:
            if m.alive():
                os.fsync(m.fd)

    @blockfs.on_unmount
    def unmount(self) -> None:
        for m in self.members:
            os.close(m.fd)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python examples/xor_mirror.py DIRECTORY SIZE /dev/nbdX")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    blockfs.run(XorMirror(sys.argv[1], sys.argv[2]), sys.argv[3])
