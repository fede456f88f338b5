"""What the SDK tests share: a recorder of a client's connection events, with bounded waits."""

from __future__ import annotations

import asyncio
from typing import TypeVar

from fleetwire.client import ConnectionEvent
from fleetwire.client.connection import BaseClient

TIMEOUT = 5.0
E = TypeVar("E")


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
