"""Unit tests of the picows adapter's parts that need no socket: text_frame, the upgrade-head
parser and its refusals, access_token redaction, and the per-connection logic (`_Connection`)
driven with picows' own test frames and a fake WSTransport."""

from __future__ import annotations

import logging
import struct
from typing import Any

import pytest
from picows import WSCloseCode, WSMsgType
from picows.picows import _make_test_ws_frame

from fleetwire.transport.base import Refusal, Socket, TransportLimits, text_frame
from fleetwire.transport.logs import RedactAccessToken
from fleetwire.transport.picows import (
    PICOWS_PARSER_ERROR_LOG,
    _Connection,
    _picows_parser_error,
    _refusal_bytes,
    _transport_refusal,
    parse_upgrade_head,
    redact_access_token,
)

# ---------------------------------------------------------------------------------------------
# text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_text_frame_header_and_payload(size: int) -> None:
    """text_frame: FIN + TEXT, unmasked, minimal length encoding, payload unchanged."""
    payload = b"p" * size
    data = text_frame(payload)
    assert data[0] == 0x81
    assert not data[1] & 0x80
    flag = data[1] & 0x7F
    if size < 126:
        assert (flag, data[2:]) == (size, payload)
    elif size < 65536:
        assert flag == 126
        assert struct.unpack("!H", data[2:4])[0] == size
        assert data[4:] == payload
    else:
        assert flag == 127
        assert struct.unpack("!Q", data[2:10])[0] == size
        assert data[10:] == payload


# ---------------------------------------------------------------------------------------------
# Head parsing and refusals


def head(target: str = "/ws/device", *lines: str, method: str = "GET") -> bytes:
    base = [
        f"{method} {target} HTTP/1.1",
        "host: x",
        "upgrade: websocket",
        "connection: Upgrade",
        "sec-websocket-version: 13",
        "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
        *lines,
    ]
    return ("\r\n".join(base) + "\r\n\r\n").encode()


def test_parse_upgrade_head_fields() -> None:
    """Path without query, first query values, lower-case headers, repeated headers joined."""
    parsed = parse_upgrade_head(
        head(
            "/ws/cl%69ent?access_token=abc&x=1&x=2&empty=",
            "X-Forwarded-For: 1.2.3.4",
            "x-forwarded-for: 5.6.7.8",
        ),
        "10.0.0.1:5555",
    )
    request = parsed.request
    assert parsed.method == "GET"
    assert parsed.target == "/ws/cl%69ent?access_token=abc&x=1&x=2&empty="
    assert request.path == "/ws/client"
    assert request.query == {"access_token": "abc", "x": "1", "empty": ""}
    assert request.headers["x-forwarded-for"] == "1.2.3.4, 5.6.7.8"
    assert request.headers["connection"] == "Upgrade"
    assert request.peer == "10.0.0.1:5555"


def test_parse_absolute_form_target() -> None:
    """An absolute-form request target yields its path."""
    assert parse_upgrade_head(head("http://host:1/ws/device?a=b"), None).request.path == "/ws/device"


def test_valid_upgrade_has_no_transport_refusal() -> None:
    """A well-formed upgrade, Firefox's `Connection: keep-alive, Upgrade` included, passes."""
    assert _transport_refusal(parse_upgrade_head(head(), None)) is None
    firefox = head().replace(b"connection: Upgrade", b"connection: keep-alive, Upgrade")
    assert _transport_refusal(parse_upgrade_head(firefox, None)) is None


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (head().replace(b"version: 13", b"version: 8"), 426),
        (head().replace(b"sec-websocket-version: 13\r\n", b""), 426),
        (head().replace(b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""), 400),
        (head().replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"not base64!"), 400),
        (head().replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"c2hvcnQ="), 400),
        (head(method="POST"), 400),
        (head("/ws", "content-length: 5"), 400),
    ],
    ids=["version-8", "no-version", "no-key", "bad-key", "short-key", "post", "body"],
)
def test_transport_refusals(data: bytes, status: int) -> None:
    """RFC 6455 §4.2.1 violations are refused with the right status (426 names version 13)."""
    refusal = _transport_refusal(parse_upgrade_head(data, None))
    assert refusal is not None
    assert refusal.status == status
    if status == 426:
        assert refusal.headers == {"Sec-WebSocket-Version": "13"}


