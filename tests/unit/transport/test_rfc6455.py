"""RFC 6455 rules without I/O (fleetwire.transport.rfc6455): frames, messages, close codes,
UTF-8, the closing handshake and the opening-handshake checks."""

from __future__ import annotations

import struct

import pytest

from fleetwire.transport import rfc6455
from fleetwire.transport.rfc6455 import (
    CloseHandshake,
    MessageAssembler,
    ProtocolError,
    Rejection,
    check_upgrade_request,
    is_utf8,
    parse_close,
    reserved_bits_error,
    server_frame,
    valid_peer_close_code,
)


def raises(code: int, reason: str) -> pytest.RaisesContext[ProtocolError]:
    return pytest.raises(ProtocolError, match=f"^\\({code}, '{reason}'\\)$")


# ---------------------------------------------------------------------------------------------
# Frames


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_server_frame_uses_the_minimal_length_encoding(size: int, header: bytes) -> None:
    """§5.2: FIN set, no mask bit, 7-bit / 16-bit / 64-bit length, whichever is minimal."""
    payload = b"p" * size
    assert server_frame(rfc6455.OP_TEXT, payload) == header + payload


def test_server_frame_other_opcodes() -> None:
    """The opcode goes in the low nibble of the first byte (§5.2)."""
    assert server_frame(rfc6455.OP_BINARY, b"\x00") == b"\x82\x01\x00"
    assert server_frame(rfc6455.OP_PONG, b"") == b"\x8a\x00"


@pytest.mark.parametrize("bits", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)])
def test_reserved_bits_are_a_protocol_error(bits: tuple[int, int, int]) -> None:
    """§5.2: no extension is negotiated, so any RSV bit fails with 1002."""
    error = reserved_bits_error(*bits)
    assert error is not None
    assert (error.code, error.reason) == (1002, "reserved bits set")


def test_no_reserved_bits_pass() -> None:
    """RSV 0/0/0 is the only valid combination."""
    assert reserved_bits_error(0, 0, 0) is None


# ---------------------------------------------------------------------------------------------
# UTF-8 and close codes


@pytest.mark.parametrize(
    ("data", "valid"),
    [
        (b"", True),
        (b"plain ascii", True),
        ("h\u00e9llo \u2603 \U0001f600".encode(), True),
        (b"\xff\xfe", False),
        ("caf\u00e9".encode()[:-1], False),  # truncated sequence
        (b"\xed\xa0\x80", False),  # an encoded surrogate (U+D800) is not UTF-8
        (b"\xc0\xaf", False),  # overlong encoding of "/"
    ],
)
def test_is_utf8(data: bytes, valid: bool) -> None:
    """§8.1: valid UTF-8 only; surrogates and overlong forms are invalid."""
    assert is_utf8(data) is valid


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        (999, False),
        (1000, True),
        (1001, True),
        (1003, True),
        (1004, False),
        (1005, False),
        (1006, False),
        (1007, True),
        (1014, True),
        (1015, False),
        (1016, False),
        (2999, False),
        (3000, True),
        (4999, True),
        (5000, False),
    ],
)
def test_valid_peer_close_code(code: int, valid: bool) -> None:
    """§7.4.1 / §7.4.2: 1005, 1006, 1015 never on the wire; 1004 reserved; 3000-4999 open."""
    assert valid_peer_close_code(code) is valid


def test_parse_close() -> None:
    """The code of a close body; 1005 for an empty one (§7.1.5)."""
    assert parse_close(b"") == 1005
    assert parse_close(struct.pack("!H", 1000)) == 1000
    assert parse_close(struct.pack("!H", 4000) + "bye \u2603".encode()) == 4000


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        (b"\x03", 1002, "close frame with a 1-byte body"),
        (struct.pack("!H", 1005), 1002, "invalid close code"),
        (struct.pack("!H", 5000), 1002, "invalid close code"),
        (struct.pack("!H", 1000) + b"\xff", 1007, "invalid UTF-8 in the close reason"),
    ],
)
def test_parse_close_violations(payload: bytes, code: int, reason: str) -> None:
    """§5.5.1 / §7.4: malformed close bodies fail with 1002, a non-UTF-8 reason with 1007."""
    with raises(code, reason):
        parse_close(payload)


# ---------------------------------------------------------------------------------------------
# Message assembly


def test_single_frames_are_messages() -> None:
    """A final TEXT or BINARY frame is a message at once, the same bytes object."""
    assembler = MessageAssembler(10)
    payload = b"hi"
    assert assembler.single(True, payload) is payload
    assert assembler.text
    assert assembler.single(False, b"\xff") == b"\xff"
    assert not assembler.text
    assert not assembler.in_progress


def test_fragments_are_joined() -> None:
    """§5.4: first frame, continuations, the final one completes the message (its kind kept)."""
    assembler = MessageAssembler(10)
    assembler.begin(False, memoryview(b"ab"))
    assert assembler.in_progress
    assert assembler.continuation(False, memoryview(b"cd")) is None
    assert assembler.continuation(True, b"ef") == b"abcdef"
    assert not assembler.text
    assert not assembler.in_progress


def test_utf8_split_across_fragments_is_valid() -> None:
    """UTF-8 is checked on the whole message: a character may straddle two frames."""
    assembler = MessageAssembler(10)
    assembler.begin(True, b"\xe2\x82")
    assert assembler.continuation(True, b"\xac") == "\u20ac".encode()
    assert assembler.text


def test_message_at_the_limit_passes() -> None:
    """Exactly max_message_bytes, single or fragmented, is delivered."""
    assembler = MessageAssembler(4)
    assert assembler.single(True, b"abcd") == b"abcd"
    assembler.begin(True, b"ab")
    assert assembler.continuation(True, b"cd") == b"abcd"


