"""The NBD fixed newstyle handshake, server side, as a pure state machine:
bytes in, events out, bytes out (the h11 way). No sockets here, so every rule
is testable byte for byte.

The transport drives it like this::

    hs = ServerHandshake(exports, tls="off")
    sock.sendall(hs.initial_bytes())
    while True:
        event = hs.next_event()
        sock.sendall(hs.data_to_send())
        if event is NEED_DATA:
            hs.receive_data(sock.recv(65536))   # b"" at end of stream
        elif isinstance(event, StartTLS):
            sock = wrap_in_tls(sock)
            hs.tls_started()
        else:
            break  # Negotiated (serve event.trailing first) or Aborted

`next_event()` raises HandshakeError when the client breaks the protocol;
whatever `data_to_send()` still holds may be flushed, then the connection
is dropped.

Design notes:

* Options are handled by their header. Only NBD_OPT_INFO / NBD_OPT_GO (at
  most MAX_OPTION_LENGTH bytes) and NBD_OPT_EXPORT_NAME (at most MAX_STRING)
  have their data read into memory. Every other option's data is counted
  down and dropped as it arrives, and the answer is queued once the last
  byte is gone, so a client cannot make us buffer a 4 GiB option and the
  byte stream stays in sync.
* Memory is therefore bounded by one option header plus one in-memory
  option (`buffered` < 16 + MAX_OPTION_LENGTH after `next_event()` returns
  NEED_DATA), provided the transport calls `next_event()` after each
  `receive_data()`, as the loop above does.
* Replies only go into an outgoing buffer; the transport decides when to
  write them. The handshake ends with exactly one terminal event
  (Negotiated or Aborted) or a HandshakeError; calling it afterwards is a
  programming error (RuntimeError).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from typing import Literal

import attrs

from ..errors import HandshakeError
from .constants import (
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
)
from .transmission import NEED_DATA, Signal

__all__ = [
    "NEED_DATA",
    "Aborted",
    "Event",
    "Export",
    "Negotiated",
    "ServerHandshake",
    "StartTLS",
]

_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
_REPLY_HEADER = struct.Struct(">QIII")  # reply magic, option, reply type, length
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

_SERVER_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
# A plain int: ~ on an IntFlag only complements the known bits, hiding unknown ones.
_KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
_EXPORT_NAME_PADDING = bytes(124)
_TLS_MODES = ("off", "on", "require")


# --- values and events ------------------------------------------------------
def _check_string(what: str, text: str) -> None:
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_STRING:
        raise ValueError(f"{what}: at most {MAX_STRING} bytes of UTF-8, got {len(encoded)}")
    if "\0" in text:
        raise ValueError(f"{what}: NBD strings cannot contain NUL")


def _check_name(instance: Export, attribute: attrs.Attribute[str], value: str) -> None:
    _check_string(attribute.name, value)


def _check_description(instance: Export, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None:
        _check_string(attribute.name, value)


def _in_range(bits: int) -> Callable[[Export, attrs.Attribute[int], int], None]:
    """Validator: an int that fits the wire field it is sent in."""
    limit = 1 << bits

    def check(instance: Export, attribute: attrs.Attribute[int], value: int) -> None:
        if not 0 <= value < limit:
            raise ValueError(f"{attribute.name}: expected 0 <= value < 2**{bits}, got {value}")

    return check


@attrs.frozen
class Export:
    """What the server offers under one name. `flags` are the transmission
    flags exactly as sent (HAS_FLAGS etc., computed by the caller)."""

    name: str = attrs.field(validator=_check_name)
    size: int = attrs.field(validator=_in_range(64))
    flags: int = attrs.field(validator=_in_range(16))
    description: str | None = attrs.field(default=None, validator=_check_description)
    min_block: int = attrs.field(default=1, validator=_in_range(32))
    preferred_block: int = attrs.field(default=4096, validator=_in_range(32))
    max_block: int = attrs.field(default=32 * 1024 * 1024, validator=_in_range(32))


@attrs.frozen
class Negotiated:
    """The handshake is over; the transmission phase begins."""

    export: Export
    structured_replies: bool  # client negotiated NBD_OPT_STRUCTURED_REPLY (since the last STARTTLS)
    trailing: bytes  # bytes received after the handshake: the first requests


@attrs.frozen
class StartTLS:
    """The ACK to NBD_OPT_STARTTLS is queued: send `data_to_send()`, wrap
    the socket in TLS, then call `tls_started()`."""


@attrs.frozen
class Aborted:
    """The client sent NBD_OPT_ABORT (ACK queued) or closed cleanly between options."""


Event = Negotiated | StartTLS | Aborted | Literal[Signal.NEED_DATA]


class _State(enum.Enum):
    CLIENT_FLAGS = "client flags"
    OPTION_HEADER = "option header"
    OPTION_DATA = "option data"  # reading an INFO/GO/EXPORT_NAME payload into memory
    SKIPPING = "skipping"  # dropping an option's data, then sending `_after_skip`
    AWAIT_TLS = "await tls"
    DONE = "done"
    FAILED = "failed"


class _Rejected(Exception):
    """An option is answered with an error reply; the handshake goes on."""

    def __init__(self, reply: OptionReply, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


# --- encoding ---------------------------------------------------------------
def _option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def _error_reply(option: int, reply: OptionReply, message: str) -> bytes:
    # The message is a spec "string": at most MAX_STRING bytes, cut on a
    # character boundary (it may quote a client-supplied name).
    text = message.encode("utf-8")[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return _option_reply(option, reply, text)


def _info_replies(option: int, export: Export, requested: frozenset[int]) -> bytes:
    """NBD_REP_INFO replies for INFO/GO. EXPORT is mandatory; BLOCK_SIZE is
    always sent because clients ignore info they did not ask for, and those
    that understand it learn our limits; NAME/DESCRIPTION only on request."""
    infos = [_INFO_EXPORT.pack(Info.EXPORT, export.size, export.flags)]
    if Info.NAME in requested:
        infos.append(_U16.pack(Info.NAME) + export.name.encode("utf-8"))
    if Info.DESCRIPTION in requested and export.description is not None:
        infos.append(_U16.pack(Info.DESCRIPTION) + export.description.encode("utf-8"))
    infos.append(
        _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block)
    )
    return b"".join(_option_reply(option, OptionReply.INFO, info) for info in infos)


def _server_reply(export: Export) -> bytes:
    """NBD_REP_SERVER: name length, name, then the description as free text."""
    name = export.name.encode("utf-8")
    details = (export.description or "").encode("utf-8")
    return _option_reply(Option.LIST, OptionReply.SERVER, _U32.pack(len(name)) + name + details)


def _option_name(option: int) -> str:
    try:
        return f"NBD_OPT_{Option(option).name}"
    except ValueError:
        return f"option {option}"


# --- the state machine ------------------------------------------------------
class ServerHandshake:
    """Server side of the fixed newstyle handshake for one connection."""

    def __init__(
        self,
        exports: Mapping[str, Export],
        *,
        default_export: str | None = None,
        tls: str = "off",
    ) -> None:
        if tls not in _TLS_MODES:
            raise ValueError(f"tls: expected one of {_TLS_MODES}, got {tls!r}")
        for key, export in exports.items():
            if key != export.name:
                raise ValueError(f"exports: key {key!r} differs from Export.name {export.name!r}")
        if default_export is not None and default_export not in exports:
            raise ValueError(f"default_export: no export named {default_export!r}")
        self._exports = dict(exports)  # a snapshot: one connection sees one consistent list
        self._default_export = default_export
        self._tls_mode = tls
        self._tls_active = False
        self._greeted = False
        self._state = _State.CLIENT_FLAGS
        self._error: HandshakeError | None = None
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._eof = False
        self._no_zeroes = False
        self._structured = False
        self._option = 0  # the option being read or skipped
        self._length = 0  # its declared data length
        self._skip = 0  # data bytes of the current option still to drop
        self._after_skip = b""  # the reply to queue once they are dropped

    # --- the transport's side ------------------------------------------------
    def initial_bytes(self) -> bytes:
        """The server greeting; send it first, once."""
        if self._greeted:
            raise RuntimeError("initial_bytes() was already called")
        self._greeted = True
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, _SERVER_FLAGS)

    def receive_data(self, data: bytes) -> None:
        """Hand over bytes from the client; b"" means it closed the stream."""
        if self._state is _State.FAILED:
            return  # the connection is being dropped; keep nothing
        if self._state is _State.DONE:
            raise RuntimeError("the handshake is over: hand further bytes to the transmission phase")
        if self._eof:
            raise RuntimeError("receive_data() after the end of the stream")
        if not data:
            self._eof = True
            return
        view = memoryview(data)
        if self._state is _State.SKIPPING and not self._inbox:
            # Drop skipped bytes on arrival, so that even a transport that
            # feeds several chunks per next_event() never stores them.
            drop = min(self._skip, len(view))
            self._skip -= drop
            view = view[drop:]
        self._inbox += view

    def next_event(self) -> Event:
        """Process what has arrived: NEED_DATA, or the next event.

        Raises HandshakeError if the client broke the protocol; every later
        call raises it again."""
        if self._error is not None:
            raise HandshakeError(f"the handshake already failed: {self._error}")
        try:
            return self._advance()
        except HandshakeError as exc:
            self._fail(exc)
            raise

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def tls_started(self) -> None:
        """The transport has wrapped the connection in TLS after StartTLS."""
        if self._state is not _State.AWAIT_TLS:
            raise RuntimeError("tls_started() without a pending StartTLS event")
        if self._inbox:
            # Those bytes came in plaintext after our ACK: treating them as
            # if they were protected would let an attacker inject options.
            exc = HandshakeError("client sent plaintext data after NBD_OPT_STARTTLS")
            self._fail(exc)
            raise exc
        self._tls_active = True
        self._state = _State.OPTION_HEADER

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def buffered(self) -> int:
        """Bytes received and held, not yet consumed (for tests/metrics)."""
        return len(self._inbox)

    # --- parsing --------------------------------------------------------------
    def _fail(self, exc: HandshakeError) -> None:
        self._error = exc
        self._state = _State.FAILED
        self._inbox.clear()

    def _advance(self) -> Event:
        # Each step consumes input and returns an event, or None to go on
        # (several options may be waiting in one buffer).
        while True:
            state = self._state
            if state is _State.CLIENT_FLAGS:
                event = self._read_client_flags()
            elif state is _State.OPTION_HEADER:
                event = self._read_option_header()
            elif state is _State.OPTION_DATA:
                event = self._read_option_data()
            elif state is _State.SKIPPING:
                event = self._skip_option_data()
            elif state is _State.AWAIT_TLS:
                event = self._await_tls()
            else:
                raise RuntimeError("the handshake is over")
            if event is not None:
                return event

    def _starved(self, *, clean: bool, where: str) -> Event:
        """Not enough input: wait, or end if the client has closed.
        `clean` means nothing of the next message has arrived yet."""
        if not self._eof:
            return Signal.NEED_DATA  # the same object as NEED_DATA, typed as a Literal
        if clean:
            self._state = _State.DONE
            return Aborted()
        raise HandshakeError(f"client closed the connection in the middle of {where}")

    def _read_client_flags(self) -> Event | None:
        if len(self._inbox) < _CLIENT_FLAGS.size:
            # Connecting and closing without a word is a hard disconnect, not a violation.
            return self._starved(clean=not self._inbox, where="the client flags")
        (flags,) = _CLIENT_FLAGS.unpack_from(self._inbox)
        del self._inbox[: _CLIENT_FLAGS.size]
        if flags & ~_KNOWN_CLIENT_FLAGS:
            # The spec: the server MUST drop the connection on unknown flags.
            raise HandshakeError(f"unknown client flags 0x{flags & ~_KNOWN_CLIENT_FLAGS:08x}")
        if not flags & ClientFlag.FIXED_NEWSTYLE:
            # Plain newstyle clients cannot parse option replies; we only speak fixed.
            raise HandshakeError("client does not support fixed newstyle negotiation")
        self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._state = _State.OPTION_HEADER
        return None

    def _read_option_header(self) -> Event | None:
        if len(self._inbox) < _OPTION_HEADER.size:
            return self._starved(clean=not self._inbox, where="an option header")
        magic, option, length = _OPTION_HEADER.unpack_from(self._inbox)
        if magic != IHAVEOPT:
            raise HandshakeError(f"bad option magic 0x{magic:016x} (expected 0x{IHAVEOPT:016x})")
        del self._inbox[: _OPTION_HEADER.size]
        self._option, self._length = option, length
        return self._dispatch(option, length)

    def _dispatch(self, option: int, length: int) -> Event | None:
        """Decide from the header alone what to do with an option."""
        if option == Option.ABORT:
            # The spec says to ignore any data; we close anyway, so don't wait for it.
            self._queue(self._ack())
            self._state = _State.DONE
            return Aborted()
        if option == Option.STARTTLS:
            return self._starttls(length)
        if option == Option.EXPORT_NAME:
            self._start_export_name(length)
        elif self._tls_mode == "require" and not self._tls_active:
            # FORCEDTLS: everything but STARTTLS and ABORT, unknown options included.
            self._reject(OptionReply.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
        elif option in (Option.INFO, Option.GO):
            self._start_info_or_go(length)
        elif option == Option.LIST:
            self._list(length)
        elif option == Option.STRUCTURED_REPLY:
            self._structured_reply(length)
        else:
            self._reject(OptionReply.ERR_UNSUP, f"{_option_name(option)} is not supported")
        return None

    def _skip_then(self, reply: bytes) -> None:
        """Drop the current option's data, then queue `reply`."""
        self._skip = self._length
        self._after_skip = reply
        self._state = _State.SKIPPING

    def _reject(self, reply: OptionReply, message: str) -> None:
        self._skip_then(_error_reply(self._option, reply, message))

    def _skip_option_data(self) -> Event | None:
        drop = min(self._skip, len(self._inbox))
        del self._inbox[:drop]
        self._skip -= drop
        if self._skip:
            return self._starved(clean=False, where=f"the data of {_option_name(self._option)}")
        self._queue(self._after_skip)
        self._after_skip = b""
        self._state = _State.OPTION_HEADER
        return None

    def _read_option_data(self) -> Event | None:
        if len(self._inbox) < self._length:
            return self._starved(clean=False, where=f"the data of {_option_name(self._option)}")
        data = bytes(self._inbox[: self._length])
        del self._inbox[: self._length]
        self._state = _State.OPTION_HEADER
        if self._option == Option.EXPORT_NAME:
            return self._finish_export_name(data)
        return self._info_or_go(data)

    # --- the options ----------------------------------------------------------
    def _start_export_name(self, length: int) -> None:
        # NBD_OPT_EXPORT_NAME has no error reply: every refusal is a disconnect.
        if self._tls_mode == "require" and not self._tls_active:
            raise HandshakeError("NBD_OPT_EXPORT_NAME without TLS, but this server requires TLS")
        if length > MAX_STRING:
            raise HandshakeError(f"NBD_OPT_EXPORT_NAME name is {length} bytes (at most {MAX_STRING})")
        self._state = _State.OPTION_DATA

    def _finish_export_name(self, data: bytes) -> Negotiated:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            raise HandshakeError("NBD_OPT_EXPORT_NAME name is not valid UTF-8") from None
        export = self._lookup(name)
        if export is None:
            raise HandshakeError(f"NBD_OPT_EXPORT_NAME: no export named {name!r}")
        reply = _EXPORT_NAME_REPLY.pack(export.size, export.flags)
        self._queue(reply if self._no_zeroes else reply + _EXPORT_NAME_PADDING)
        return self._negotiated(export)

    def _start_info_or_go(self, length: int) -> None:
        if length > MAX_OPTION_LENGTH:
            self._reject(OptionReply.ERR_TOO_BIG, f"{_option_name(self._option)} data is too long")
        else:
            self._state = _State.OPTION_DATA

    def _info_or_go(self, data: bytes) -> Negotiated | None:
        option = self._option
        try:
            name, requested = _parse_info_request(data)
            export = self._lookup(name)
            if export is None:
                raise _Rejected(OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
        except _Rejected as rejected:
            self._queue(_error_reply(option, rejected.reply, rejected.message))
            return None
        self._queue(_info_replies(option, export, requested) + self._ack())
        if option == Option.GO:
            return self._negotiated(export)
        return None

    def _list(self, length: int) -> None:
        if length:
            self._reject(OptionReply.ERR_INVALID, "NBD_OPT_LIST takes no data")
        else:
            self._skip_then(b"".join(map(_server_reply, self._exports.values())) + self._ack())

    def _structured_reply(self, length: int) -> None:
        if length:
            self._reject(OptionReply.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        elif self._structured:
            # The spec lets a server fail a repeated state-changing option.
            self._reject(OptionReply.ERR_INVALID, "structured replies are already negotiated")
        else:
            self._structured = True
            self._skip_then(self._ack())

    def _starttls(self, length: int) -> StartTLS | None:
        if self._tls_mode == "off":
            # NOTLS: POLICY rather than UNSUP, since the option is known but disabled here.
            self._reject(OptionReply.ERR_POLICY, "TLS is not enabled on this server")
            return None
        if self._tls_active:
            self._reject(OptionReply.ERR_INVALID, "TLS is already active")
            return None
        if length:
            self._reject(OptionReply.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return None
        if self._inbox:
            # The client must wait for our ACK and then speak TLS: anything
            # already here was sent in plaintext, possibly by an attacker.
            raise HandshakeError("client sent data after NBD_OPT_STARTTLS without waiting for the reply")
        self._queue(self._ack())
        # The spec: no negotiation state survives STARTTLS.
        self._structured = False
        self._state = _State.AWAIT_TLS
        return StartTLS()

    def _await_tls(self) -> Event:
        if self._inbox:
            raise HandshakeError("client sent plaintext data after NBD_OPT_STARTTLS")
        if self._eof:
            raise HandshakeError("client closed the connection before starting TLS")
        return Signal.NEED_DATA

    # --- helpers --------------------------------------------------------------
    def _lookup(self, name: str) -> Export | None:
        """The empty name means the default export (or, without one, the export named "")."""
        if name == "" and self._default_export is not None:
            name = self._default_export
        return self._exports.get(name)

    def _negotiated(self, export: Export) -> Negotiated:
        trailing = bytes(self._inbox)
        self._inbox.clear()
        self._state = _State.DONE
        return Negotiated(export=export, structured_replies=self._structured, trailing=trailing)

    def _ack(self) -> bytes:
        return _option_reply(self._option, OptionReply.ACK)

    def _queue(self, data: bytes) -> None:
        self._outbox += data


def _parse_info_request(data: bytes) -> tuple[str, frozenset[int]]:
    """NBD_OPT_INFO/GO data: u32 name length, name, u16 count, count x u16.
    Raises _Rejected (ERR_INVALID) unless the lengths add up exactly."""
    if len(data) < _U32.size + _U16.size:
        raise _Rejected(OptionReply.ERR_INVALID, "option data is too short")
    (name_length,) = _U32.unpack_from(data)
    count_at = _U32.size + name_length
    if count_at + _U16.size > len(data):
        raise _Rejected(OptionReply.ERR_INVALID, "export name length exceeds the option data")
    if name_length > MAX_STRING:
        raise _Rejected(OptionReply.ERR_INVALID, f"export name is longer than {MAX_STRING} bytes")
    (count,) = _U16.unpack_from(data, count_at)
    if count_at + _U16.size + count * _U16.size != len(data):
        raise _Rejected(OptionReply.ERR_INVALID, "information request count does not match the option length")
    try:
        name = data[_U32.size : count_at].decode("utf-8")
    except UnicodeDecodeError:
        raise _Rejected(OptionReply.ERR_INVALID, "export name is not valid UTF-8") from None
    requests = struct.unpack_from(f">{count}H", data, count_at + _U16.size)
    return name, frozenset(requests)