def test_refusal_bytes_are_a_json_http_response() -> None:
    """A Refusal becomes status line, JSON content type, extra headers, Connection: close, body."""
    data = _refusal_bytes(Refusal(401, "unauthorized", "no token", {"WWW-Authenticate": "Bearer"}))
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 401 Unauthorized"
    assert "Content-Type: application/json" in lines
    assert "WWW-Authenticate: Bearer" in lines
    assert "Connection: close" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert body == b'{"error":"unauthorized","message":"no token"}'


def test_refusal_with_an_invalid_status_becomes_500() -> None:
    """A Refusal with a non-error status is answered 500 rather than a broken response."""
    assert _refusal_bytes(Refusal(200, "ok", "not a refusal")).startswith(b"HTTP/1.1 500 ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/ws?access_token=abc.def-ghi", "/ws?access_token=[REDACTED]"),
        ("/ws?a=1&ACCESS_TOKEN=x&b=2", "/ws?a=1&ACCESS_TOKEN=[REDACTED]&b=2"),
        ('"GET /x?access_token=t HTTP/1.1" 200', '"GET /x?access_token=[REDACTED] HTTP/1.1" 200'),
        ("/ws?token=x", "/ws?token=x"),
    ],
)
def test_redact_access_token(text: str, expected: str) -> None:
    """Only the access_token value is replaced, whatever its case and position."""
    assert redact_access_token(text) == expected


def test_log_filter_redacts_message_and_args() -> None:
    """RedactAccessToken rewrites a record's message and string arguments, keeps the rest."""
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s "%s" %d', ("1.2.3.4", "/a?access_token=s", 200), None
    )
    assert RedactAccessToken().filter(record)
    assert record.getMessage() == '1.2.3.4 "/a?access_token=[REDACTED]" 200'


# ---------------------------------------------------------------------------------------------
# _Connection with a fake picows transport