@pytest.mark.parametrize("fin", [True, False])
def test_first_frame_over_the_limit_is_1009(fin: bool) -> None:
    """One frame over the limit, final or not: 1009 `message_too_big`."""
    assembler = MessageAssembler(4)
    with raises(1009, "message_too_big"):
        if fin:
            assembler.single(True, b"abcde")
        else:
            assembler.begin(True, b"abcde")
    assert not assembler.in_progress


def test_fragments_over_the_limit_are_1009_and_forgotten() -> None:
    """The limit is checked before a continuation is copied; the partial message is dropped."""
    assembler = MessageAssembler(4)
    assembler.begin(True, b"abc")
    with raises(1009, "message_too_big"):
        assembler.continuation(False, b"de")
    assert not assembler.in_progress


@pytest.mark.parametrize(
    ("frames", "code", "reason"),
    [
        ([("cont", True, b"x")], 1002, "continuation frame without a message"),
        ([("text", False, b"a"), ("text", True, b"b")], 1002, "new data frame inside a fragmented message"),
        (
            [("text", False, b"a"), ("binary", False, b"b")],
            1002,
            "new data frame inside a fragmented message",
        ),
        ([("text", True, b"\xc3\x28")], 1007, "invalid UTF-8"),
        ([("text", False, b"ok\xc3"), ("cont", True, b"\x28")], 1007, "invalid UTF-8"),
    ],
)
def test_assembly_violations(frames: list[tuple[str, bool, bytes]], code: int, reason: str) -> None:
    """§5.4 sequence rules -> 1002; invalid UTF-8 text -> 1007 (binary is never checked)."""
    assembler = MessageAssembler(100)
    with raises(code, reason):
        for kind, fin, payload in frames:
            if kind == "cont":
                assembler.continuation(fin, payload)
            elif fin:
                assembler.single(kind == "text", payload)
            else:
                assembler.begin(kind == "text", payload)
    assert not assembler.in_progress


def test_binary_is_not_utf8_checked() -> None:
    """Binary messages carry any bytes."""
    assert MessageAssembler(10).single(False, b"\xc3\x28") == b"\xc3\x28"


def test_reset_forgets_a_partial_message() -> None:
    """reset() (the connection is closing) drops a message in progress."""
    assembler = MessageAssembler(10)
    assembler.begin(True, b"a")
    assembler.reset()
    assert not assembler.in_progress


# ---------------------------------------------------------------------------------------------
# Closing handshake


def test_server_initiated_close() -> None:
    """We close first: one close frame only; the peer's answer completes the handshake (no
    second answer); the session is told our code."""
    close = CloseHandshake()
    assert not close.started
    assert close.send(4003)
    assert not close.send(1000)
    assert close.started
    assert close.receive(4003) is None
    assert (close.sent, close.received, close.reported_code) == (4003, 4003, 4003)


def test_peer_initiated_close_is_answered_1000() -> None:
    """The peer closes first: we answer 1000 whatever its code, and 1000 is reported."""
    close = CloseHandshake()
    assert close.receive(4000) == 1000
    assert not close.send(1001)  # the answer was our close frame
    assert (close.sent, close.received, close.reported_code) == (1000, 4000, 1000)


def test_no_close_frame_reports_none() -> None:
    """TCP dropped without a close frame either way: None."""
    assert CloseHandshake().reported_code is None


# ---------------------------------------------------------------------------------------------
# Opening handshake (§4.2.1)

GOOD = {"sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_valid_upgrade_request() -> None:
    """GET, version 13, a 16-byte base64 key, no body: accepted."""
    assert check_upgrade_request("GET", GOOD) is None
    assert check_upgrade_request("GET", {**GOOD, "content-length": "0"}) is None


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("POST", GOOD, Rejection(400, "bad_request", "a WebSocket upgrade must be a GET request")),
        (
            "GET",
            {**GOOD, "content-length": "5"},
            Rejection(400, "bad_request", "a WebSocket upgrade request has no body"),
        ),
        (
            "GET",
            {**GOOD, "transfer-encoding": "chunked"},
            Rejection(400, "bad_request", "a WebSocket upgrade request has no body"),
        ),
        (
            "GET",
            {**GOOD, "sec-websocket-version": "8"},
            Rejection(
                426,
                "upgrade_required",
                "unsupported WebSocket version, use 13",
                {"Sec-WebSocket-Version": "13"},
            ),
        ),
        (
            "GET",
            {"sec-websocket-version": "13"},
            Rejection(400, "bad_request", "missing or invalid Sec-WebSocket-Key"),
        ),
        (
            "GET",
            {**GOOD, "sec-websocket-key": "c2hvcnQ="},
            Rejection(400, "bad_request", "missing or invalid Sec-WebSocket-Key"),
        ),
        (
            "GET",
            {**GOOD, "sec-websocket-key": "not base64!"},
            Rejection(400, "bad_request", "missing or invalid Sec-WebSocket-Key"),
        ),
        (
            "GET",
            {**GOOD, "sec-websocket-key": "d\u00e9"},
            Rejection(400, "bad_request", "missing or invalid Sec-WebSocket-Key"),
        ),
    ],
    ids=["post", "body", "chunked", "version-8", "no-key", "short-key", "bad-base64", "non-ascii-key"],
)
def test_upgrade_rejections(method: str, headers: dict[str, str], expected: Rejection) -> None:
    """Each §4.2.1 violation maps to exactly one status, error and message."""
    assert check_upgrade_request(method, headers) == expected
