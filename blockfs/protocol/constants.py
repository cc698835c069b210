"""Numbers from the NBD protocol (doc/proto.md of NetworkBlockDevice/nbd)
and the kernel's include/uapi/linux/nbd.h. Nothing here does any work."""

from __future__ import annotations

import enum
import errno

# --- magics -----------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes the server sends
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle option magic
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- sizes ------------------------------------------------------------------
REQUEST_HEADER_SIZE = 28  # magic u32, flags u16, type u16, handle u64, offset u64, length u32
SIMPLE_REPLY_SIZE = 16  # magic u32, error u32, handle u64
STRUCTURED_REPLY_HEADER_SIZE = 20  # magic u32, flags u16, type u16, handle u64, length u32
MAX_PAYLOAD = 32 * 1024 * 1024  # largest read/write we accept; the spec's recommended bound
MAX_STRING = 4096  # longest export name / description / option string we accept
MAX_OPTION_LENGTH = 8 + 2 * MAX_STRING  # longest option payload we read into memory


class HandshakeFlag(enum.IntFlag):
    """Server flags sent once, right after NBDMAGIC IHAVEOPT."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags sent once, in reply to the server's handshake flags."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Per-export flags: what the server advertises for this device."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT = 1 << 31


class OptionReply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT | 1
    ERR_POLICY = REP_ERROR_BIT | 2
    ERR_INVALID = REP_ERROR_BIT | 3
    ERR_PLATFORM = REP_ERROR_BIT | 4
    ERR_TLS_REQD = REP_ERROR_BIT | 5
    ERR_UNKNOWN = REP_ERROR_BIT | 6
    ERR_SHUTDOWN = REP_ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
    ERR_TOO_BIG = REP_ERROR_BIT | 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


# The only error values NBD allows on the wire; every other errno becomes EIO.
WIRE_ERRNOS: frozenset[int] = frozenset(
    {
        errno.EPERM,
        errno.EIO,
        errno.ENOMEM,
        errno.EINVAL,
        errno.ENOSPC,
        errno.EOVERFLOW,
        errno.ENOTSUP,
        errno.ESHUTDOWN,
    }
)


def wire_errno(code: int | None) -> int:
    """Map any errno onto the set NBD allows (anything unknown is EIO)."""
    if code in WIRE_ERRNOS:
        return code  # type: ignore[return-value]
    if code == errno.EOPNOTSUPP:  # same value as ENOTSUP on Linux, kept for clarity
        return errno.ENOTSUP
    return errno.EIO


# --- kernel ioctls (include/uapi/linux/nbd.h): _IO(0xab, n) -----------------
def _io(nr: int) -> int:
    return (0xAB << 8) | nr


NBD_SET_SOCK = _io(0)
NBD_SET_BLKSIZE = _io(1)
NBD_SET_SIZE = _io(2)
NBD_DO_IT = _io(3)
NBD_CLEAR_SOCK = _io(4)
NBD_CLEAR_QUE = _io(5)
NBD_PRINT_DEBUG = _io(6)
NBD_SET_SIZE_BLOCKS = _io(7)
NBD_DISCONNECT = _io(8)
NBD_SET_TIMEOUT = _io(9)
NBD_SET_FLAGS = _io(10)
NBD_MAJOR = 43