class FakeTCP:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False
        self.closing = False
        self.eof = False  # write_eof() called: the write side is shut, reading goes on
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.eof, "no write after write_eof"
        self.written.append(bytes(data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def abort(self) -> None:
        self.aborted = self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


class FakeWS:
    """The subset of picows.WSTransport that _Connection uses, recording what it is asked."""

    def __init__(self) -> None:
        self.underlying_transport = FakeTCP()
        self.sent: list[tuple[Any, bytes]] = []
        self.closes: list[tuple[int, bytes]] = []
        self.pongs: list[bytes] = []
        self.disconnects = 0
        self.is_disconnected = False
        self.close_handshake = None

    def send(self, msg_type: Any, payload: bytes) -> None:
        self.sent.append((msg_type, payload))

    def send_ping(self) -> None:
        self.sent.append((WSMsgType.PING, b""))

    def send_pong(self, payload: bytes) -> None:
        self.pongs.append(payload)

    def send_close(self, code: int, message: bytes) -> None:
        if not self.closes:  # picows ignores a second close frame
            self.closes.append((int(code), message))

    def disconnect(self, graceful: bool = True) -> None:
        self.disconnects += 1


class FakeLoop:
    def __init__(self) -> None:
        self.timers: list[tuple[float, Any]] = []

    def call_later(self, delay: float, callback: Any) -> Any:
        self.timers.append((delay, callback))
        return self

    def cancel(self) -> None:
        pass


class Rec:
    def __init__(self) -> None:
        self.socket: Socket | None = None
        self.messages: list[tuple[bytes, bool]] = []
        self.pongs = 0
        self.closed: list[int | None] = []

    def on_open(self, socket: Socket) -> None:
        self.socket = socket

    def on_message(self, payload: bytes, is_text: bool) -> None:
        self.messages.append((payload, is_text))

    def on_pong(self) -> None:
        self.pongs += 1

    def on_closed(self, code: int | None) -> None:
        self.closed.append(code)


LIMITS = TransportLimits(max_message_bytes=1000, send_queue=3, close_grace_s=1.5)


def connected(limits: TransportLimits = LIMITS) -> tuple[_Connection, FakeWS, Rec, FakeLoop]:
    rec, ws, loop = Rec(), FakeWS(), FakeLoop()
    conn = _Connection(rec, limits, loop)  # type: ignore[arg-type]  # fakes stand in for picows/asyncio
    conn.on_ws_connected(ws)  # type: ignore[arg-type]  # fakes stand in for picows/asyncio
    assert rec.socket is conn
    return conn, ws, rec, loop


def feed(conn: _Connection, ws: FakeWS, msg_type: WSMsgType, payload: bytes, fin: bool = True) -> None:
    conn.on_ws_frame(ws, _make_test_ws_frame(msg_type, payload, fin, False))  # type: ignore[arg-type]  # fakes stand in for picows/asyncio


def disconnect(conn: _Connection, ws: FakeWS) -> None:
    ws.is_disconnected = True
    conn.on_ws_disconnected(ws)  # type: ignore[arg-type]  # fakes stand in for picows/asyncio


def test_single_frames_delivered() -> None:
    """Text and binary frames reach on_message with is_text set accordingly."""
    conn, ws, rec, _ = connected()
    feed(conn, ws, WSMsgType.TEXT, "h\u00e9".encode())
    feed(conn, ws, WSMsgType.BINARY, b"\xff")
    assert rec.messages == [("h\u00e9".encode(), True), (b"\xff", False)]


def test_reassembly_with_interleaved_ping() -> None:
    """Continuations are joined; a ping in between is answered with its payload."""
    conn, ws, rec, _ = connected()
    feed(conn, ws, WSMsgType.TEXT, b"ab", fin=False)
    feed(conn, ws, WSMsgType.PING, b"hb")
    feed(conn, ws, WSMsgType.CONTINUATION, b"cd", fin=False)
    feed(conn, ws, WSMsgType.CONTINUATION, b"ef")
    assert rec.messages == [(b"abcdef", True)]
    assert ws.pongs == [b"hb"]


def test_reassembly_limit_is_1009() -> None:
    """A fragmented message growing past max_message_bytes closes 1009 and delivers nothing."""
    conn, ws, rec, loop = connected()
    feed(conn, ws, WSMsgType.TEXT, b"a" * 600, fin=False)
    feed(conn, ws, WSMsgType.CONTINUATION, b"b" * 401)
    assert ws.closes == [(1009, b"message_too_big")]
    assert ws.underlying_transport.eof
    assert ws.disconnects == 0  # draining until the peer's close frame (RFC 6455 §7.1.1)
    assert loop.timers[0][0] == LIMITS.close_grace_s
    assert rec.messages == []
    disconnect(conn, ws)
    assert rec.closed == [1009]


def test_input_after_our_close_is_drained_until_the_peer_close() -> None:
    """After a 1009 the peer's further continuations are read and discarded (not a 1002, not a
    TCP close with unread input); its close frame then closes TCP; on_closed(1009) once."""
    conn, ws, rec, loop = connected()
    conn.pause_reading()
    feed(conn, ws, WSMsgType.TEXT, b"a" * 600, fin=False)
    feed(conn, ws, WSMsgType.CONTINUATION, b"b" * 401, fin=False)
    assert ws.underlying_transport.reading  # the peer's close frame must be able to arrive
    for _ in range(3):
        feed(conn, ws, WSMsgType.CONTINUATION, b"c" * 100, fin=False)
    feed(conn, ws, WSMsgType.TEXT, b"x")
    assert (ws.closes, ws.disconnects, rec.messages) == ([(1009, b"message_too_big")], 0, [])
    feed(conn, ws, WSMsgType.CLOSE, struct.pack("!H", 1009))
    assert ws.disconnects == 1
    assert len(loop.timers) == 1
    disconnect(conn, ws)
    assert rec.closed == [1009]


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([(WSMsgType.CONTINUATION, b"x", True)], 1002),
        ([(WSMsgType.TEXT, b"x", False), (WSMsgType.TEXT, b"y", True)], 1002),
        ([(WSMsgType.TEXT, b"\xc3\x28", True)], 1007),
        ([(WSMsgType.TEXT, b"\xe2\x82", False), (WSMsgType.CONTINUATION, b"\xac", True)], None),
        ([(WSMsgType.TEXT, b"\xe2\x82", False), (WSMsgType.CONTINUATION, b"\x28", True)], 1007),
        ([(WSMsgType.CLOSE, struct.pack("!H", 1005), True)], 1002),
        ([(WSMsgType.CLOSE, struct.pack("!H", 5000), True)], 1002),
    ],
    ids=["orphan-cont", "text-in-fragment", "bad-utf8", "utf8-split-ok", "utf8-split-bad", "1005", "5000"],
)
def test_frame_rules(frames: list[tuple[WSMsgType, bytes, bool]], code: int | None) -> None:
    """Sequence and UTF-8 rules: 1002 / 1007, or delivery when valid (UTF-8 split over frames)."""
    conn, ws, rec, _ = connected()
    for msg_type, payload, fin in frames:
        feed(conn, ws, msg_type, payload, fin)
    if code is None:
        assert rec.messages == [("\u20ac".encode(), True)]
        assert ws.closes == []
    else:
        assert ws.closes[0][0] == code
        assert rec.messages == []
        disconnect(conn, ws)
        assert rec.closed == [code]


