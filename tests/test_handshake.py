"""Byte-for-byte tests of the server side of the NBD fixed newstyle handshake.

Client streams and expected server bytes are written out here with
struct.pack and literal numbers from doc/proto.md, never with the module's
own encoders. Every scenario is fed three ways: the whole stream in one
buffer, one byte at a time, and with the first transmission request in the
same buffer as the last option (it must come back untouched)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_outcome
from hypothesis import strategies as st

from blockfs.errors import HandshakeError
from blockfs.protocol.handshake import (
    NEED_DATA,
    Aborted,
    Export,
    Negotiated,
    ServerHandshake,
    StartTLS,
)

# --- wire values, spelled out from the spec --------------------------------
GREETING = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"  # FIXED_NEWSTYLE | NO_ZEROES
OPT_MAGIC = b"IHAVEOPT"
REPLY_MAGIC = bytes.fromhex("0003e889045565a9")

EXPORT_NAME, ABORT, LIST, PEEK_EXPORT, STARTTLS, INFO, GO, STRUCTURED_REPLY = range(1, 9)
LIST_META_CONTEXT, SET_META_CONTEXT, EXTENDED_HEADERS = 9, 10, 11

REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR_UNSUP = 2**31 + 1
ERR_POLICY = 2**31 + 2
ERR_INVALID = 2**31 + 3
ERR_TLS_REQD = 2**31 + 5
ERR_UNKNOWN = 2**31 + 6
ERR_TOO_BIG = 2**31 + 9

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

C_FIXED, C_NO_ZEROES = 1, 2
MAX_STRING = 4096
MAX_OPTION_LENGTH = 8 + 2 * 4096

# A transmission-phase NBD_CMD_READ request: what a client sends right after.
TRAILING = struct.pack(">IHHQQI", 0x25609513, 0, 0, 0xC0FFEE, 0, 512)

DISK = Export("disk", size=1 << 30, flags=0b101, description="the main disk")
SCRATCH = Export("scratch", size=3 * 4096, flags=0b011, min_block=512, preferred_block=4096, max_block=65536)
EXPORTS = {"disk": DISK, "scratch": SCRATCH}


def be(fmt: str, *values: int) -> bytes:
    return struct.pack(">" + fmt, *values)


def client_flags(flags: int = C_FIXED) -> bytes:
    return be("I", flags)


def option(opt: int, data: bytes = b"", *, length: int | None = None, magic: bytes = OPT_MAGIC) -> bytes:
    return magic + be("II", opt, len(data) if length is None else length) + data


def info_data(name: bytes, *requests: int) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO data."""
    return be("I", len(name)) + name + be("H", len(requests)) + b"".join(be("H", r) for r in requests)


