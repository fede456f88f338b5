"""Services: start and stop in the order that keeps the guarantees; the periodic purge."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from fleetwire.broker.memory import MemoryBroker
from fleetwire.domain.close import Close
from fleetwire.domain.telemetry import Record
from fleetwire.store.base import EventWrite, StoreUnavailableError
from tests.unit.services.fakes import ADMIN, LIMIT_S, FakeClientSession, Node, make_node, running

pytestmark = pytest.mark.anyio
DAY_MS = 86_400_000


class ReconnectingBroker(MemoryBroker):
    """A MemoryBroker that, like RedisBroker, calls `on_reconnect` after an outage."""

    def __init__(self) -> None:
        super().__init__()
        self.on_reconnect: Callable[[], Awaitable[None]] | None = None


async def test_start_hands_reconcile_to_a_reconnecting_broker() -> None:
    """A broker that reconnects on its own is given the sessions' reconcile to call."""
    broker = ReconnectingBroker()
    node = make_node(broker=broker)
    async with running(node):
        assert broker.on_reconnect == node.services.sessions.reconcile


async def test_stop_closes_sessions_and_refuses_writes() -> None:
    """stop closes every local session 1001, writes what was queued, and then the writer
    refuses new work; no timer is left armed."""
    node = make_node()
    async with running(node):
        await node.register("d1")
        session = await node.connect("d1")
        client = FakeClientSession(ADMIN, node.clock.now_ms())
        node.services.sessions.opened(client)
    assert (session.closes, client.closes) == ([Close.SERVER_SHUTDOWN], [Close.SERVER_SHUTDOWN])
    with pytest.raises(StoreUnavailableError):
        await asyncio.wait_for(node.services.writer.submit(EventWrite("d1", "device.status", 1, {})), LIMIT_S)
    assert node.clock.pending == 0  # no periodic step and no command timer is left armed


async def test_purge_runs_every_interval_with_the_retention(node: Node) -> None:
    """Every purge_interval_s (3600 s), telemetry older than the retention (30 days) goes."""
    device = await node.register("d1")
    now = node.clock.now_ms()
    old, recent = Record(now - 31 * DAY_MS, {"t": 1}), Record(now - DAY_MS, {"t": 2})
    await node.services.ingest.telemetry(device, [old, recent], batch=True)
    ingest = node.services.ingest

    async def points() -> list[int]:
        found = await ingest.points("d1", key=None, from_ms=None, to_ms=None, limit=10, before=None)
        return [p.ts_ms for p in found]

    assert await points() == [recent.ts_ms, old.ts_ms]
    node.clock.advance(3600)
    await asyncio.wait_for(node.services.tasks.drain(LIMIT_S), LIMIT_S)
    assert await points() == [recent.ts_ms]
