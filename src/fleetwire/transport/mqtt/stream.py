"""The byte-stream seam MQTT runs on, and its two adapters: a TCP listener and MQTT over
WebSocket (contract §8: `FLEETWIRE_MQTT_PORT`, and `GET /mqtt` with subprotocol `mqtt`).

    server = await serve_tcp(handler_factory, host, port, limits)   # an asyncio.Server
    ws_handler = WebSocketStream(stream_handler, limits)             # a transport.base.Handler

A `StreamHandler` sees bytes in (`on_data`) and writes bytes out through its `Stream`; it
never learns which adapter carries it. Limits (`StreamLimits`): at most `send_queue` writes
held while the peer does not read (then the connection closes, code 4008 `slow_consumer`),
reading bounded by the handler pausing it; after `close()` the peer has `close_grace_s` to
read what is queued before the connection is aborted. `on_closed(code)` runs exactly once:
the code the server closed with (as `close(code)` gave it, 4008 for a slow consumer), None
when the peer went away first.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from fleetwire.transport import rfc6455
from fleetwire.transport.base import Handler, Socket

log = logging.getLogger(__name__)

SLOW_CONSUMER = 4008


class Stream(Protocol):
    """A connection's byte stream. Every method returns at once, and never raises once closed."""

    def write(self, data: bytes) -> None: ...

    def close(self, code: int) -> None:
        """Flush what is written, then end the connection; `code` is reported to on_closed."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    @property
    def closed(self) -> bool: ...


class StreamHandler(Protocol):
    def on_open(self, stream: Stream) -> None: ...

    def on_data(self, data: bytes) -> None: ...

    def on_closed(self, code: int | None) -> None: ...


@dataclass(frozen=True, slots=True)
class StreamLimits:
    send_queue: int = 1000  # writes held while the peer does not read; over -> 4008
    close_grace_s: float = 2.0
    max_connections: int = 100_000  # open TCP connections of the listener (before CONNECT too)


class _TcpStream(asyncio.Protocol):
    """One TCP connection of the listener, and the `Stream` its handler writes to."""

    def __init__(self, handler: StreamHandler, limits: StreamLimits, connections: set[_TcpStream]) -> None:
        self._handler = handler
        self._limits = limits
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._held: deque[bytes] | None = None
        self._paused = False  # the transport's buffer is over its high-water mark
        self._closing = False
        self._reported = False
        self._code: int | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if len(self._connections) >= self._limits.max_connections:
            transport.abort()  # beyond the listener's bound: not even a CONNACK
            return
        self._connections.add(self)
        try:
            self._handler.on_open(self)
        except Exception:
            log.exception("StreamHandler.on_open failed")
            self.close(1011)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # after our close: read and discard
        try:
            self._handler.on_data(data)
        except Exception:
            log.exception("StreamHandler.on_data failed")
            self.close(1011)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self._closing = True
        self._report()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        held = self._held
        transport = self._transport
        if held and transport is not None:
            while held and not self._paused:
                transport.write(held.popleft())
            if self._closing and not held:
                self._finish_close()

    # -- Stream
    def write(self, data: bytes) -> None:
        if self._closing or self._transport is None:
            return
        if not self._paused:
            self._transport.write(data)
            return
        held = self._held
        if held is None:
            held = self._held = deque()
        if len(held) >= self._limits.send_queue:
            held.clear()
            self._code = SLOW_CONSUMER
            self._closing = True
            self._transport.abort()  # the peer does not read: nothing more can reach it
            return
        held.append(data)

    def close(self, code: int) -> None:
        if self._closing or self._transport is None:
            return
        self._closing = True
        self._code = code
        if not self._held:
            self._finish_close()
        # else: resume_writing flushes, then closes; the grace timer bounds the wait
        self._abort_timer = asyncio.get_running_loop().call_later(self._limits.close_grace_s, self._abort)
        self._report()

    def _finish_close(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()  # flushes the buffer, then FIN

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    @property
    def closed(self) -> bool:
        return self._closing

    def _report(self) -> None:
        if self._reported:
            return
        self._reported = True
        try:
            self._handler.on_closed(self._code)
        except Exception:
            log.exception("StreamHandler.on_closed failed")


class TcpListener:
    """The MQTT TCP listener: one `StreamHandler` per accepted connection."""

    def __init__(self, handler_factory: Callable[[], StreamHandler], limits: StreamLimits) -> None:
        self._factory = handler_factory
        self._limits = limits
        self.connections: set[_TcpStream] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _TcpStream(self._factory(), self._limits, self.connections), host, port
        )
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting; connections still open are aborted (their handlers were asked
        to close by the session services before this runs)."""
        if self.server is not None:
            self.server.close()
            for connection in list(self.connections):
                connection._abort()
            await self.server.wait_closed()


class WebSocketStream:
    """MQTT over WebSocket (MQTT 5.0 §6): binary messages carry the byte stream; a text
    message is a protocol error (close 1003). A `transport.base.Handler` for `GET /mqtt`."""

    __slots__ = ("_closed", "_code", "_handler", "_socket")

    subprotocol = "mqtt"

    def __init__(self, handler: StreamHandler) -> None:
        self._handler = handler
        self._socket: Socket | None = None
        self._closed = False
        self._code: int | None = None

    # -- transport.base.Handler
    def on_open(self, socket: Socket) -> None:
        self._socket = socket
        self._handler.on_open(self)

    def on_message(self, payload: bytes, is_text: bool) -> None:
        if self._closed:
            return
        if is_text:
            self.close(1003)
            return
        self._handler.on_data(payload)

    def on_pong(self) -> None:
        pass  # MQTT has its own keep-alive

    def on_closed(self, code: int | None) -> None:
        self._closed = True
        self._handler.on_closed(self._code if self._code is not None else code)

    # -- Stream
    def write(self, data: bytes) -> None:
        if self._socket is not None and not self._closed:
            self._socket.send_frame(rfc6455.server_frame(rfc6455.OP_BINARY, data))

    def close(self, code: int) -> None:
        if self._socket is None or self._closed:
            return
        self._closed = True
        self._code = code
        # The WebSocket close code says only normal or not: MQTT told the reason already.
        ws_code = 1000 if code in (1000, 1001) else 1008 if code >= 4000 else code
        if code == SLOW_CONSUMER:
            ws_code = SLOW_CONSUMER
        self._socket.close(ws_code, "normal" if ws_code == 1000 else "mqtt")

    def pause_reading(self) -> None:
        if self._socket is not None:
            self._socket.pause_reading()

    def resume_reading(self) -> None:
        if self._socket is not None:
            self._socket.resume_reading()

    @property
    def closed(self) -> bool:
        return self._closed


_: type[Handler] = WebSocketStream  # conformance: a transport Handler
