"""Issue 13.12b: two connects of one device to two nodes at the same moment. Whatever the
interleaving, each session's `device.connected` is recorded before its `device.disconnected`,
exactly one `device.disconnected` (replaced) is recorded for the loser, and one session
survives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import orjson
import pytest

from fleetwire.broker.memory import MemoryBroker
from fleetwire.domain.close import Close
from fleetwire.store.base import EventWrite, WriteOp, WriteResult
from fleetwire.store.memory import MemoryDatabase
from tests.clock import ManualClock
from tests.unit.services.fakes import (
    FakeDeviceSession,
    FakePresence,
    FlakyStore,
    Node,
    make_node,
    running,
    until,
)

pytestmark = pytest.mark.anyio


class GatedStore(FlakyStore):
    """Holds every write that records a `device.connected` until `gate` is set: a node whose
    announce is slow (its database is busy)."""

    def __init__(self, database: MemoryDatabase) -> None:
        super().__init__(database)
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        if any(isinstance(op, EventWrite) and op.name == "device.connected" for op in ops):
            await self.gate.wait()
        return await super().write(ops)


@asynccontextmanager
async def two_nodes() -> AsyncIterator[tuple[Node, Node, GatedStore]]:
    """n1 and n2 on one clock, broker, database and presence; n2's announces can be held."""
    clock, broker, database = ManualClock(), MemoryBroker(), MemoryDatabase()
    presence = FakePresence(clock)
    slow = GatedStore(database)
    shared = {"clock": clock, "broker": broker, "presence": presence}
    n1 = make_node(node_id="n1", database=database, **shared)  # type: ignore[arg-type]  # typed kwargs
    n2 = make_node(node_id="n2", store=slow, **shared)  # type: ignore[arg-type]  # typed kwargs
    async with AsyncExitStack() as stack:
        for node in (n1, n2):
            await stack.enter_async_context(running(node))
        yield n1, n2, slow


def lifecycle(node: Node, device_id: str) -> list[tuple[str, str]]:
    """(event, session id) of the device's presence events, in seq order."""
    found = [
        (e.seq, e.name, orjson.loads(e.payload)["data"]["session_id"])
        for e in node.log.events
        if e.device_id == device_id and e.name in ("device.connected", "device.disconnected")
    ]
    return [(name, session) for _, name, session in sorted(found)]


async def open_on(node: Node, device_id: str, session_id: str) -> FakeDeviceSession:
    device = await node.services.registry.get(device_id)
    session = FakeDeviceSession(device, node.clock.now_ms(), session_id)
    node.services.sessions.device_opened(session)
    return session


async def test_the_loser_announced_late_reports_its_own_end_after_its_connect() -> None:
    """n2's session `old` claims presence, but its `device.connected` is held; `new` on n1
    replaces it and does not see the event within the wait: n1 records only its own
    connect and asks n2 to report; n2 records `old`'s connect, then its disconnect."""
    async with two_nodes() as (n1, n2, slow):
        await n1.register("d1")
        await n2.seen("d1", "device.registered")
        slow.gate.clear()
        old = await open_on(n2, "d1", "old")
        await until(lambda: n1.presence._sessions.get("d1") is not None)
        new = await open_on(n1, "d1", "new")
        await until(lambda: n1.services.sessions._connected_waiters != {})
        n1.clock.advance(2.0)  # the wait for `old`'s announce ends unseen
        await until(lambda: old.closes == [Close.REPLACED])
        await n1.seen("d1", "device.connected")  # `new` is announced; `old` still held
        n2.services.sessions.device_closed(old, "replaced")  # its socket closed meanwhile
        slow.gate.set()
        await n1.seen("d1", "device.disconnected")
        await n1.settle()
        await n2.settle()
        assert lifecycle(n1, "d1") == [
            ("device.connected", "new"),
            ("device.connected", "old"),
            ("device.disconnected", "old"),
        ]
        assert n1.log.data("d1", "device.disconnected")[0]["reason"] == "replaced"
        assert new.closes == []
        assert (await n1.presence.get("d1")).session_id == "new"  # type: ignore[union-attr]


async def test_the_loser_announced_during_the_wait_is_reported_by_the_winner() -> None:
    """`old`'s `device.connected` commits while `new` waits: n1 sees it, records `old`'s
    disconnect and then `new`'s connect; n2 reports nothing more when `old` closes."""
    async with two_nodes() as (n1, n2, slow):
        await n1.register("d1")
        await n2.seen("d1", "device.registered")
        slow.gate.clear()
        old = await open_on(n2, "d1", "old")
        await until(lambda: n1.presence._sessions.get("d1") is not None)
        await open_on(n1, "d1", "new")
        await until(lambda: n1.services.sessions._connected_waiters != {})
        slow.gate.set()  # `old` is announced within the wait
        await n1.seen("d1", "device.connected", 2)
        await until(lambda: old.closes == [Close.REPLACED])
        n2.services.sessions.device_closed(old, "replaced")
        await n1.settle()
        await n2.settle()
        assert lifecycle(n1, "d1") == [
            ("device.connected", "old"),
            ("device.disconnected", "old"),
            ("device.connected", "new"),
        ]