def test_reserved_bit_is_1002() -> None:
    """RSV1 without a negotiated extension fails the connection with 1002."""
    conn, ws, rec, _ = connected()
    conn.on_ws_frame(ws, _make_test_ws_frame(WSMsgType.TEXT, b"x", True, True))  # type: ignore[arg-type]  # fakes stand in for picows/asyncio
    assert ws.closes[0][0] == 1002
    assert rec.messages == []


def test_peer_close_is_answered_normal_and_reported_once() -> None:
    """A peer close gets 1000 `normal`, TCP is dropped, on_closed(1000) runs once: the server's
    answer, not the peer's code, is reported."""
    conn, ws, rec, _ = connected()
    feed(conn, ws, WSMsgType.CLOSE, struct.pack("!H", 4000) + b"bye")
    assert ws.closes == [(1000, b"normal")]
    assert ws.disconnects == 1
    assert conn.closed
    conn.send(b"late")
    assert ws.sent == []
    disconnect(conn, ws)
    disconnect(conn, ws)
    assert rec.closed == [1000]


def test_our_close_then_peer_reply() -> None:
    """close(): close frame, grace timer; the peer's answer drops TCP; on_closed(our code)."""
    conn, ws, rec, loop = connected()
    conn.close(4009, "replaced")
    conn.close(1000, "again")  # ignored
    assert ws.closes == [(4009, b"replaced")]
    assert ws.underlying_transport.eof
    assert ws.disconnects == 0
    assert len(loop.timers) == 1
    feed(conn, ws, WSMsgType.TEXT, b"ignored")
    feed(conn, ws, WSMsgType.CLOSE, struct.pack("!H", 4009))
    assert ws.disconnects == 1
    disconnect(conn, ws)
    assert rec.closed == [4009]
    assert rec.messages == []


def test_tcp_drop_reports_none() -> None:
    """No close frame either way: on_closed(None)."""
    conn, ws, rec, _ = connected()
    disconnect(conn, ws)
    assert rec.closed == [None]


def test_pong_reaches_handler_and_ping_is_sent() -> None:
    """ping() sends a PING; a PONG frame calls on_pong."""
    conn, ws, rec, _ = connected()
    conn.ping()
    feed(conn, ws, WSMsgType.PONG, b"")
    assert ws.sent == [(WSMsgType.PING, b"")]
    assert rec.pongs == 1


def test_paused_writes_are_held_and_flushed_in_order() -> None:
    """While paused, send/send_frame are held as frames and flushed in order on resume."""
    conn, ws, _, _ = connected()
    tcp = ws.underlying_transport
    conn.send(b"a")
    conn.send_frame(text_frame(b"b"))
    conn.pause_writing()
    conn.send(b"c")
    conn.send_frame(text_frame(b"d"))
    assert conn.queued == 2
    conn.resume_writing()
    assert conn.queued == 0
    assert ws.sent == [(WSMsgType.TEXT, b"a")]
    assert tcp.written == [text_frame(b"b"), text_frame(b"c"), text_frame(b"d")]


