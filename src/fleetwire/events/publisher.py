"""EventPublisher: committed events handed to the Broker in commit order (each encoded once,
when first read)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable

from fleetwire.broker.base import Broker, BrokerUnavailableError, Publishable
from fleetwire.domain.events import Event, RecordRun

log = logging.getLogger(__name__)


class EventPublisher:
    """A bounded, ordered outbox between the group writer and the Broker.

    The writer calls `submit` synchronously after each commit, so the outbox order is the
    commit order. One task drains it in batches. Overflow policy: when more than
    `max_pending` entries wait (an event, or the run of one telemetry write's records: bounded
    by the batch limits) because the broker is down or slower than the writer, the oldest are
    dropped and counted; they stay in the store's history, where `resume` and
    `GET /devices/{id}/events` find them.
    """

    def __init__(self, broker: Broker, max_pending: int = 100_000, batch: int = 1000) -> None:
        self._broker = broker
        self._outbox: deque[Publishable] = deque()
        self._max_pending = max_pending
        self._batch = batch
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.published = 0

    def submit(self, events: Iterable[Event | RecordRun]) -> None:
        outbox = self._outbox
        outbox.extend(events)  # Events are Published (their payload is encoded if read); runs stay runs
        overflow = len(outbox) - self._max_pending
        if overflow > 0:
            dropped = sum(_events_in(outbox.popleft()) for _ in range(overflow))
            self.dropped += dropped
            log.warning("event outbox full: dropped %d events (kept in history)", dropped)
        if outbox:
            self._drained.clear()
            self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="event-publisher")

    async def _run(self) -> None:
        outbox = self._outbox
        backoff = 0.05
        while True:
            if not outbox:
                self._wakeup.clear()
                await self._wakeup.wait()
            count = min(len(outbox), self._batch)
            batch = [outbox[i] for i in range(count)]
            try:
                await self._broker.publish(batch)
            except BrokerUnavailableError:
                await asyncio.sleep(backoff)  # the broker reconnects on its own; keep the outbox
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception:
                log.exception("publishing events failed; dropping %d", count)
            backoff = 0.05
            for _ in range(count):
                outbox.popleft()
            self.published += sum(_events_in(entry) for entry in batch)
            if not outbox:
                self._drained.set()

    async def drained(self) -> None:
        """Until the outbox is empty: used at shutdown (bound it with a timeout)."""
        await self._drained.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def _events_in(entry: Publishable) -> int:
    """What an outbox entry counts for in the published and dropped events."""
    return len(entry.records) if isinstance(entry, RecordRun) else 1
