"""The one WebSocket transport: picows behind uvicorn's `ws` hook, REST and WebSocket on one port.

uvicorn parses the HTTP head; on `Upgrade: websocket` it builds the class returned by
`make_ws_protocol(...)` with keyword arguments, calls `connection_made(transport)`, then
`data_received(<the head rebuilt from its parsed headers>)`, then `transport.set_protocol(obj)`.
The class *is* a picows server protocol (a subclass of the private `picows.picows.WSProtocol`,
pinned `<2.4` in pyproject), so once upgraded every frame takes picows' own buffered path.

Handshake: the head is parsed into an `UpgradeRequest`, reading is paused and the (async)
`WebSocketApp` is awaited in a task, bounded by `handshake_timeout_s`. A `Refusal` (or a
transport-level refusal: 400/426/431) is written as an HTTP response with a JSON body, then the
TCP connection is closed. A `Handler` gets a 101 from picows: a minimal, canonical upgrade head is
fed into picows' read buffer and its (synchronous) listener factory returns the `_Connection`
prepared for it. Feeding a canonical head instead of uvicorn's rebuilt one keeps picows' own
header rules (exact `Connection: upgrade`, 16 KiB, 128 headers) out of the way: the checks that
matter are made here, once.

What picows does natively (see its `_get_next_frame_impl`): masking required from clients,
unknown opcodes, fragmented or > 125-byte control frames, non-minimal or MSB-set 64-bit lengths
(all 1002); frames over `max_frame_size` (1009, checked on the header: nothing is allocated);
CLOSE payload checks (1-byte payload, code < 3000 not in its enum, non-UTF-8 reason). What
`_Connection` adds: RSV bits, continuation-sequence rules, more close-code rules (1002);
reassembly bounded by `max_message_bytes` (1009); UTF-8 of text messages (1007); close
handshake; pong replies; bounded outbound queue (4008); `on_closed` exactly once.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import re
from base64 import b64decode
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, cast
from urllib.parse import parse_qsl, unquote

import orjson
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows import picows as _picows_impl

from fleetwire.realtime.transport import Handler, Refusal, UpgradeRequest, WebSocketApp, text_frame

__all__ = [
    "TransportLimits",
    "make_ws_protocol",
    "parse_upgrade_head",
    "redact_access_token",
]

logger = logging.getLogger("fleetwire.realtime.transport")
access_logger = logging.getLogger("uvicorn.access")

# picows' server protocol is not exported (`ws_create_server` builds it in a closure) and not in
# its .pyi: typed as Any here, pinned by pyproject (`picows>=2.3,<2.4`) and covered by the
# integration tests (accepted and refused handshakes, every close path).
_WSProtocol: Any = _picows_impl.WSProtocol  # type: ignore[attr-defined]
_PING_WHEN_IDLE: Any = _picows_impl.WSAutoPingStrategy.PING_WHEN_IDLE

_TEXT: Final = WSMsgType.TEXT
_BINARY: Final = WSMsgType.BINARY
_CONTINUATION: Final = WSMsgType.CONTINUATION
_PING: Final = WSMsgType.PING
_PONG: Final = WSMsgType.PONG
_CLOSE: Final = WSMsgType.CLOSE

# Close codes a peer may put on the wire (RFC 6455 §7.4, IANA registry): 1000-1003, 1007-1014,
# 3000-4999. picows itself lets 0 (explicit), 1006 and >= 5000 through.
_VALID_PEER_CLOSE: Final = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015)))


@dataclass(frozen=True, slots=True)
class TransportLimits:
    max_message_bytes: int = 262144  # one frame or a reassembled message; over -> 1009
    send_queue: int = 1000  # messages held while the transport is paused; over -> 4008
    max_header_bytes: int = 16000  # the upgrade request head; over -> 431
    handshake_timeout_s: float = 10.0  # bound on WebSocketApp(request); over -> 503
    close_grace_s: float = 2.0  # after our close frame, wait this long for the peer's
    read_buffer_size: int = 2048  # picows' initial read buffer (it grows on demand)

    def __post_init__(self) -> None:
        if self.max_message_bytes < 125 or self.send_queue < 1 or self.max_header_bytes < 256:
            raise ValueError(f"unusable transport limits: {self}")
        if self.handshake_timeout_s <= 0 or self.close_grace_s < 0:
            raise ValueError(f"unusable transport limits: {self}")


# --------------------------------------------------------------------------------------------
# Handshake parsing (pure functions, unit-tested)

# The parameter name as the query parser reads it: any of its characters may be percent-encoded
# (`access%5Ftoken=` is the same parameter), in either case.
_TOKEN_NAME: Final = "".join(f"(?:{re.escape(c)}|%{ord(c):02x})" for c in "access_token")
_TOKEN_RE: Final = re.compile(rf"({_TOKEN_NAME}=)[^&\s\"'#]*", re.IGNORECASE)


def redact_access_token(text: str) -> str:
    """`...?access_token=eyJ...&x=1` -> `...?access_token=[REDACTED]&x=1` (contract §2)."""
    if "access_token" not in text.lower() and "%" not in text:
        return text
    return _TOKEN_RE.sub(r"\1[REDACTED]", text)


@dataclass(frozen=True, slots=True)
class ParsedHead:
    method: str
    target: str  # the raw request target, query string included
    request: UpgradeRequest


def parse_upgrade_head(head: bytes, peer: str | None) -> ParsedHead:
    """Parse the head uvicorn rebuilt (`METHOD target HTTP/1.1`, then `name: value` lines with
    lower-case names). Repeated headers are joined with ", " (RFC 9110 §5.3)."""
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].decode("latin-1").partition(" ")
    target = rest.rsplit(" ", 1)[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        raw_name, _, raw_value = line.partition(b":")
        name = raw_name.decode("latin-1").strip().lower()
        value = raw_value.decode("latin-1").strip()
        previous = headers.get(name)
        headers[name] = value if previous is None else f"{previous}, {value}"
    path, _, query_string = target.partition("?")
    if path.startswith(("http://", "https://")):  # absolute-form target (RFC 9112 §3.2.2)
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    if "%" in path:
        path = unquote(path)
    query: dict[str, str] = {}
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        query.setdefault(key, value)
    return ParsedHead(method, target, UpgradeRequest(path or "/", query, headers, peer))


def _transport_refusal(parsed: ParsedHead) -> Refusal | None:
    """RFC 6455 §4.2.1 checks made before the app is asked."""
    headers = parsed.request.headers
    if parsed.method != "GET":
        return Refusal(400, "bad_request", "a WebSocket upgrade must be a GET request")
    if headers.get("content-length", "0").strip("0 ") or "transfer-encoding" in headers:
        return Refusal(400, "bad_request", "a WebSocket upgrade request has no body")
    if headers.get("sec-websocket-version") != "13":
        return Refusal(
            426,
            "upgrade_required",
            "unsupported WebSocket version, use 13",
            {"Sec-WebSocket-Version": "13"},
        )
    key = headers.get("sec-websocket-key", "")
    try:
        valid_key = len(b64decode(key.encode("ascii"), validate=True)) == 16
    except (UnicodeEncodeError, binascii.Error):
        valid_key = False
    if not valid_key:
        return Refusal(400, "bad_request", "missing or invalid Sec-WebSocket-Key")
    return None


def _refusal_bytes(refusal: Refusal) -> bytes:
    try:
        status = HTTPStatus(refusal.status)
        if status < 400:
            raise ValueError(status)
    except ValueError:
        logger.error("invalid refusal status %r, answering 500", refusal.status)
        refusal = Refusal(500, "internal", "internal error")
        status = HTTPStatus.INTERNAL_SERVER_ERROR
    response = WSUpgradeResponse.create_error_response(
        status,
        orjson.dumps(refusal.body()),
        {"Content-Type": "application/json", **refusal.headers},
    )
    response.headers["Connection"] = "close"
    return bytes(response.to_bytes())


def _format_peer(peername: Any) -> str | None:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return None


# --------------------------------------------------------------------------------------------
# The accepted connection: picows listener + fleetwire Socket


class _Connection(WSListener):
    """picows listener for one accepted connection, and the `Socket` its `Handler` gets."""

    __slots__ = (
        "_close_timer",
        "_closed_reported",
        "_closing",
        "_frag",
        "_frag_text",
        "_handler",
        "_held",
        "_limits",
        "_loop",
        "_paused",
        "_recv_code",
        "_sent_code",
        "_tr",
        "_ws",
    )

    def __init__(self, handler: Handler, limits: TransportLimits, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._handler = handler
        self._limits = limits
        self._loop = loop
        self._ws: WSTransport = cast(WSTransport, None)  # set by on_ws_connected
        self._tr: asyncio.Transport = cast(asyncio.Transport, None)
        self._paused = False
        self._held: deque[bytes] | None = None
        self._frag: bytearray | None = None
        self._frag_text = False
        self._closing = False
        self._closed_reported = False
        self._sent_code: int | None = None  # our close frame, when we closed first
        self._recv_code: int | None = None  # the peer's close frame, when it closed first
        self._close_timer: asyncio.TimerHandle | None = None

    # ---- Socket

    def send(self, payload: bytes) -> None:
        if self._closing:
            return
        if self._paused:
            self._hold(text_frame(payload))
        else:
            self._ws.send(_TEXT, payload)

    def send_frame(self, frame: bytes) -> None:
        if self._closing:
            return
        if self._paused:
            self._hold(frame)
        else:
            self._tr.write(frame)

    def ping(self) -> None:
        if not self._closing:
            self._ws.send_ping()

    def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._sent_code = code
        held = self._held
        if held:  # messages sent before close() still go first; bounded by send_queue
            write = self._tr.write
            while held:
                write(held.popleft())
        self._ws.send_close(cast(WSCloseCode, code), reason.encode())
        self._arm_close_timer()

    def pause_reading(self) -> None:
        if not self._tr.is_closing():
            self._tr.pause_reading()

    def resume_reading(self) -> None:
        if not self._tr.is_closing():
            self._tr.resume_reading()

    @property
    def closed(self) -> bool:
        return self._closing or self._ws.is_disconnected

    @property
    def queued(self) -> int:
        """Messages held because the peer does not read (never more than `send_queue`)."""
        return len(self._held) if self._held else 0

    # ---- outbound flow control

    def _hold(self, frame: bytes) -> None:
        held = self._held
        if held is None:
            held = self._held = deque()
        if len(held) >= self._limits.send_queue:
            self._slow_consumer()
            return
        held.append(frame)

    def _slow_consumer(self) -> None:
        self._closing = True
        self._sent_code = 4008
        if self._held:
            self._held.clear()
        # The close frame queues behind what the peer has not read yet; nothing more is added,
        # so memory stays bounded. A peer that resumes reading within close_grace_s sees 4008;
        # one that does not is aborted then.
        self._ws.send_close(cast(WSCloseCode, 4008), b"slow_consumer")
        self._disconnect()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        held = self._held
        if held and not self._closing:
            write = self._tr.write
            while held and not self._paused:
                write(held.popleft())

    # ---- picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        self._tr = transport.underlying_transport
        try:
            self._handler.on_open(self)
        except Exception:
            logger.exception("Handler.on_open failed")
            self.close(1011, "internal_error")

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self._fail(1002, "reserved bits set")
            return
        msg_type = frame.msg_type
        if msg_type is _TEXT or msg_type is _BINARY:
            if self._frag is not None:
                self._fail(1002, "new data frame inside a fragmented message")
            elif self._closing:
                return
            elif frame.fin:
                payload = frame.get_payload_as_bytes()
                if msg_type is _TEXT and not payload.isascii() and not _is_utf8(payload):
                    self._fail(1007, "invalid UTF-8")
                    return
                self._deliver(payload, msg_type is _TEXT)
            else:  # picows already bounded this frame by max_frame_size
                self._frag = bytearray(frame.get_payload_as_memoryview())
                self._frag_text = msg_type is _TEXT
        elif msg_type is _CONTINUATION:
            frag = self._frag
            if frag is None:
                self._fail(1002, "continuation frame without a message")
                return
            if self._closing:
                return
            if len(frag) + frame.payload_size > self._limits.max_message_bytes:
                self._frag = None
                self._fail(1009, "message_too_big")
                return
            frag += frame.get_payload_as_memoryview()
            if frame.fin:
                self._frag = None
                payload = bytes(frag)
                is_text = self._frag_text
                if is_text and not payload.isascii() and not _is_utf8(payload):
                    self._fail(1007, "invalid UTF-8")
                    return
                self._deliver(payload, is_text)
        elif msg_type is _PING:
            if not self._closing:
                self._ws.send_pong(frame.get_payload_as_bytes())
        elif msg_type is _PONG:
            if not self._closing:
                try:
                    self._handler.on_pong()
                except Exception:
                    logger.exception("Handler.on_pong failed")
                    self.close(1011, "internal_error")
        elif msg_type is _CLOSE:
            self._on_close_frame(frame)

    def _on_close_frame(self, frame: WSFrame) -> None:
        if frame.payload_size >= 2:
            code = frame.get_close_code().value
            if not (code in _VALID_PEER_CLOSE or 3000 <= code <= 4999):
                self._fail(1002, "invalid close code")
                return
        else:
            code = 1005  # RFC 6455 §7.1.5: no status code present
        if self._closing:  # the peer answered our close: the handshake is complete
            self._disconnect()
            return
        self._closing = True
        self._recv_code = code
        self._sent_code = 1000  # our answer; the peer's code is not its reason to choose
        if self._held:
            self._held.clear()
        self._ws.send_close(cast(WSCloseCode, 1000), b"normal")
        self._disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._closing = True
        self._held = None
        self._frag = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._closed_reported:
            return
        self._closed_reported = True
        # What the server said wins: a peer must not choose the reason its session ended for
        # (a browser's 1001 is not `server_shutdown`). A peer-initiated close is answered with
        # 1000, so it reports as 1000.
        code = self._sent_code if self._sent_code is not None else self._recv_code
        if code is None:
            handshake = transport.close_handshake  # a close picows sent by itself
            if handshake is not None and handshake.sent is not None:
                code = handshake.sent.code.value
        try:
            self._handler.on_closed(code)
        except Exception:
            logger.exception("Handler.on_closed failed")

    # ---- helpers

    def _deliver(self, payload: bytes, is_text: bool) -> None:
        try:
            self._handler.on_message(payload, is_text)
        except Exception:
            logger.exception("Handler.on_message failed")
            self.close(1011, "internal_error")

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 §7.1.7): close frame, then drop TCP."""
        self._frag = None
        if self._closing:
            self._disconnect()
            return
        self._closing = True
        self._sent_code = code
        if self._held:
            self._held.clear()
        self._ws.send_close(cast(WSCloseCode, code), reason.encode())
        self._disconnect()

    def parser_failed(self, code: int) -> None:
        """picows' frame parser rejected the stream; it sends its own close frame right after
        this and drops TCP 10 ms later. For 1009 we send ours first, with the contract's reason
        (picows' then is a no-op on the wire)."""
        if self._closing:
            return
        self._closing = True
        self._sent_code = code
        self._frag = None
        if self._held:
            self._held.clear()
        if code == 1009:
            self._ws.send_close(cast(WSCloseCode, 1009), b"message_too_big")
        self._arm_close_timer()

    def _disconnect(self) -> None:
        """Close TCP after flushing; abort if the flush takes longer than the grace period."""
        self._ws.disconnect()
        self._arm_close_timer()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and not self._ws.is_disconnected:
            self._close_timer = self._loop.call_later(self._limits.close_grace_s, self._tr.abort)


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# picows' logger, per connection


