"""The transport seam: what fleetwire's sessions see of a WebSocket connection.

The session layer only sees these types; `transport/picows.py` is the one adapter today (picows
behind uvicorn's `ws` hook, REST and WebSocket on one port, built by `transport/server.py`), and
`tests/contract/test_transport.py` is the suite every adapter must pass.

Life of a connection:
1. The transport parses the upgrade request and awaits `WebSocketApp(request)` BEFORE
   answering: a `Refusal` becomes that HTTP response (JSON body, `Connection: close`);
   a `Handler` gets a 101, then `on_open(socket)`. An app may also offer
   `decide_now(request) -> Handler | Refusal | None`, the same decision when it needs no
   I/O, else None; the transport asks it first and awaits the app only on None (no task
   per handshake).
2. Complete messages (continuation frames reassembled, at most `max_message_bytes`) reach
   `on_message`. Text is checked to be UTF-8 first (else close 1007). Pongs reach `on_pong`.
3. `on_closed(code)` runs exactly once, whoever closed and however: the code the SERVER sent
   (1000 when it answered a peer's close; None when TCP dropped without a close frame), so a
   peer never chooses the reason its session ended for.

Limits enforced by the transport (`TransportLimits`), with the contract's close codes: a frame or
message over `max_message_bytes` -> 1009; RFC 6455 violations -> 1002; invalid UTF-8 text ->
1007; more than `send_queue` messages waiting because the peer does not read -> 4008
`slow_consumer`. After the server's close frame the peer gets `close_grace_s` to answer with its
own; input meanwhile is read and discarded (so the close frame is not destroyed by a TCP reset).

Delivery: messages to one socket are written in `send`/`send_frame` order; a socket that is
closing drops new messages silently (at most once, never reordered).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleetwire.transport import rfc6455

__all__ = [
    "Handler",
    "Refusal",
    "Socket",
    "TransportAdapter",
    "TransportLimits",
    "UpgradeRequest",
    "WebSocketApp",
    "text_frame",
]


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    path: str  # without the query string, e.g. "/ws/device"
    query: Mapping[str, str]  # first value of each parameter
    headers: Mapping[str, str]  # lower-case names
    peer: str | None  # "host:port" of the TCP peer


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP answer instead of the upgrade (contract §2: before the upgrade, JSON body)."""

    status: int
    error: str
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "message": self.message}


class Socket(Protocol):
    """An accepted connection. Every method returns at once and never raises on a closed socket."""

    def send(self, payload: bytes) -> None:
        """Queue one text message (UTF-8 JSON)."""

    def send_frame(self, frame: bytes) -> None:
        """Queue a complete, already framed message (see `text_frame`): a broadcast framed once."""

    def send_frames(self, frames: list[bytes]) -> None:
        """Queue several framed messages in one write; the send queue counts each of them."""

    @property
    def write_frame(self) -> Callable[[bytes], None]:
        """`send_frame` as cheap as it can be (the fan-out's hot path: one call per delivery):
        an attribute the socket keeps current, the transport's own write while frames go
        straight out. Read it for each frame, never keep it."""

    def ping(self) -> None: ...

    def close(self, code: int, reason: str) -> None:
        """Send a close frame and drop the connection after a short grace period."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    @property
    def closed(self) -> bool: ...


class Handler(Protocol):
    """A handler may carry a `subprotocol` class attribute (a string, e.g. `mqtt` for MQTT over
    WebSocket): the adapter answers the upgrade with that `Sec-WebSocket-Protocol`."""

    def on_open(self, socket: Socket) -> None: ...

    def on_message(self, payload: bytes, is_text: bool) -> None: ...

    def on_pong(self) -> None: ...

    def on_closed(self, code: int | None) -> None: ...


# The decision on an upgrade request (see 1. above; `decide_now`, optional, is not typed here).
WebSocketApp = Callable[[UpgradeRequest], Awaitable["Handler | Refusal"]]


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented text frame (RFC 6455 §5.2): servers never mask, so one frame
    serves every subscriber byte for byte."""
    return rfc6455.server_frame(rfc6455.OP_TEXT, payload)


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """The bounds every adapter enforces (the contract suite checks each one)."""

    max_message_bytes: int = 262144  # one frame or a reassembled message; over -> 1009
    send_queue: int = 1000  # messages held while the transport is paused; over -> 4008
    max_header_bytes: int = 16000  # the upgrade request head; over -> 431
    handshake_timeout_s: float = 10.0  # bound on reading the head and on WebSocketApp(request)
    close_grace_s: float = 2.0  # after our close frame, wait this long for the peer's
    read_buffer_size: int = 2048  # an adapter's initial read buffer (picows grows it on demand)

    def __post_init__(self) -> None:
        if self.max_message_bytes < 125 or self.send_queue < 1 or self.max_header_bytes < 256:
            raise ValueError(f"unusable transport limits: {self}")
        if self.handshake_timeout_s <= 0 or self.close_grace_s < 0:
            raise ValueError(f"unusable transport limits: {self}")


class TransportAdapter(Protocol):
    """A WebSocket implementation for `transport.server.build_server`: the protocol class that
    uvicorn's `ws=` hook instantiates for each `Upgrade: websocket` request, serving `app`."""

    name: str

    def ws_protocol(self, app: WebSocketApp, limits: TransportLimits) -> type[asyncio.Protocol]: ...