def reply(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return REPLY_MAGIC + be("III", opt, rtype, len(data)) + data


def error(opt: int, rtype: int, message: str) -> bytes:
    return reply(opt, rtype, message.encode("utf-8"))


def ack(opt: int) -> bytes:
    return reply(opt, REP_ACK)


def info_export(opt: int, size: int, flags: int) -> bytes:
    return reply(opt, REP_INFO, be("HQH", INFO_EXPORT, size, flags))


def info_block_size(opt: int, minimum: int, preferred: int, maximum: int) -> bytes:
    return reply(opt, REP_INFO, be("HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum))


def disk_go_reply(opt: int = GO) -> bytes:
    """INFO/GO for "disk" with no information requests: EXPORT, BLOCK_SIZE, ACK."""
    return info_export(opt, 1 << 30, 0b101) + info_block_size(opt, 1, 4096, 32 << 20) + ack(opt)


# --- driving the state machine ----------------------------------------------
FEEDS = ["whole", "bytewise", "trailing"]


class Run(NamedTuple):
    events: list[object]
    sent: bytes  # everything after the greeting
    leftover: bytes  # bytes past the end of the handshake: trailing + never fed


def _chunks(flight: bytes, feed: str) -> list[bytes]:
    if feed == "bytewise":
        return [flight[i : i + 1] for i in range(len(flight))]
    return [flight] if flight else []


def serve(
    flights: Sequence[bytes],
    feed: str,
    *,
    close: bool = False,
    exports: dict[str, Export] | None = None,
    **kwargs: object,
) -> Run:
    """Feed the client's flights (a STARTTLS ends a flight: the client then
    waits for the ACK), collect events and output, stop at a terminal event."""
    hs = ServerHandshake(EXPORTS if exports is None else exports, **kwargs)  # type: ignore[arg-type]
    assert hs.initial_bytes() == GREETING
    flights = list(flights)
    if feed == "trailing":
        flights[-1] += TRAILING
    chunks = [chunk for flight in flights for chunk in _chunks(flight, feed)]
    if close:
        chunks.append(b"")
    events: list[object] = []
    sent = bytearray()
    for i, chunk in enumerate(chunks):
        hs.receive_data(chunk)
        while True:
            event = hs.next_event()
            sent += hs.data_to_send()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, StartTLS):
                hs.tls_started()
                continue
            trailing = event.trailing if isinstance(event, Negotiated) else b""
            return Run(events, bytes(sent), trailing + b"".join(chunks[i + 1 :]))
    return Run(events, bytes(sent), b"")


def assert_negotiated(run: Run, feed: str, export: Export, *, structured: bool = False) -> None:
    final = run.events[-1]
    assert isinstance(final, Negotiated)
    assert final.export == export
    assert final.structured_replies is structured
    if feed == "trailing":
        assert final.trailing == TRAILING  # handed over untouched, in the event itself
    assert run.leftover == (TRAILING if feed == "trailing" else b"")


@pytest.fixture(params=FEEDS)
def feed(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def handshake(**kwargs: object) -> ServerHandshake:
    hs = ServerHandshake(EXPORTS, **kwargs)  # type: ignore[arg-type]
    hs.initial_bytes()
    return hs


# --- greeting and client flags ----------------------------------------------
def test_initial_bytes() -> None:
    hs = ServerHandshake(EXPORTS)
    assert hs.initial_bytes() == b"NBDMAGICIHAVEOPT\x00\x03"
    assert hs.data_to_send() == b""
    with pytest.raises(RuntimeError):
        hs.initial_bytes()


@pytest.mark.parametrize(
    "flags", [0, C_NO_ZEROES, C_FIXED | 4, C_FIXED | C_NO_ZEROES | (1 << 31), 0xFFFFFFFF]
)
def test_bad_client_flags_drop_the_connection(flags: int, feed: str) -> None:
    with pytest.raises(HandshakeError):
        serve([client_flags(flags) + option(GO, info_data(b"disk"))], feed)


# --- NBD_OPT_EXPORT_NAME ----------------------------------------------------
def test_export_name_sends_size_flags_and_zeroes(feed: str) -> None:
    run = serve([client_flags(C_FIXED) + option(EXPORT_NAME, b"disk")], feed)
    assert run.sent == be("QH", 1 << 30, 0b101) + bytes(124)
    assert_negotiated(run, feed, DISK)


def test_export_name_without_zeroes_when_negotiated(feed: str) -> None:
    run = serve([client_flags(C_FIXED | C_NO_ZEROES) + option(EXPORT_NAME, b"scratch")], feed)
    assert run.sent == be("QH", 3 * 4096, 0b011)
    assert_negotiated(run, feed, SCRATCH)


def test_export_name_empty_means_default_export(feed: str) -> None:
    run = serve([client_flags(C_FIXED | C_NO_ZEROES) + option(EXPORT_NAME)], feed, default_export="scratch")
    assert run.sent == be("QH", 3 * 4096, 0b011)
    assert_negotiated(run, feed, SCRATCH)


def test_structured_replies_stay_in_effect_for_export_name(feed: str) -> None:
    stream = client_flags(C_FIXED | C_NO_ZEROES) + option(STRUCTURED_REPLY) + option(EXPORT_NAME, b"disk")
    run = serve([stream], feed)
    assert run.sent == ack(STRUCTURED_REPLY) + be("QH", 1 << 30, 0b101)
    assert_negotiated(run, feed, DISK, structured=True)


@pytest.mark.parametrize("name", [b"nope", b"", b"\xffdisk"])
def test_export_name_unknown_or_invalid_drops_the_connection(name: bytes, feed: str) -> None:
    with pytest.raises(HandshakeError):
        serve([client_flags() + option(EXPORT_NAME, name)], feed)


def test_export_name_too_long_fails_on_the_header() -> None:
    hs = handshake()
    hs.receive_data(client_flags() + option(EXPORT_NAME, length=MAX_STRING + 1))
    with pytest.raises(HandshakeError):
        hs.next_event()
    assert hs.buffered == 0


# --- NBD_OPT_GO / NBD_OPT_INFO ----------------------------------------------
def test_go_with_name_and_description_requests(feed: str) -> None:
    # Duplicate and unknown information requests are ignored.
    data = info_data(b"disk", INFO_NAME, INFO_DESCRIPTION, INFO_NAME, 77)
    run = serve([client_flags() + option(GO, data)], feed)
    assert run.sent == (
        info_export(GO, 1 << 30, 0b101)
        + reply(GO, REP_INFO, be("H", INFO_NAME) + b"disk")
        + reply(GO, REP_INFO, be("H", INFO_DESCRIPTION) + b"the main disk")
        + info_block_size(GO, 1, 4096, 32 << 20)
        + ack(GO)
    )
    assert_negotiated(run, feed, DISK)


def test_go_without_requests_sends_export_and_block_size(feed: str) -> None:
    run = serve([client_flags(C_FIXED | C_NO_ZEROES) + option(GO, info_data(b"disk"))], feed)
    assert run.sent == disk_go_reply()  # never any zero padding after GO
    assert_negotiated(run, feed, DISK)


def test_description_request_without_description_is_skipped(feed: str) -> None:
    run = serve([client_flags() + option(GO, info_data(b"scratch", INFO_DESCRIPTION, INFO_BLOCK_SIZE))], feed)
    assert run.sent == (
        info_export(GO, 3 * 4096, 0b011) + info_block_size(GO, 512, 4096, 65536) + ack(GO)
    )
    assert_negotiated(run, feed, SCRATCH)


def test_info_stays_in_option_haggling(feed: str) -> None:
    stream = client_flags() + option(INFO, info_data(b"disk")) + option(GO, info_data(b"scratch"))
    run = serve([stream], feed)
    assert run.sent == (
        disk_go_reply(INFO)
        + info_export(GO, 3 * 4096, 0b011)
        + info_block_size(GO, 512, 4096, 65536)
        + ack(GO)
    )
    assert [type(e) for e in run.events] == [Negotiated]
    assert_negotiated(run, feed, SCRATCH)


def test_go_with_structured_replies(feed: str) -> None:
    stream = client_flags() + option(STRUCTURED_REPLY) + option(GO, info_data(b"disk"))
    run = serve([stream], feed)
    assert run.sent == ack(STRUCTURED_REPLY) + disk_go_reply()
    assert_negotiated(run, feed, DISK, structured=True)


def test_go_empty_name_uses_default_export_and_names_it(feed: str) -> None:
    run = serve([client_flags() + option(GO, info_data(b"", INFO_NAME))], feed, default_export="disk")
    assert run.sent == (
        info_export(GO, 1 << 30, 0b101)
        + reply(GO, REP_INFO, be("H", INFO_NAME) + b"disk")
        + info_block_size(GO, 1, 4096, 32 << 20)
        + ack(GO)
    )
    assert_negotiated(run, feed, DISK)


def test_go_empty_name_without_default_uses_export_named_empty(feed: str) -> None:
    unnamed = Export("", size=512, flags=1)
    run = serve([client_flags() + option(GO, info_data(b""))], feed, exports={"": unnamed, "disk": DISK})
    assert run.sent == info_export(GO, 512, 1) + info_block_size(GO, 1, 4096, 32 << 20) + ack(GO)
    assert_negotiated(run, feed, unnamed)


def test_go_unknown_export_then_abort(feed: str) -> None:
    stream = client_flags() + option(GO, info_data(b"nope")) + option(GO, info_data(b"")) + option(ABORT)
    run = serve([stream], feed)
    assert run.sent == (
        error(GO, ERR_UNKNOWN, "no export named 'nope'")
        + error(GO, ERR_UNKNOWN, "no export named ''")  # no default export, no export named ""
        + ack(ABORT)
    )
    assert run.events == [Aborted()]


COUNT_MISMATCH = "information request count does not match the option length"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00\x00", "option data is too short"),
        (be("IH", 100, 0) + b"disk", "export name length exceeds the option data"),
        (be("I", 4) + b"disk" + be("HH", 2, INFO_NAME), COUNT_MISMATCH),
        (info_data(b"disk") + b"\x00\x01", COUNT_MISMATCH),
        (info_data(b"x" * (MAX_STRING + 1)), f"export name is longer than {MAX_STRING} bytes"),
        (info_data(b"\xc3\x28"), "export name is not valid UTF-8"),
    ],
)
def test_inconsistent_info_is_invalid_and_stays_in_sync(data: bytes, message: str, feed: str) -> None:
    stream = client_flags() + option(INFO, data) + option(GO, info_data(b"disk"))
    run = serve([stream], feed)
    assert run.sent == error(INFO, ERR_INVALID, message) + disk_go_reply()
    assert_negotiated(run, feed, DISK)


def test_info_of_max_length_is_read_and_long_messages_are_cut(feed: str) -> None:
    # 4 + 4096 + 2 + 2 * 2049 == MAX_OPTION_LENGTH: the largest option kept in memory.
    data = info_data(b"a" * MAX_STRING, *([INFO_NAME] * 2049))
    assert len(data) == MAX_OPTION_LENGTH
    run = serve([client_flags() + option(INFO, data) + option(GO, info_data(b"disk"))], feed)
    message = ("no export named '" + "a" * MAX_STRING + "'").encode()[:MAX_STRING]
    assert run.sent == reply(INFO, ERR_UNKNOWN, message) + disk_go_reply()
    assert_negotiated(run, feed, DISK)


def test_oversized_info_is_skipped_with_too_big(feed: str) -> None:
    data = info_data(b"disk", *([INFO_NAME] * 4200))
    assert len(data) > MAX_OPTION_LENGTH
    run = serve([client_flags() + option(INFO, data) + option(GO, info_data(b"disk"))], feed)
    assert run.sent == error(INFO, ERR_TOO_BIG, "NBD_OPT_INFO data is too long") + disk_go_reply()
    assert_negotiated(run, feed, DISK)


# --- NBD_OPT_LIST, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_ABORT, unknown options --
def test_list_then_abort(feed: str) -> None:
    run = serve([client_flags() + option(LIST) + option(ABORT)], feed)
    assert run.sent == (
        reply(LIST, REP_SERVER, be("I", 4) + b"disk" + b"the main disk")
        + reply(LIST, REP_SERVER, be("I", 7) + b"scratch")
        + ack(LIST)
        + ack(ABORT)
    )
    assert run.events == [Aborted()]


def test_list_with_data_is_invalid(feed: str) -> None:
    run = serve([client_flags() + option(LIST, b"disk") + option(GO, info_data(b"disk"))], feed)
    assert run.sent == error(LIST, ERR_INVALID, "NBD_OPT_LIST takes no data") + disk_go_reply()
    assert_negotiated(run, feed, DISK)


def test_structured_reply_with_data_or_twice_is_invalid(feed: str) -> None:
    stream = (
        client_flags()
        + option(STRUCTURED_REPLY, b"x")
        + option(STRUCTURED_REPLY)
        + option(STRUCTURED_REPLY)
        + option(GO, info_data(b"disk"))
    )
    run = serve([stream], feed)
    assert run.sent == (
        error(STRUCTURED_REPLY, ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        + ack(STRUCTURED_REPLY)
        + error(STRUCTURED_REPLY, ERR_INVALID, "structured replies are already negotiated")
        + disk_go_reply()
    )
    assert_negotiated(run, feed, DISK, structured=True)


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort_is_acked(data: bytes, feed: str) -> None:
    run = serve([client_flags() + option(ABORT, data)], feed)
    assert run.sent == ack(ABORT)
    assert run.events == [Aborted()]


def test_unsupported_options_are_refused_in_sync(feed: str) -> None:
    unsupported = [
        (PEEK_EXPORT, "NBD_OPT_PEEK_EXPORT is not supported"),
        (LIST_META_CONTEXT, "NBD_OPT_LIST_META_CONTEXT is not supported"),
        (SET_META_CONTEXT, "NBD_OPT_SET_META_CONTEXT is not supported"),
        (EXTENDED_HEADERS, "NBD_OPT_EXTENDED_HEADERS is not supported"),
        (0, "option 0 is not supported"),
        (12, "option 12 is not supported"),
        (0xFFFFFFFF, "option 4294967295 is not supported"),
    ]
    stream = client_flags()
    expected = b""
    for number, message in unsupported:
        stream += option(number, info_data(b"disk") + b"junk")
        expected += error(number, ERR_UNSUP, message)
    run = serve([stream + option(GO, info_data(b"disk"))], feed)
    assert run.sent == expected + disk_go_reply()
    assert_negotiated(run, feed, DISK)


def test_bad_option_magic_drops_the_connection(feed: str) -> None:
    with pytest.raises(HandshakeError):
        serve([client_flags() + option(GO, info_data(b"disk"), magic=b"IHAVEOPX")], feed)


def test_errors_are_sticky() -> None:
    hs = handshake()
    hs.receive_data(client_flags(0))
    with pytest.raises(HandshakeError):
        hs.next_event()
    hs.receive_data(client_flags() + option(GO, info_data(b"disk")))  # dropped
    assert hs.buffered == 0
    with pytest.raises(HandshakeError):
        hs.next_event()


def test_finished_handshake_refuses_more_bytes() -> None:
    hs = handshake()
    hs.receive_data(client_flags() + option(GO, info_data(b"disk")))
    assert isinstance(hs.next_event(), Negotiated)
    with pytest.raises(RuntimeError):
        hs.receive_data(TRAILING)
    with pytest.raises(RuntimeError):
        hs.next_event()


# --- end of stream ------------------------------------------------------------
@pytest.mark.parametrize("feed", ["whole", "bytewise"])
@pytest.mark.parametrize(
    "stream",
    [b"", client_flags(), client_flags() + option(LIST)],
    ids=["before-flags", "after-flags", "after-list"],
)
def test_close_between_options_is_aborted(stream: bytes, feed: str) -> None:
    run = serve([stream], feed, close=True)
    assert run.events == [Aborted()]


@pytest.mark.parametrize("feed", ["whole", "bytewise"])
@pytest.mark.parametrize(
    "stream",
    [
        client_flags()[:2],
        client_flags() + option(LIST)[:10],
        client_flags() + option(GO, info_data(b"disk"))[:-1],
        client_flags() + option(99, b"abcdef")[:-1],
        client_flags() + option(EXPORT_NAME, b"disk")[:-1],
    ],
    ids=["mid-flags", "mid-header", "mid-go", "mid-skip", "mid-export-name"],
)
def test_close_mid_message_is_an_error(stream: bytes, feed: str) -> None:
    with pytest.raises(HandshakeError):
        serve([stream], feed, close=True)


# --- TLS ----------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"", b"x"])
def test_starttls_refused_when_tls_is_off(data: bytes, feed: str) -> None:
    run = serve([client_flags() + option(STARTTLS, data) + option(GO, info_data(b"disk"))], feed)
    assert run.sent == error(STARTTLS, ERR_POLICY, "TLS is not enabled on this server") + disk_go_reply()
    assert_negotiated(run, feed, DISK)


def test_starttls_upgrade_resets_negotiation_state(feed: str) -> None:
    before = client_flags() + option(STRUCTURED_REPLY) + option(STARTTLS)
    after = option(STARTTLS) + option(GO, info_data(b"disk"))
    run = serve([before, after], feed, tls="on")
    assert run.sent == (
        ack(STRUCTURED_REPLY)
        + ack(STARTTLS)
        + error(STARTTLS, ERR_INVALID, "TLS is already active")
        + disk_go_reply()
    )
    assert run.events[0] == StartTLS()
    # The spec: no negotiation state survives STARTTLS.
    assert_negotiated(run, feed, DISK, structured=False)


def test_starttls_with_data_is_invalid(feed: str) -> None:
    run = serve([client_flags() + option(STARTTLS, b"x") + option(GO, info_data(b"disk"))], feed, tls="on")
    assert run.sent == error(STARTTLS, ERR_INVALID, "NBD_OPT_STARTTLS takes no data") + disk_go_reply()
    assert_negotiated(run, feed, DISK)


def test_tls_required_refuses_options_until_starttls(feed: str) -> None:
    message = "TLS is required: send NBD_OPT_STARTTLS first"
    refused = [LIST, INFO, GO, STRUCTURED_REPLY, SET_META_CONTEXT, 42]
    before = client_flags()
    for number in refused:
        before += option(number, info_data(b"disk") if number in (INFO, GO) else b"")
    before += option(STARTTLS)
    after = option(LIST) + option(STRUCTURED_REPLY) + option(GO, info_data(b"disk"))
    run = serve([before, after], feed, tls="require")
    assert run.sent == (
        b"".join(error(number, ERR_TLS_REQD, message) for number in refused)
        + ack(STARTTLS)
        + reply(LIST, REP_SERVER, be("I", 4) + b"disk" + b"the main disk")
        + reply(LIST, REP_SERVER, be("I", 7) + b"scratch")
        + ack(LIST)
        + ack(STRUCTURED_REPLY)
        + disk_go_reply()
    )
    assert run.events[0] == StartTLS()
    assert_negotiated(run, feed, DISK, structured=True)


def test_tls_required_export_name_without_tls_drops_the_connection(feed: str) -> None:
    with pytest.raises(HandshakeError):
        serve([client_flags() + option(EXPORT_NAME, b"disk")], feed, tls="require")


def test_tls_required_still_allows_abort(feed: str) -> None:
    run = serve([client_flags() + option(ABORT)], feed, tls="require")
    assert run.sent == ack(ABORT)
    assert run.events == [Aborted()]


def test_tls_active_property() -> None:
    hs = handshake(tls="on")
    hs.receive_data(client_flags() + option(STARTTLS))
    assert hs.next_event() == StartTLS()
    assert hs.data_to_send() == ack(STARTTLS)
    assert not hs.tls_active
    assert hs.next_event() is NEED_DATA  # nothing is parsed until the upgrade
    hs.tls_started()
    assert hs.tls_active
    with pytest.raises(RuntimeError):
        hs.tls_started()


def test_data_in_the_starttls_buffer_is_an_injection() -> None:
    hs = handshake(tls="on")
    hs.receive_data(client_flags() + option(STARTTLS) + option(GO, info_data(b"disk")))
    with pytest.raises(HandshakeError):
        hs.next_event()
    assert hs.data_to_send() == b""  # no ACK: the upgrade never happens


def test_plaintext_before_tls_started_is_rejected() -> None:
    hs = handshake(tls="on")
    hs.receive_data(client_flags() + option(STARTTLS))
    assert hs.next_event() == StartTLS()
    hs.receive_data(option(GO, info_data(b"disk")))
    with pytest.raises(HandshakeError):
        hs.tls_started()
    with pytest.raises(HandshakeError):
        hs.next_event()


def test_plaintext_after_starttls_fails_next_event() -> None:
    hs = handshake(tls="require")
    hs.receive_data(client_flags() + option(STARTTLS))
    assert hs.next_event() == StartTLS()
    hs.receive_data(b"\x16\x03\x01")
    with pytest.raises(HandshakeError):
        hs.next_event()


def test_close_before_tls_upgrade_is_an_error() -> None:
    hs = handshake(tls="on")
    hs.receive_data(client_flags() + option(STARTTLS))
    assert hs.next_event() == StartTLS()
    hs.receive_data(b"")
    with pytest.raises(HandshakeError):
        hs.next_event()


# --- bounded memory -----------------------------------------------------------
FOUR_GIB = 2**32 - 1  # the largest length an option header can declare


@pytest.mark.parametrize(
    ("number", "tls", "expected"),
    [
        (99, "off", error(99, ERR_UNSUP, "option 99 is not supported")),
        (INFO, "off", error(INFO, ERR_TOO_BIG, "NBD_OPT_INFO data is too long")),
        (GO, "off", error(GO, ERR_TOO_BIG, "NBD_OPT_GO data is too long")),
        (LIST, "off", error(LIST, ERR_INVALID, "NBD_OPT_LIST takes no data")),
        (STARTTLS, "on", error(STARTTLS, ERR_INVALID, "NBD_OPT_STARTTLS takes no data")),
        (GO, "require", error(GO, ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")),
    ],
    ids=["unknown", "info", "go", "list", "starttls", "tls-required"],
)
def test_four_gib_option_is_skipped_without_buffering(number: int, tls: str, expected: bytes) -> None:
    hs = handshake(tls=tls)
    chunk = bytes(1 << 20)
    head = client_flags() + option(number, length=FOUR_GIB)
    hs.receive_data(head + chunk[: 1000])
    remaining = FOUR_GIB - 1000
    while remaining:
        assert hs.next_event() is NEED_DATA
        assert hs.buffered == 0
        assert hs.data_to_send() == b""
        piece = chunk if remaining >= len(chunk) else chunk[:remaining]
        hs.receive_data(piece)
        assert hs.buffered == 0  # dropped on arrival, never stored
        remaining -= len(piece)
    # The answer comes once the last byte is gone, and the stream is in sync.
    hs.receive_data(option(ABORT))
    assert hs.next_event() == Aborted()
    assert hs.data_to_send() == expected + ack(ABORT)


def test_skipping_without_next_event_between_chunks_stays_bounded() -> None:
    hs = handshake()
    hs.receive_data(client_flags() + option(99, length=FOUR_GIB))
    assert hs.next_event() is NEED_DATA
    chunk = bytes(1 << 20)
    for _ in range(64):  # a transport feeding several chunks per next_event()
        hs.receive_data(chunk)
    assert hs.buffered == 0


# --- construction ---------------------------------------------------------------
def test_constructor_validates_its_arguments() -> None:
    with pytest.raises(ValueError):
        ServerHandshake(EXPORTS, tls="maybe")
    with pytest.raises(ValueError):
        ServerHandshake(EXPORTS, default_export="nope")
    with pytest.raises(ValueError):
        ServerHandshake({"other": DISK})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "a\0b"},
        {"name": "x" * (MAX_STRING + 1)},
        {"description": "é" * (MAX_STRING // 2 + 1)},
        {"size": -1},
        {"size": 2**64},
        {"flags": 1 << 16},
        {"max_block": 2**32},
    ],
)
def test_export_rejects_values_that_do_not_fit_the_wire(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"name": "disk", "size": 4096, "flags": 1, **kwargs}
    with pytest.raises(ValueError):
        Export(**fields)  # type: ignore[arg-type]


# --- fuzzing ------------------------------------------------------------------------
@st.composite
def client_options(draw: st.DrawFn) -> bytes:
    """One option, mostly well formed, sometimes lying about its length or magic."""
    number = draw(st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)))
    if number in (INFO, GO) and draw(st.booleans()):
        name = draw(st.sampled_from([b"disk", b"scratch", b"", b"nope", b"\xff"]))
        data = info_data(name, *draw(st.lists(st.integers(0, 5), max_size=4)))
    else:
        data = draw(st.binary(max_size=48))
    shape = draw(st.integers(0, 9))  # mostly honest lengths, so that options get parsed
    if shape < 7:
        length = len(data)
    elif shape < 9:
        length = draw(st.integers(0, MAX_OPTION_LENGTH + 16))
    else:
        length = draw(st.integers(0, 2**32 - 1))
    magic = draw(st.sampled_from([OPT_MAGIC] * 15 + [b"IHAVEOPX", b"\x00" * 8]))
    return magic + be("II", number, length) + data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flags=st.sampled_from([C_FIXED, C_FIXED | C_NO_ZEROES] * 4 + [0, C_NO_ZEROES, C_FIXED | 4, 2**31]),
    pieces=st.lists(st.one_of(client_options(), client_options(), st.binary(max_size=24)), max_size=8),
    tls=st.sampled_from(["off", "on", "require"]),
    cuts=st.lists(st.integers(1, 64), max_size=40),
)
def test_fuzz_only_handshake_errors_and_bounded_memory(
    flags: int, pieces: list[bytes], tls: str, cuts: list[int]
) -> None:
    hs = handshake(tls=tls, default_export="disk")
    stream = client_flags(flags) + b"".join(pieces)
    chunks = []
    for cut in cuts:
        if stream:
            chunks.append(stream[:cut])
            stream = stream[cut:]
    chunks += [stream, b""] if stream else [b""]  # b"": the client closes
    try:
        for chunk in chunks:
            hs.receive_data(chunk)
            while True:
                event = hs.next_event()
                hs.data_to_send()
                if event is NEED_DATA:
                    # At most one option header plus one option kept in memory.
                    assert hs.buffered < 16 + MAX_OPTION_LENGTH
                    break
                if isinstance(event, StartTLS):
                    hs.tls_started()
                    continue
                assert isinstance(event, (Negotiated, Aborted))
                note_outcome(type(event).__name__)
                return
        pytest.fail("the stream ended without a terminal event or an error")
    except HandshakeError:
        note_outcome("HandshakeError")