class _ProtocolLog:
    """The `logger` handed to picows for one connection (any object with Logger's methods).

    Besides keeping picows' per-connection chatter at DEBUG, it is the one hook into picows'
    frame-parser failures (`WS parser error: ...` is logged right before picows sends its close
    frame), used to send 1009 with the contract's reason `message_too_big`."""

    __slots__ = ("owner",)

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def isEnabledFor(self, level: int) -> bool:  # logging.Logger's name
        return logger.isEnabledFor(level)

    def log(self, level: int, msg: str, *args: Any) -> None:
        logger.log(level, msg, *args)

    def debug(self, msg: str, *args: Any) -> None:
        logger.debug(msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        logger.debug(msg, *args)  # one line per connection at INFO would flood the logs

    def warning(self, msg: str, *args: Any) -> None:
        logger.warning(msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        if msg.startswith("WS parser error") and args and isinstance(args[0], tuple) and args[0]:
            listener = getattr(self.owner, "listener", None)
            if isinstance(listener, _Connection):
                listener.parser_failed(int(args[0][0]))
            logger.info("closing a connection on a frame error: %s", args[0])
            return
        logger.error(msg, *args)

    def exception(self, msg: str, *args: Any) -> None:
        logger.exception(msg, *args)


# --------------------------------------------------------------------------------------------
# The uvicorn `ws` protocol class


class _Decision:
    """What picows' synchronous listener factory returns: decided by the async handshake."""

    __slots__ = ("listener",)

    def __init__(self) -> None:
        self.listener: _Connection | None = None

    def take(self, request: Any) -> Any:
        listener, self.listener = self.listener, None
        if listener is None:  # bytes arrived before the decision: cannot happen while paused
            return _refused_response()
        return listener


def _refused_response() -> Any:
    response = WSUpgradeResponse.create_error_response(
        400, orjson.dumps({"error": "bad_request", "message": "unexpected data"})
    )
    return WSUpgradeResponseWithListener(response, None)


class _BridgeProtocol(_WSProtocol):  # type: ignore[misc]  # picows' WSProtocol is Any (see above)
    """A picows server protocol that uvicorn's httptools protocol hands upgrades to."""

    __slots__ = ("_decision", "_fw_log", "_handshake", "_server_state", "_uv_transport")

    _fw_app: WebSocketApp
    _fw_limits: TransportLimits

    def __init__(self, *, config: Any = None, server_state: Any = None, app_state: Any = None) -> None:
        limits = self._fw_limits
        self._decision = _Decision()
        self._fw_log = _ProtocolLog(self)
        super().__init__(
            None,  # host_port (client side only)
            None,  # ws_path (client side only)
            False,  # is_client_side
            self._decision.take,  # listener factory
            self._fw_log,
            True,  # disconnect_on_exception (never reached: _Connection catches)
            None,  # handshake timeout: ours bounds the whole handshake
            False,  # auto-ping off: the session layer runs the heartbeat
            20.0,
            20.0,
            _PING_WHEN_IDLE,
            False,  # auto-pong off: _Connection answers, after checking RSV bits
            limits.max_message_bytes,  # max_frame_size
            None,  # extra headers
            limits.read_buffer_size,
        )
        self._server_state = server_state
        self._handshake: asyncio.Task[None] | None = None
        self._uv_transport: asyncio.Transport | None = None

    # asyncio protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._uv_transport = transport
        if self._server_state is not None:
            self._server_state.connections.add(self)

    def data_received(self, head: bytes) -> None:
        """Called once, by uvicorn, with the rebuilt request head."""
        transport = self._uv_transport
        assert transport is not None
        transport.pause_reading()
        if self._handshake is not None:  # uvicorn never does this; refuse rather than guess
            transport.abort()
            return
        self._handshake = asyncio.get_running_loop().create_task(self._run_handshake(head))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._server_state is not None:
            self._server_state.connections.discard(self)
        task = self._handshake
        if task is not None and not task.done():
            task.cancel()
        try:
            super().connection_lost(exc)
        finally:
            self._fw_log.owner = None
            self._handshake = None

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: 1001 to accepted connections, 503 to pending ones."""
        listener = self.listener
        if isinstance(listener, _Connection):
            listener.close(1001, "server_shutdown")
            return
        task = self._handshake
        if task is not None and not task.done():
            task.cancel()
            self._refuse(Refusal(503, "server_shutdown", "the server is shutting down"), "")
        elif self._uv_transport is not None:
            self._uv_transport.close()

    # handshake

    async def _run_handshake(self, head: bytes) -> None:
        transport = self._uv_transport
        assert transport is not None
        limits = self._fw_limits
        peer = _format_peer(transport.get_extra_info("peername"))
        if len(head) > limits.max_header_bytes:
            self._refuse(Refusal(431, "headers_too_large", "request head too large"), "", peer)
            return
        try:
            parsed = parse_upgrade_head(head, peer)
        except Exception:
            self._refuse(Refusal(400, "bad_request", "malformed upgrade request"), "", peer)
            return
        refusal = _transport_refusal(parsed)
        if refusal is not None:
            self._refuse(refusal, parsed.target, peer)
            return
        try:
            async with asyncio.timeout(limits.handshake_timeout_s):
                decision = await self._fw_app(parsed.request)
        except TimeoutError:
            logger.warning(
                "WebSocketApp took over %ss for %s", limits.handshake_timeout_s, parsed.request.path
            )
            decision = Refusal(503, "handshake_timeout", "the server could not answer in time")
        except Exception:
            logger.exception("WebSocketApp failed for %s", parsed.request.path)
            decision = Refusal(500, "internal", "internal error")
        if transport.is_closing():  # the peer left meanwhile: no on_open, no on_closed
            return
        if isinstance(decision, Refusal):
            self._refuse(decision, parsed.target, peer)
            return
        self._accept(decision, parsed, peer)

    def _accept(self, handler: Handler, parsed: ParsedHead, peer: str | None) -> None:
        transport = self._uv_transport
        assert transport is not None
        self._decision.listener = _Connection(handler, self._fw_limits, asyncio.get_running_loop())
        key = parsed.request.headers["sec-websocket-key"]
        canonical = (
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key.encode("ascii") + b"\r\n\r\n"
        )
        self._log_access(peer, parsed.target, 101)
        self._feed(canonical)  # picows answers 101, then on_ws_connected -> Handler.on_open
        self._decision.listener = None
        if not transport.is_closing():
            transport.resume_reading()

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            buffer = self.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def _refuse(self, refusal: Refusal, target: str, peer: str | None = None) -> None:
        transport = self._uv_transport
        if transport is None or transport.is_closing():
            return
        self._log_access(peer, target, refusal.status)
        transport.write(_refusal_bytes(refusal))
        transport.close()

    @staticmethod
    def _log_access(peer: str | None, target: str, status: int) -> None:
        if access_logger.isEnabledFor(logging.INFO) and access_logger.hasHandlers():
            # uvicorn's AccessFormatter unpacks exactly these five arguments.
            access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                peer or "-",
                "GET",
                redact_access_token(target) or "-",
                "1.1",
                status,
            )


def make_ws_protocol(app: WebSocketApp, limits: TransportLimits | None = None) -> type[asyncio.Protocol]:
    """The class to pass as uvicorn's `Config(ws=...)`: picows serving `app`, within `limits`."""
    namespace: dict[str, Any] = {
        "__slots__": (),
        "__module__": __name__,
        "_fw_app": staticmethod(app),
        "_fw_limits": limits or TransportLimits(),
    }
    cls = type("FleetwireWSProtocol", (_BridgeProtocol,), namespace)
    return cast(type[asyncio.Protocol], cls)
