"""The WebSocket adapter: picows behind uvicorn's `ws` hook, REST and WebSocket on one port.

uvicorn parses the HTTP head; on `Upgrade: websocket` it builds the class returned by
`make_ws_protocol(...)` (`PicowsTransport.ws_protocol`), and that class *is* a picows server
protocol, so once upgraded every frame takes picows' own buffered, Cython path. What is decided
about frames, messages and closes is `transport/rfc6455.py`'s; this module maps picows'
callbacks onto it and does the I/O.

Handshake: the head is parsed into an `UpgradeRequest` and the app's `decide_now`, if it has
one, is asked at once; a decision it cannot take without I/O (None) is awaited from the (async)
`WebSocketApp` in a task, with reading paused, bounded by `handshake_timeout_s`. A `Refusal` (or a
transport-level refusal: 400/426/431) is written as an HTTP response with a JSON body, then the
TCP connection is closed. A `Handler` gets a 101 from picows: a minimal, canonical upgrade head is
fed into picows' read buffer and its (synchronous) listener factory returns the `_Connection`
prepared for it. Feeding a canonical head instead of uvicorn's rebuilt one keeps picows' own
header rules (exact `Connection: upgrade`, 16 KiB, 128 headers) out of the way: the checks that
matter are made once, in `rfc6455.check_upgrade_request`.

What picows checks natively (its `_get_next_frame_impl`): masking required from clients,
unknown opcodes, fragmented or > 125-byte control frames, non-minimal or MSB-set 64-bit lengths
(all 1002); frames over `max_frame_size` (1009, on the header: nothing is allocated); close
payloads. Everything else (RSV bits, continuation rules, reassembly bound, UTF-8, close codes,
the closing handshake) is `rfc6455`'s, and the outbound queue bound (4008) is `_Connection`'s.

Closing (RFC 6455 §7.1.1): after the server's close frame the write side is shut (FIN after the
close frame) but input is still read, and discarded, until the peer's close frame, the peer's
EOF, or `close_grace_s` (then abort). Closing a socket with unread input makes the kernel send
RST, and a peer that was still sending (a message over the limit built from many continuation
frames) then lost the close frame: it saw a reset instead of 1009.

Why picows, and not a public API — measured with `benchmarks/transport.py` (server process CPU
per message through the real server, 50 connections, 200,000 messages, median of 5 runs, three
rounds alternating before/after this layout; details in docs/transport.md):
  * ingest 0.45-0.50 µs/msg before, 0.50 after (bare picows 0.40); echo 0.90-1.00 before,
    1.00-1.05 after (bare 0.45); fan-out 0.66-0.82 before, 0.83-0.92 after (bare 0.84), bimodal
    noise up to 2.2 for all three. `on_ws_frame` in-process: 275 ns before, 292 ns after.
  * websockets 17.4's sans-I/O `ServerProtocol`, frames only, no sockets, no handler: 1.88 µs
    per received frame, 0.70 µs per sent one: its parser alone costs three to four times
    picows' whole receive path (syscalls and the handler included). Rejected: it would lose
    speed. (Fan-out is unaffected either way: frames are pre-built, `transport.write`.)
  * picows' public server API is `ws_create_server`, which owns its listening socket: it cannot
    take over a connection that uvicorn accepted on the REST port. No public picows API builds a
    server protocol for an existing transport, so the class is reached privately (below).
So picows stays, and each private surface sits behind one named function or class, with the
versions it was checked against (picows 2.3.1, uvicorn 0.54.0; both pinned in pyproject) and a
canary test (`tests/unit/transport/test_private_surfaces.py`) that fails when one moves:
  1. `_init_picows_server_protocol`: picows' unexported `picows.picows.WSProtocol`, its
     15 positional constructor arguments.
  2. `_picows_parser_error`: the text of picows' parser-error log line, the one hook to send
     1009 with the contract's reason before picows sends its own close frame.
  3. `_BridgeProtocol`: uvicorn's `ws=` hook — constructor keywords `config, server_state,
     app_state`; `connection_made(transport)`, then ONE `data_received(<head rebuilt from the
     parsed headers>)`, then `transport.set_protocol`; `server_state.connections` and
     `shutdown()` for graceful shutdown.
  (4. in `transport/server.py`: `HeadTimeoutHttpProtocol` subclasses uvicorn's
     `HttpToolsProtocol` and overrides its parser callbacks.)
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
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

from fleetwire.transport import rfc6455
from fleetwire.transport.base import (
    Handler,
    Refusal,
    TransportAdapter,
    TransportLimits,
    UpgradeRequest,
    WebSocketApp,
    text_frame,
)
from fleetwire.transport.logs import TRANSPORT_LOGGER, redact_access_token
from fleetwire.transport.rfc6455 import MessageAssembler, ProtocolError, parse_close, reserved_bits_error

__all__ = [
    "PicowsTransport",
    "TransportLimits",
    "make_ws_protocol",
    "parse_upgrade_head",
    "redact_access_token",
]

logger = logging.getLogger(TRANSPORT_LOGGER)
access_logger = logging.getLogger("uvicorn.access")

_TEXT: Final = WSMsgType.TEXT
_BINARY: Final = WSMsgType.BINARY
_CONTINUATION: Final = WSMsgType.CONTINUATION
_PING: Final = WSMsgType.PING
_PONG: Final = WSMsgType.PONG
_CLOSE: Final = WSMsgType.CLOSE


def _drop(frame: bytes) -> None:
    """`write_frame` of a closing socket: nothing more goes out after our close frame."""


# --------------------------------------------------------------------------------------------
# Private surface 1: picows' server protocol class (checked against picows 2.3.1)

# Not exported (`ws_create_server` builds it in a closure) and not in picows' .pyi, hence Any.
_WSProtocol: Any = _picows_impl.WSProtocol  # type: ignore[attr-defined]  # unexported, see above
_PING_WHEN_IDLE: Final[Any] = _picows_impl.WSAutoPingStrategy.PING_WHEN_IDLE


def _init_picows_server_protocol(
    protocol: Any, listener_factory: Any, log: Any, max_frame_size: int, read_buffer_size: int
) -> None:
    """Run `picows.picows.WSProtocol.__init__` for a server-side protocol. The one place that
    knows its 15 positional parameters (picows 2.3.1 `picows.pyx`, `WSProtocol.__init__`, the
    same call as `ws_create_server`'s `ws_protocol_factory`)."""
    _WSProtocol.__init__(
        protocol,
        None,  # host_port (client side only)
        None,  # ws_path (client side only)
        False,  # is_client_side
        listener_factory,
        log,
        True,  # disconnect_on_exception (never reached: _Connection catches)
        None,  # handshake timeout: ours bounds the whole handshake
        False,  # auto-ping off: the session layer runs the heartbeat
        20.0,  # auto_ping_idle_timeout (unused)
        20.0,  # auto_ping_reply_timeout (unused)
        _PING_WHEN_IDLE,
        False,  # auto-pong off: _Connection answers, after checking RSV bits
        max_frame_size,
        None,  # extra headers (client side only)
        read_buffer_size,
    )


# --------------------------------------------------------------------------------------------
# Private surface 2: picows' parser-error log line (checked against picows 2.3.1)

# `WSProtocol._get_next_frame` logs this, with `ex.args` == (WSCloseCode, str), right BEFORE it
# sends its own close frame and schedules `transport.disconnect()` 10 ms later
# (`_DISCONNECT_AFTER_ERROR_DELAY`). picows offers no callback for it.
PICOWS_PARSER_ERROR_LOG: Final = "WS parser error: %s, initiate disconnect"


def _picows_parser_error(msg: str, args: tuple[Any, ...]) -> tuple[int, str] | None:
    """(close code, picows' reason) when a picows log call reports a frame-parser failure."""
    if msg != PICOWS_PARSER_ERROR_LOG or not args or not isinstance(args[0], tuple) or not args[0]:
        return None
    error = args[0]
    return int(error[0]), (str(error[1]) if len(error) > 1 else "")


# --------------------------------------------------------------------------------------------
# Handshake parsing (pure functions, unit-tested)


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
    rejection = rfc6455.check_upgrade_request(parsed.method, parsed.request.headers)
    if rejection is None:
        return None
    return Refusal(rejection.status, rejection.error, rejection.message, rejection.headers)


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
        "_assembler",
        "_close",
        "_close_timer",
        "_closed_reported",
        "_closing",
        "_handler",
        "_held",
        "_limits",
        "_loop",
        "_paused",
        "_tr",
        "_ws",
        "write_frame",
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
        self._assembler = MessageAssembler(limits.max_message_bytes)
        self._close = rfc6455.CloseHandshake()
        self._closing = False  # our close frame is out, or TCP is gone: no more sends, no input
        self._closed_reported = False
        self._close_timer: asyncio.TimerHandle | None = None
        self.write_frame: Callable[[bytes], None] = _drop  # see Socket.write_frame

    def _writable(self) -> None:
        """Set `write_frame` after the socket's state changed: the transport's own write while
        frames go straight out (not paused, not closing: then nothing is held), `send_frame`
        while paused (it holds them), nothing once closing. (The bound `send_frame` is a
        reference cycle: it lasts only while paused, so a closed socket is freed by refcount.)"""
        if self._closing:
            self.write_frame = _drop
        elif self._paused:
            self.write_frame = self.send_frame
        else:
            self.write_frame = self._tr.write

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

    def send_frames(self, frames: list[bytes]) -> None:
        if self._closing:
            return
        if self._paused:
            for frame in frames:
                self._hold(frame)
        else:
            # One write for a subscriber's frames of a batch: measured 3.9 µs per frame as
            # separate writes against 0.27-1.95 µs joined (issue 12).
            self._tr.write(b"".join(frames))

    def ping(self) -> None:
        if not self._closing:
            self._ws.send_ping()

    def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        held = self._held
        if held:  # messages sent before close() still go first; bounded by send_queue
            write = self._tr.write
            while held:
                write(held.popleft())
        self._send_close(code, reason.encode())

    def pause_reading(self) -> None:
        if not self._closing and not self._tr.is_closing():
            self._tr.pause_reading()

    def resume_reading(self) -> None:
        if not self._tr.is_closing():
            self._tr.resume_reading()

    @property
    def closed(self) -> bool:
        return self._closing or self._ws.is_disconnected

    @property
    def subprotocol(self) -> str | None:
        """The handler's `subprotocol` (see transport.base.Handler), for the 101."""
        value = getattr(self._handler, "subprotocol", None)
        return value if isinstance(value, str) else None

    @property
    def queued(self) -> int:
        """Messages held because the peer does not read (never more than `send_queue`)."""
        return len(self._held) if self._held else 0

    @property
    def write_buffer_size(self) -> int:
        """Bytes in the TCP transport's buffer (bounded by its high-water mark, then held)."""
        return self._tr.get_write_buffer_size()

    # ---- outbound flow control

    def _hold(self, frame: bytes) -> None:
        held = self._held
        if held is None:
            held = self._held = deque()
        if len(held) >= self._limits.send_queue:
            # The close frame queues behind what the peer has not read yet; nothing more is
            # added, so memory stays bounded. A peer that resumes reading within close_grace_s
            # sees 4008; one that does not is aborted then.
            held.clear()
            self._send_close(4008, b"slow_consumer")
            return
        held.append(frame)

    def pause_writing(self) -> None:
        self._paused = True
        self._writable()

    def resume_writing(self) -> None:
        self._paused = False
        held = self._held
        if held and not self._closing:
            write = self._tr.write
            while held and not self._paused:
                write(held.popleft())
        self._writable()  # paused again by the flush: still held, in order

    # ---- picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        self._tr = transport.underlying_transport
        self._writable()
        try:
            self._handler.on_open(self)
        except Exception:
            logger.exception("Handler.on_open failed")
            self.close(1011, "internal_error")

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if self._closing:  # §7.1.1: read and discard until the peer's close frame
            if msg_type is _CLOSE:
                self._on_close_frame(frame)
            return
        assembler = self._assembler
        try:
            if frame.rsv1 or frame.rsv2 or frame.rsv3:
                rsv_error = reserved_bits_error(frame.rsv1, frame.rsv2, frame.rsv3)
                if rsv_error is not None:
                    raise rsv_error
            if msg_type is _TEXT or msg_type is _BINARY:
                if frame.fin:  # the common case: one frame, one message, one copy (picows')
                    message = assembler.single(msg_type is _TEXT, frame.get_payload_as_bytes())
                else:
                    assembler.begin(msg_type is _TEXT, frame.get_payload_as_memoryview())
                    return
            elif msg_type is _CONTINUATION:
                completed = assembler.continuation(frame.fin, frame.get_payload_as_memoryview())
                if completed is None:
                    return
                message = completed
            elif msg_type is _PING:  # §5.5.3: a pong carries the ping's payload
                self._ws.send_pong(frame.get_payload_as_bytes())
                return
            elif msg_type is _PONG:
                self._on_pong()
                return
            elif msg_type is _CLOSE:
                self._on_close_frame(frame)
                return
            else:  # picows fails unknown opcodes itself (1002): never reached
                return
        except ProtocolError as error:
            self._fail(error.code, error.reason)
            return
        try:
            self._handler.on_message(message, assembler.text)
        except Exception:
            logger.exception("Handler.on_message failed")
            self.close(1011, "internal_error")

    def _on_pong(self) -> None:
        try:
            self._handler.on_pong()
        except Exception:
            logger.exception("Handler.on_pong failed")
            self.close(1011, "internal_error")

    def _on_close_frame(self, frame: WSFrame) -> None:
        try:
            code = parse_close(frame.get_payload_as_bytes())
        except ProtocolError as error:
            if self._close.sent is not None:  # nothing left to say: the peer is done
                self._ws.disconnect()
            else:
                self._fail(error.code, error.reason)
            return
        answer = self._close.receive(code)
        if answer is None:  # the peer answered ours: the server closes TCP first (§7.1.1)
            self._ws.disconnect()
            return
        self._closing = True
        self._writable()
        self._held = None
        self._ws.send_close(cast(WSCloseCode, answer), b"normal")
        self._ws.disconnect()  # §5.5.1: no frame follows the peer's close, nothing to drain

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._closing = True
        self._writable()
        self._held = None
        self._assembler.reset()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._closed_reported:
            return
        self._closed_reported = True
        code = self._close.reported_code
        if code is None:
            handshake = transport.close_handshake  # a close picows sent by itself
            if handshake is not None and handshake.sent is not None:
                code = handshake.sent.code.value
        try:
            self._handler.on_closed(code)
        except Exception:
            logger.exception("Handler.on_closed failed")

    # ---- closing

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 §7.1.7): nothing queued is sent, then the close frame."""
        if self._held:
            self._held.clear()
        self._send_close(code, reason.encode())

    def parser_failed(self, code: int, reason: str) -> None:
        """picows' frame parser rejected the stream (reported through its log, see
        `_picows_parser_error`). Our close frame goes first, so 1009 carries the contract's
        reason; picows' own is then dropped (it sends nothing after a close frame) and its
        disconnect 10 ms later comes after our FIN."""
        if self._closing:
            return
        self._fail(code, rfc6455.MESSAGE_TOO_BIG if code == rfc6455.TOO_BIG else reason)

    def _send_close(self, code: int, reason: bytes) -> None:
        """The one place the server starts a close: close frame, then drain (§7.1.1)."""
        self._closing = True
        self._writable()
        self._assembler.reset()
        if not self._close.send(code):
            return
        self._ws.send_close(cast(WSCloseCode, code), reason)
        self._drain()

    def _drain(self) -> None:
        """Shut the write side after the close frame (FIN; uvloop sends it once the buffer is
        flushed) and keep reading, discarding input: the peer's close frame or EOF closes TCP,
        `close_grace_s` aborts it. Closing with unread input instead would make the kernel send
        RST, and a peer still sending would lose our close frame."""
        tr = self._tr
        if tr.is_closing():
            return
        if tr.can_write_eof():
            tr.write_eof()
        tr.resume_reading()  # the session may have paused reading: the peer's close must arrive
        if self._close_timer is None:
            self._close_timer = self._loop.call_later(self._limits.close_grace_s, tr.abort)


# --------------------------------------------------------------------------------------------
# picows' logger, per connection


class _ProtocolLog:
    """The `logger` handed to picows for one connection (any object with Logger's methods).

    Keeps picows' per-connection chatter at DEBUG, and forwards its frame-parser failures to the
    connection (`_picows_parser_error`)."""

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
        failure = _picows_parser_error(msg, args)
        if failure is None:
            logger.error(msg, *args)
            return
        listener = getattr(self.owner, "listener", None)
        if isinstance(listener, _Connection):
            listener.parser_failed(*failure)
        logger.info("closing a connection on a frame error: %s", failure)

    def exception(self, msg: str, *args: Any) -> None:
        logger.exception(msg, *args)


# --------------------------------------------------------------------------------------------
# Private surface 3: the uvicorn `ws` protocol class (checked against uvicorn 0.54.0)


class _Decision:
    """What picows' synchronous listener factory returns: decided by the async handshake."""

    __slots__ = ("listener",)

    def __init__(self) -> None:
        self.listener: _Connection | None = None

    def take(self, request: Any) -> Any:
        listener, self.listener = self.listener, None
        if listener is None:  # bytes arrived before the decision: cannot happen while paused
            return _refused_response()
        subprotocol = listener.subprotocol
        if subprotocol is not None:  # RFC 6455 §4.2.2: the one the handler speaks (`mqtt`)
            response = WSUpgradeResponse.create_101_response({"Sec-WebSocket-Protocol": subprotocol})
            return WSUpgradeResponseWithListener(response, listener)
        return listener


def _refused_response() -> Any:
    response = WSUpgradeResponse.create_error_response(
        400, orjson.dumps({"error": "bad_request", "message": "unexpected data"})
    )
    return WSUpgradeResponseWithListener(response, None)


class _BridgeProtocol(_WSProtocol):  # type: ignore[misc]  # picows' WSProtocol is Any (see above)
    """A picows server protocol that uvicorn's httptools protocol hands upgrades to.

    What it relies on of uvicorn (`HttpToolsProtocol.handle_websocket_upgrade`, uvicorn 0.54.0):
    `ws_protocol_class(config=, server_state=, app_state=)`, then `connection_made(transport)`,
    then exactly one `data_received(<the head rebuilt from the parsed headers>)`, then
    `transport.set_protocol(protocol)`; bytes the peer sent after the head in the same read are
    not forwarded (a client must wait for the 101, RFC 6455 §4.1). For graceful shutdown:
    membership in `server_state.connections` and a `shutdown()` method."""

    __slots__ = ("_begun", "_decision", "_fw_log", "_handshake", "_server_state", "_uv_transport")

    _fw_app: WebSocketApp
    _fw_decide_now: Callable[[UpgradeRequest], Handler | Refusal | None] | None
    _fw_limits: TransportLimits

    def __init__(self, *, config: Any = None, server_state: Any = None, app_state: Any = None) -> None:
        limits = self._fw_limits
        self._decision = _Decision()
        self._fw_log = _ProtocolLog(self)
        _init_picows_server_protocol(
            self, self._decision.take, self._fw_log, limits.max_message_bytes, limits.read_buffer_size
        )
        self._server_state = server_state
        self._begun = False  # the head came: a second one is refused
        self._handshake: asyncio.Task[None] | None = None  # a decision that has to wait
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
        if self._begun or isinstance(self.listener, _Connection):
            # A second head (uvicorn never sends one): refuse rather than guess.
            transport.abort()
            return
        self._begun = True
        self._begin_handshake(transport, head)

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

    def _begin_handshake(self, transport: asyncio.Transport, head: bytes) -> None:
        """Parse and check the head, then ask the app: its `decide_now` first, which takes
        nearly every decision without I/O, so that a handshake costs no task, no timer and
        no pause of reading (issue 12); only a decision that must wait is awaited, in a task,
        bounded by `handshake_timeout_s`."""
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
        decide_now = self._fw_decide_now
        if decide_now is not None:
            try:
                decision = decide_now(parsed.request)
            except Exception:
                logger.exception("WebSocketApp failed for %s", parsed.request.path)
                decision = Refusal(500, "internal", "internal error")
            if decision is not None:
                self._conclude(decision, parsed, paused=False)
                return
        transport.pause_reading()  # nothing is read until the decision
        self._handshake = asyncio.get_running_loop().create_task(self._finish_handshake(parsed))

    async def _finish_handshake(self, parsed: ParsedHead) -> None:
        limits = self._fw_limits
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
        self._handshake = None  # over: a finished task held for the connection's life was ~1 KB
        self._conclude(decision, parsed, paused=True)

    def _conclude(self, decision: Handler | Refusal, parsed: ParsedHead, *, paused: bool) -> None:
        transport = self._uv_transport
        assert transport is not None
        if transport.is_closing():  # the peer left meanwhile: no on_open, no on_closed
            return
        if isinstance(decision, Refusal):
            self._refuse(decision, parsed.target, parsed.request.peer)
            return
        self._accept(decision, parsed)
        if paused and not transport.is_closing():
            transport.resume_reading()

    def _accept(self, handler: Handler, parsed: ParsedHead) -> None:
        self._decision.listener = _Connection(handler, self._fw_limits, asyncio.get_running_loop())
        key = parsed.request.headers["sec-websocket-key"]
        canonical = (
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key.encode("ascii") + b"\r\n\r\n"
        )
        self._log_access(parsed.request.peer, parsed.target, 101)
        self._feed(canonical)  # picows answers 101, then on_ws_connected -> Handler.on_open
        self._decision.listener = None

    def _feed(self, data: bytes) -> None:
        """Hand bytes to picows through its public BufferedProtocol methods."""
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
    decide_now = getattr(app, "decide_now", None)  # optional: see transport.base.WebSocketApp
    namespace: dict[str, Any] = {
        "__slots__": (),
        "__module__": __name__,
        "_fw_app": staticmethod(app),
        "_fw_decide_now": None if decide_now is None else staticmethod(decide_now),
        "_fw_limits": limits or TransportLimits(),
    }
    cls = type("FleetwireWSProtocol", (_BridgeProtocol,), namespace)
    return cast(type[asyncio.Protocol], cls)


class PicowsTransport:
    """The picows adapter, as `transport.server.build_server` takes it."""

    name = "picows"

    def ws_protocol(self, app: WebSocketApp, limits: TransportLimits) -> type[asyncio.Protocol]:
        return make_ws_protocol(app, limits)


_: TransportAdapter = PicowsTransport()  # static conformance to the seam
