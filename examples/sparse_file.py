"""A disk over a sparse file of any size: trim punches holes, flush fsyncs.

Run it on the kernel's NBD driver (root; `modprobe nbd` first):
    python examples/sparse_file.py /var/tmp/disk.img 10G /dev/nbd0
(the file is created sparse if missing; an existing file keeps its size
when SIZE is "-"). Then: mkfs.ext4 /dev/nbd0 && mount /dev/nbd0 /mnt;
`du disk.img` shows only the blocks in use, and fstrim gives space back.

Or serve it to NBD clients, no root needed:
    blockfs serve examples/sparse_file.py:SparseFile --arg path=/var/tmp/disk.img \
        --arg size=10G --socket /tmp/disk.sock
and connect:
    nbdinfo 'nbd+unix:///?socket=/tmp/disk.sock'
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

import blockfs

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


# The size is known only when the file is opened, so it is set per instance.
# pread/pwrite on one descriptor are safe to run concurrently.
@blockfs.device(block_size=4096, concurrency=4)
class SparseFile:
    def __init__(self, path: str, size: int | str | None = None) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if size not in (None, "-"):
            os.ftruncate(self.fd, blockfs.parse_size(size))
        self.blocks = os.fstat(self.fd).st_size // 4096

    @blockfs.on_read
    def read(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:  # past the end of a shorter file: zeroes
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    @blockfs.on_write
    def write(self, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    @blockfs.on_trim
    def trim(self, offset: int, length: int) -> None:
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            code = ctypes.get_errno()
            if code != errno.EOPNOTSUPP:  # a file system without holes: trim is only a hint
                raise OSError(code, os.strerror(code))

    @blockfs.on_flush
    def flush(self) -> None:
        os.fsync(self.fd)

    @blockfs.on_unmount
    def unmount(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python examples/sparse_file.py FILE SIZE|- /dev/nbdX")
    blockfs.run(SparseFile(sys.argv[1], sys.argv[2]), sys.argv[3])
