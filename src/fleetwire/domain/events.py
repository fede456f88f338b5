"""Device events (contract §2.3): what happened, numbered per device by `seq`."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson

from fleetwire.domain.clock import Timestamps, format_ms

if TYPE_CHECKING:
    from fleetwire.domain.telemetry import Record

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


@dataclass(frozen=True, slots=True, init=False)
class Event:
    device_id: str
    seq: int
    name: str
    at_ms: int
    data: dict[str, Any]
    # The encoded frame payload, made on first use (see `payload`).
    _payload: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __init__(self, device_id: str, seq: int, name: str, at_ms: int, data: dict[str, Any]) -> None:
        # Still frozen, but filled through its slots' own setters, looked up once (_FILL), not
        # through dataclasses' object.__setattr__ per field: one Event per telemetry record,
        # 0.62-0.69 against 1.2-1.4 µs each (timeit, benchmarks/results.md).
        set_device_id, set_seq, set_name, set_at_ms, set_data, set_payload = _FILL
        set_device_id(self, device_id)
        set_seq(self, seq)
        set_name(self, name)
        set_at_ms(self, at_ms)
        set_data(self, data)
        set_payload(self, None)

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

    @property
    def payload(self) -> bytes:
        """The JSON text frame payload: encoded once, when something first reads it (a
        subscriber's route, the Redis broker, the history replay), and shared by every reader.
        An event nobody reads is never encoded: with no subscriber, telemetry ingest spent a
        quarter of its event-loop time encoding record events (benchmarks/results.md)."""
        payload = self._payload
        if payload is None:
            try:
                payload = orjson.dumps(self.public())
            except orjson.JSONEncodeError:  # an integer beyond 64 bits (REST telemetry keeps every digit)
                payload = json.dumps(self.public(), separators=(",", ":"), ensure_ascii=False).encode()
            object.__setattr__(self, "_payload", payload)  # a cache on a frozen value: not state
        return payload


# The setters of Event's slots (member descriptors), for its __init__.
_FILL: Final[tuple[Any, ...]] = tuple(
    Event.__dict__[name].__set__ for name in ("device_id", "seq", "name", "at_ms", "data", "_payload")
)


@dataclass(frozen=True, slots=True)
class RecordRun:
    """The `device.telemetry` events of one telemetry write, as the write committed them: its
    records, numbered `first_seq + 1` onwards. They become Events (`events()`) only for a
    reader: a subscriber of the device's telemetry, a listener that asks for telemetry, the
    Redis broker. With nobody reading, the hub only moves the device's seq past the run:
    building an Event per record and walking the hub with each was a third of batch ingest's
    CPU (issue 12, benchmarks/results.md)."""

    device_id: str
    first_seq: int  # the device's seq before the run's first record
    records: Sequence[Record]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.records)

    def events(self) -> list[Event]:
        stamp = _thread_stamp()
        device_id, seq = self.device_id, self.first_seq
        made: list[Event] = []
        for record in self.records:
            seq += 1
            ts = record.ts_ms
            data = {"ts": stamp(ts), "values": record.values}  # == record.event_data(), faster
            made.append(Event(device_id, seq, "device.telemetry", ts, data))
        return made


_STAMPS = threading.local()


def _thread_stamp() -> Timestamps:
    """This thread's Timestamps: its cached second serves run after run (one per run would
    pay a whole format_ms for each single-record message), and no two threads share one."""
    stamp: Timestamps | None = getattr(_STAMPS, "stamp", None)
    if stamp is None:
        stamp = _STAMPS.stamp = Timestamps()
    return stamp