def test_write_frame_follows_the_socket_state() -> None:
    """write_frame (the fan-out's hot path) writes straight to TCP while nothing is held,
    holds behind earlier held frames while paused (order kept), counts towards send_queue,
    and sends nothing once the socket is closing."""
    conn, ws, _, _ = connected()
    tcp = ws.underlying_transport
    conn.write_frame(text_frame(b"1"))
    assert tcp.written == [text_frame(b"1")]
    conn.pause_writing()
    conn.send(b"2")
    conn.write_frame(text_frame(b"3"))
    assert (conn.queued, len(tcp.written)) == (2, 1)
    conn.resume_writing()
    conn.write_frame(text_frame(b"4"))
    assert tcp.written == [text_frame(m) for m in (b"1", b"2", b"3", b"4")]
    conn.pause_writing()
    for i in range(LIMITS.send_queue + 1):  # one past the queue: 4008, as through send_frame
        conn.write_frame(text_frame(b"x%d" % i))
    assert ws.closes == [(4008, b"slow_consumer")]
    conn.resume_writing()
    conn.write_frame(text_frame(b"after the close frame"))
    assert tcp.written == [text_frame(m) for m in (b"1", b"2", b"3", b"4")]
    disconnect(conn, ws)
    conn.write_frame(text_frame(b"after the disconnect"))
    assert len(tcp.written) == 4


def test_slow_consumer_is_4008_and_bounded() -> None:
    """More than send_queue held messages: the queue never grows past it, close 4008 queued
    behind the unread data, then TCP closed after the flush (aborted after the grace period)."""
    conn, ws, rec, _ = connected()
    conn.pause_writing()
    for i in range(LIMITS.send_queue):
        conn.send(b"m%d" % i)
        assert conn.queued == i + 1
    assert not ws.underlying_transport.aborted
    conn.send(b"one too many")
    assert conn.queued == 0
    assert ws.closes == [(4008, b"slow_consumer")]
    assert ws.underlying_transport.eof
    assert conn.closed
    conn.send(b"after")
    assert conn.queued == 0
    disconnect(conn, ws)
    assert rec.closed == [4008]


def test_close_flushes_held_messages_first() -> None:
    """close() while paused writes the held frames before the close frame."""
    conn, ws, _, _ = connected()
    conn.pause_writing()
    conn.send(b"last words")
    conn.close(4003, "forbidden")
    assert ws.underlying_transport.written == [text_frame(b"last words")]
    assert ws.closes == [(4003, b"forbidden")]


def test_handler_exception_closes_1011() -> None:
    """An exception in on_message closes 1011 `internal_error`."""
    conn, ws, rec, _ = connected()

    def boom(payload: bytes, is_text: bool) -> None:
        raise RuntimeError("bug")

    rec.on_message = boom  # type: ignore[method-assign]  # a raising handler for one test
    feed(conn, ws, WSMsgType.TEXT, b"x")
    assert ws.closes == [(1011, b"internal_error")]


def test_parser_failure_1009_sends_contract_reason() -> None:
    """picows' frame-size rejection (reported through parser_failed) is sent with
    `message_too_big`, the write side shut, then on_closed(1009)."""
    conn, ws, rec, _ = connected()
    conn.parser_failed(1009, "frame too big")
    assert ws.closes == [(1009, b"message_too_big")]
    assert ws.underlying_transport.eof
    disconnect(conn, ws)
    assert rec.closed == [1009]


def test_parser_failure_keeps_picows_reason_for_other_codes() -> None:
    """A 1002 from picows' parser is sent first by us, with picows' reason text."""
    conn, ws, rec, _ = connected()
    conn.parser_failed(1002, "frame is not masked")
    conn.parser_failed(1002, "again")  # picows logs each failing parse: only one close frame
    assert ws.closes == [(1002, b"frame is not masked")]
    disconnect(conn, ws)
    assert rec.closed == [1002]


def test_picows_parser_error_log_is_recognised() -> None:
    """`_picows_parser_error` reads exactly picows' log call: (code, reason) or None."""
    args = ((WSCloseCode.MESSAGE_TOO_BIG, "frame too big"),)
    assert _picows_parser_error(PICOWS_PARSER_ERROR_LOG, args) == (1009, "frame too big")
    assert _picows_parser_error("WS parser failure, initiate disconnect", ()) is None
    assert _picows_parser_error(PICOWS_PARSER_ERROR_LOG, ("not a tuple",)) is None

