"""Device events (contract §2.3): what happened, numbered per device by `seq`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import orjson

from fleetwire.domain.clock import format_ms

# Event name -> the subscription class that receives it (contract §2.3).
EVENT_CLASS: Final[dict[str, str]] = {
    "device.connected": "presence",
    "device.disconnected": "presence",
    "device.status": "status",
    "device.telemetry": "telemetry",
    "command.updated": "command",
    "device.registered": "registry",
    "device.updated": "registry",
    "device.deleted": "registry",
    "twin.updated": "twin",
}
EVENT_CLASSES: Final = frozenset(EVENT_CLASS.values())
DISCONNECT_REASONS: Final = frozenset(
    {"closed", "timeout", "replaced", "token_expired", "forbidden", "node_lost", "server_shutdown"}
)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event before the store has numbered it."""

    device_id: str
    name: str
    at_ms: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    device_id: str
    seq: int
    name: str
    at_ms: int
    data: dict[str, Any]

    @property
    def event_class(self) -> str:
        return EVENT_CLASS[self.name]

    def public(self) -> dict[str, Any]:
        return {
            "type": "event",
            "event": self.name,
            "device_id": self.device_id,
            "seq": self.seq,
            "at": format_ms(self.at_ms),
            "data": self.data,
        }

    def wire(self) -> bytes:
        """The JSON text frame payload; encoded once and shared by every subscriber."""
        try:
            return orjson.dumps(self.public())
        except orjson.JSONEncodeError:  # an integer beyond 64 bits (REST telemetry keeps every digit)
            return json.dumps(self.public(), separators=(",", ":"), ensure_ascii=False).encode()
