"""What the SDK tests share: a recorder of a client's connection events, with bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar

from fleetwire.client import ConnectionEvent, FleetwireError
from fleetwire.client.connection import BaseClient
from tests.integration.harness import Node

TIMEOUT = 5.0
E = TypeVar("E")
# A request that changes nothing, per endpoint (an error reply is a reply too).
PROBE = {"/ws/device": {"type": "twin_get"}, "/ws/client": {"type": "unsubscribe", "subscription_id": "none"}}


class Recorder:
    """Every connection event of a client, in order; `next(kind)` waits for the next of a kind."""

    def __init__(self, client: BaseClient) -> None:
        self.events: list[ConnectionEvent] = []
        self._read = 0
        self._changed = asyncio.Event()
        client.on_state(self._record)

    def _record(self, event: ConnectionEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def next(self, kind: type[E], timeout: float = TIMEOUT) -> E:
        """The next event of this type after the last one returned (any type)."""
        async with asyncio.timeout(timeout):
            while True:
                while self._read < len(self.events):
                    event = self.events[self._read]
                    self._read += 1
                    if isinstance(event, kind):
                        return event
                self._changed.clear()
                await self._changed.wait()

    def kinds(self) -> list[str]:
        return [type(event).__name__ for event in self.events]


async def advance(node: Node, client: BaseClient, seconds: float, step: float = 10.0) -> None:
    """Move the server's ManualClock in steps below heartbeat_s, with two round trips on the
    client's session after each: the client has read (and answered) a ping before the first
    reply, and the server has read that pong before the second. One big jump would fire two
    heartbeats with no chance to answer the first, and drop the session as timed out."""
    left = seconds
    while left > 0:
        moved = min(step, left)
        node.advance(moved)
        left -= moved
        for _ in range(2):
            with contextlib.suppress(FleetwireError):  # the jump may have ended the session
                await client.request(PROBE[client._path])
