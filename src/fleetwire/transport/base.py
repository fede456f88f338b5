"""The thin adapter between a WebSocket transport and fleetwire's sessions.

The session layer only sees these types; `realtime/picows_transport.py` is the one
implementation (picows behind uvicorn's `ws` hook, REST and WebSocket on one port).

Life of a connection:
1. The transport parses the upgrade request and awaits `WebSocketApp(request)` BEFORE
   answering: a `Refusal` becomes that HTTP response (JSON body, `Connection: close`);
   a `Handler` gets a 101, then `on_open(socket)`.
2. Complete messages (continuation frames reassembled, at most `max_message_bytes`) reach
   `on_message`. Text is checked to be UTF-8 first (else close 1007). Pongs reach `on_pong`.
3. `on_closed(code)` runs exactly once, whoever closed and however: the code the SERVER sent
   (1000 when it answered a peer's close; None when TCP dropped without a close frame), so a
   peer never chooses the reason its session ended for.

Limits enforced by the transport, with the contract's close codes: a frame or message over
`max_message_bytes` -> 1009; RFC 6455 violations -> 1002; invalid UTF-8 text -> 1007; more
than `send_queue` messages waiting because the peer does not read -> 4008 `slow_consumer`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


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

    def ping(self) -> None: ...

    def close(self, code: int, reason: str) -> None:
        """Send a close frame and drop the connection after a short grace period."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    @property
    def closed(self) -> bool: ...


class Handler(Protocol):
    def on_open(self, socket: Socket) -> None: ...

    def on_message(self, payload: bytes, is_text: bool) -> None: ...

    def on_pong(self) -> None: ...

    def on_closed(self, code: int | None) -> None: ...


WebSocketApp = Callable[[UpgradeRequest], Awaitable["Handler | Refusal"]]


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented text frame (RFC 6455 §5.2): servers never mask, so one frame
    serves every subscriber byte for byte."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload
