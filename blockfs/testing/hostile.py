"""A raw-socket NBD client kit for the handshake, for tests that play a
misbehaving client against a real server.

Everything is spelled out in bytes so a test can send anything: garbage
instead of client flags, options with lying lengths, a bad IHAVEOPT magic.
Once an export is negotiated, `transmission()` hands the socket to
`blockfs.testing.client.RawClient`. Every socket gets a timeout, so a server
bug shows up as a failure (TimeoutError), never as a hung test.

Typical use::

    with HostileClient.connect(server.address) as c:
        c.read_greeting()
        c.send_flags()
        c.structured_reply()
        c.go("")
        raw = c.transmission()
        raw.write(0, b"abc")
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

import attrs

from ..protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    Info,
    Option,
    OptionReply,
)
from .client import RawClient, recv_exactly

__all__ = [
    "DEFAULT_FLAGS",
    "ExportInfo",
    "HostileClient",
    "OptReply",
    "connect",
    "encode_option",
    "go_data",
    "wait_closed",
]

DEFAULT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")


def encode_option(option: int, data: bytes = b"", *, length: int | None = None, magic: int = IHAVEOPT) -> bytes:
    """An option header (with an honest length unless `length` is given) and its data."""
    return _OPTION_HEADER.pack(magic, option, len(data) if length is None else length) + data


def go_data(name: str | bytes = "", infos: Iterable[int] = ()) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count, information requests."""
    raw = name.encode("utf-8") if isinstance(name, str) else name
    req = list(infos)
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(req)}H", len(req), *req)


def connect(address: Any, timeout: float = 5.0) -> socket.socket:
    """A connected socket to a `blockfs.Server.address` (Unix path or TCP host/port)."""
    if getattr(address, "unix", None) is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = address.unix
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        target = (address.host, address.port)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def wait_closed(sock: socket.socket, timeout: float = 2.0) -> bytes:
    """Read until the peer closes; return what arrived. Raises TimeoutError if
    the connection is still open after `timeout` seconds. A reset counts as closed."""
    deadline = time.monotonic() + timeout
    got = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the server did not close the connection within {timeout} s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            raise TimeoutError(f"the server did not close the connection within {timeout} s") from None
        except ConnectionResetError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


@attrs.frozen
class OptReply:
    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & (1 << 31))


@attrs.frozen
class ExportInfo:
    size: int
    flags: int
    replies: tuple[OptReply, ...] = ()


class HostileClient:
    """One raw connection in the handshake phase."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)
        self.structured = False
        self.server_flags: int | None = None

    @classmethod
    def connect(cls, address: Any, timeout: float = 5.0) -> HostileClient:
        return cls(connect(address, timeout), timeout)

    # --- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HostileClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self) -> None:
        """Close abruptly: SO_LINGER 0 makes the kernel send an RST (TCP)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    # --- raw bytes ---------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exactly(self, n: int) -> bytes:
        self.sock.settimeout(self.timeout)
        return recv_exactly(self.sock, n)

    def wait_closed(self, timeout: float = 2.0) -> bytes:
        return wait_closed(self.sock, timeout)

    # --- handshake steps -------------------------------------------------------------
    def read_greeting(self) -> int:
        magic, opt_magic, flags = _GREETING.unpack(self.recv_exactly(_GREETING.size))
        assert magic == NBDMAGIC, f"bad server magic 0x{magic:016x}"
        assert opt_magic == IHAVEOPT, f"not a newstyle server: 0x{opt_magic:016x}"
        self.server_flags = flags
        return flags

    def send_flags(self, flags: int = DEFAULT_FLAGS) -> None:
        self.send(struct.pack(">I", flags))

    def send_option(self, option: int, data: bytes = b"", *, length: int | None = None,
                    magic: int = IHAVEOPT) -> None:
        self.send(encode_option(option, data, length=length, magic=magic))

    def read_reply(self) -> OptReply:
        magic, option, rtype, length = _REPLY_HEADER.unpack(self.recv_exactly(_REPLY_HEADER.size))
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic 0x{magic:016x}"
        return OptReply(option, rtype, self.recv_exactly(length) if length else b"")

    def read_final_reply(self, option: int) -> tuple[OptReply, list[OptReply]]:
        """Replies to one option up to its final one (ACK or an error): (final, all before it)."""
        before: list[OptReply] = []
        while True:
            r = self.read_reply()
            assert r.option == option, f"reply to option {r.option}, expected {option}"
            if r.type == OptionReply.ACK or r.is_error:
                return r, before
            before.append(r)

    def hello(self, flags: int = DEFAULT_FLAGS) -> None:
        self.read_greeting()
        self.send_flags(flags)

    def structured_reply(self) -> OptReply:
        self.send_option(Option.STRUCTURED_REPLY)
        final, _ = self.read_final_reply(Option.STRUCTURED_REPLY)
        if final.type == OptionReply.ACK:
            self.structured = True
        return final

    def info_or_go(self, option: int, name: str | bytes = "", infos: Iterable[int] = ()) -> ExportInfo | OptReply:
        """Send INFO/GO; the export's size and flags, or the error reply."""
        self.send_option(option, go_data(name, infos))
        final, before = self.read_final_reply(option)
        if final.is_error:
            return final
        size = flags = None
        for r in before:
            if r.type == OptionReply.INFO and len(r.data) >= 2:
                (kind,) = struct.unpack_from(">H", r.data)
                if kind == Info.EXPORT:
                    _, size, flags = struct.unpack(">HQH", r.data)
        assert size is not None and flags is not None, f"no NBD_INFO_EXPORT in {before}"
        return ExportInfo(size, flags, tuple(before))

    def go(self, name: str | bytes = "", infos: Iterable[int] = ()) -> ExportInfo | OptReply:
        return self.info_or_go(Option.GO, name, infos)

    def info(self, name: str | bytes = "", infos: Iterable[int] = ()) -> ExportInfo | OptReply:
        return self.info_or_go(Option.INFO, name, infos)

    def export_name(self, name: str | bytes = "", *, no_zeroes: bool = True) -> ExportInfo:
        raw = name.encode("utf-8") if isinstance(name, str) else name
        self.send_option(Option.EXPORT_NAME, raw)
        size, flags = struct.unpack(">QH", self.recv_exactly(10))
        if not no_zeroes:
            self.recv_exactly(124)
        return ExportInfo(size, flags)

    def abort(self) -> OptReply:
        self.send_option(Option.ABORT)
        return self.read_reply()

    def negotiate(self, name: str = "", *, structured: bool = True) -> ExportInfo:
        """The well-behaved path: greeting, flags, (structured replies), GO."""
        self.hello()
        if structured:
            ack = self.structured_reply()
            assert ack.type == OptionReply.ACK, ack
        result = self.go(name)
        assert isinstance(result, ExportInfo), result
        return result

    def transmission(self) -> RawClient:
        """The transmission-phase client over this socket."""
        self.sock.settimeout(self.timeout)
        return RawClient(self.sock, structured=self.structured)
