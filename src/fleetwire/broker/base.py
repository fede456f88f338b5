"""The Broker seam: how events and node-addressed messages reach every node of a cluster.

Contract of every implementation:
- `publish(batch)` hands the batch to the `on_events` handler of every started node,
  this one included, at most once. A `RecordRun` in it stands for its events: a handler
  gets either the run (the memory broker) or its events, in its place (Redis). Batches
  from one publishing node arrive in publish order, and each batch in its own order;
  nothing is promised across publishers (the hub restores per-device `seq` order).
- `send(node, message)` hands a JSON-able dict to `on_message` of that one node, if it is
  running, at most once; to an absent node it is dropped (callers own retries/timeouts).
- Handlers run on the node's event loop and must not block; a handler exception is
  logged and does not stop delivery.
- While the backend is unreachable, `publish`/`send` raise BrokerUnavailableError and
  `ping` raises; the implementation reconnects on its own with backoff.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from fleetwire.domain.events import RecordRun


class BrokerUnavailableError(Exception):
    """The broker backend cannot be reached."""


class Published(Protocol):
    """One committed event as the broker and the hub see it: routing fields plus the frame
    payload. A node's own events are `domain.events.Event`s, which encode their payload only
    when it is first read; events from another node arrive as `EncodedEvent`s."""

    @property
    def device_id(self) -> str: ...

    @property
    def seq(self) -> int: ...

    @property
    def name(self) -> str:
        """The event's name, e.g. "device.deleted": nothing reads the payload to learn it."""

    @property
    def event_class(self) -> str:
        """presence, status, telemetry, command, registry, twin."""

    @property
    def payload(self) -> bytes:
        """The `{"type": "event", ...}` JSON, encoded once at the source."""

    @property
    def data(self) -> dict[str, Any]:
        """The event's `data` object, shared by every listener: read it, never change it. A
        node's own event hands over the dict it was made from (nothing encoded or decoded:
        three listeners each decoding the payload of every `command.updated` cost 6 JSON
        decodes per command round trip, issue 12); another node's is decoded once."""


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """A Published event as bytes from the wire (another node's, through the Redis broker)."""

    device_id: str
    seq: int
    name: str
    event_class: str
    payload: bytes
    _data: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def data(self) -> dict[str, Any]:
        data = self._data
        if data is None:
            decoded: dict[str, Any] = orjson.loads(self.payload)["data"]
            data = decoded
            object.__setattr__(self, "_data", data)  # a cache on a frozen value: not state
        return data


# What a node publishes: its committed events, and its telemetry record events as runs, made
# into events only where they are read (domain.events.RecordRun). Another node's arrive as
# EncodedEvents, one per record.
Publishable = Published | RecordRun
EventsHandler = Callable[[Sequence[Publishable]], None]
MessageHandler = Callable[[dict[str, Any]], None]


class Broker(Protocol):
    async def start(self, node_id: str, on_events: EventsHandler, on_message: MessageHandler) -> None: ...

    async def publish(self, batch: Sequence[Publishable]) -> None: ...

    async def send(self, node_id: str, message: dict[str, Any]) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
