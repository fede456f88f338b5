"""Run the ASGI app (REST) and the WebSocketApp on ONE port with uvicorn.

    server = build_server(asgi_app, ws_app, host="127.0.0.1", port=0, on_started=print)
    await server.serve()          # in a running (uvloop) loop; or server.run() to own the loop

Shutdown (`server.should_exit = True`, SIGINT/SIGTERM)
reaches WebSocket connections: each gets close 1001 `server_shutdown` and its Handler
`on_closed(1001)`; uvicorn waits for them (at most `close_grace_s`) before the lifespan shutdown.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fleetwire.transport.base import TransportAdapter, TransportLimits, WebSocketApp
from fleetwire.transport.logs import RedactAccessToken, install_log_redaction
from fleetwire.transport.mqtt.stream import StreamHandler, StreamLimits, TcpListener
from fleetwire.transport.picows import PicowsTransport

__all__ = [
    "FleetwireServer",
    "HeadTimeoutHttpProtocol",
    "MqttListen",
    "RedactAccessToken",
    "build_server",
    "install_log_redaction",
]


class HeadTimeoutHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on reading a request head (slowloris).

    Private surface (checked against uvicorn 0.54.0, pinned `<0.55`): a subclass of uvicorn's
    internal `HttpToolsProtocol`, overriding its `connection_made`, httptools callbacks
    `on_message_begin` / `on_headers_complete` and `connection_lost`, using `self.loop` and
    `self.transport`. uvicorn has no public option for a head timeout.

    uvicorn times out idle keep-alive connections only after a first response: a connection
    that never completes its head would be held forever. Here a connection must complete each
    request head within `head_timeout_s` of connecting (or of the first byte of its next
    request on a keep-alive connection), else it is closed. WebSocket upgrades complete their
    head first; the app's decision is then bounded by `TransportLimits.handshake_timeout_s`.
    """

    head_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol declares BaseTransport; uvicorn (and this override) take asyncio.Transport.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The connection is the WebSocket protocol's now and this object is garbage, but its
        # parser holds its bound callbacks: a reference cycle per handshake (24 objects and
        # the parser's buffers) that only the cycle collector would free, long after.
        del self.parser

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class FleetwireServer(uvicorn.Server):
    """uvicorn.Server that reports the port it bound (port 0 in tests) once it listens, and
    runs the MQTT TCP listener (contract §8) beside it when one is given."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_started: Callable[[int], None] | None = None,
        mqtt: MqttListen | None = None,
    ) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._mqtt = mqtt
        self._mqtt_listener: TcpListener | None = None
        self.mqtt_port: int | None = None

    @property
    def port(self) -> int | None:
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._mqtt is not None:
            mqtt = self._mqtt
            self._mqtt_listener = TcpListener(mqtt.handler_factory, mqtt.limits)
            self.mqtt_port = await self._mqtt_listener.start(mqtt.host, mqtt.port)
        if self.started:
            install_log_redaction()  # again: Config may have re-run dictConfig meanwhile
            port = self.port
            if self._on_started is not None and port is not None:
                self._on_started(port)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """No new MQTT connections; the lifespan's shutdown closes the sessions (DISCONNECT
        0x8B on 5.0), then what is left is aborted."""
        listener = self._mqtt_listener
        if listener is not None and listener.server is not None:
            listener.server.close()
        await super().shutdown(sockets=sockets)
        if listener is not None:
            await listener.stop()


@dataclass(frozen=True, slots=True)
class MqttListen:
    """Where and how the MQTT TCP listener runs."""

    handler_factory: Callable[[], StreamHandler]
    host: str
    port: int
    limits: StreamLimits


def build_server(
    asgi_app: Any,
    ws_app: WebSocketApp,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: TransportLimits | None = None,
    log_level: str | int | None = "info",
    access_log: bool = True,
    on_started: Callable[[int], None] | None = None,
    adapter: TransportAdapter | None = None,
    mqtt: MqttListen | None = None,
    **uvicorn_options: Any,
) -> FleetwireServer:
    """A uvicorn server: httptools + uvloop, lifespan on, `adapter` (picows by default) for
    `Upgrade: websocket`."""
    options: dict[str, Any] = {"timeout_graceful_shutdown": 30, **uvicorn_options}
    limits = limits or TransportLimits()
    adapter = adapter or PicowsTransport()
    http = type(
        "FleetwireHttpProtocol", (HeadTimeoutHttpProtocol,), {"head_timeout_s": limits.handshake_timeout_s}
    )
    config = uvicorn.Config(
        asgi_app,
        host=host,
        port=port,
        loop="uvloop",
        http=http,
        ws=adapter.ws_protocol(ws_app, limits),
        ws_per_message_deflate=False,
        lifespan="on",
        log_level=log_level,
        access_log=access_log,
        **options,
    )
    install_log_redaction()
    return FleetwireServer(config, on_started=on_started, mqtt=mqtt)
