"""TwinService: authorization, writes through the group writer, and `twin_delta` to the
device's session on whichever node holds it (memory seams, ManualClock)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from fleetwire.auth.principal import Principal, Role
from fleetwire.broker.base import EncodedEvent, Published
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.twin import Twin
from fleetwire.store.memory import MemoryDatabase
from tests.unit.services.fakes import (
    ADMIN,
    LIMIT_S,
    OPERATOR,
    VIEWER,
    FakeDeviceSession,
    FlakyStore,
    Node,
    make_node,
    running,
    until,
)

pytestmark = pytest.mark.anyio


def device_principal(device_id: str) -> Principal:
    return Principal(device_id, Role.DEVICE, 2**62)


async def refused(call: Any) -> ErrorCode:
    with pytest.raises(FleetwireError) as caught:
        await asyncio.wait_for(call, LIMIT_S)
    return caught.value.code


def deltas(session: FakeDeviceSession) -> list[dict[str, Any]]:
    return [m for m in session.messages() if m["type"] == "twin_delta"]


def twin_event(device_id: str, seq: int, version: int, delta: dict[str, Any]) -> Published:
    payload = {"type": "event", "event": "twin.updated", "device_id": device_id, "seq": seq,
               "at": "2026-12-01T00:00:00.000Z", "data": {"version": version, "delta": delta}}  # fmt: skip
    return EncodedEvent(device_id, seq, "twin.updated", "twin", orjson.dumps(payload))


class GatedStore(FlakyStore):
    """A MemoryStore whose twin reads wait for `gate` while it is set (a slow database)."""

    def __init__(self, database: MemoryDatabase | None = None) -> None:
        super().__init__(database)
        self.gate: asyncio.Event | None = None
        self.reading = asyncio.Event()

    async def twin(self, device_id: str) -> Twin | None:
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        return await super().twin(device_id)

    async def devices_with_delta(self) -> set[str]:
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        return await super().devices_with_delta()


async def test_authorization_of_reads_and_writes(node: Node) -> None:
    """get: viewers within their claim and the device itself; desired: operators within
    their claim, never a device; reported: the device itself or an admin."""
    twin = node.services.twin
    await node.register("d1")
    await node.register("d2")
    narrow = Principal("nina", Role.OPERATOR, 2**62, ("d2",))
    assert (await twin.get(VIEWER, "d1")).version == 1
    assert (await twin.get(device_principal("d1"), "d1")).device_id == "d1"
    assert await refused(twin.get(device_principal("d1"), "d2")) is ErrorCode.FORBIDDEN
    assert await refused(twin.get(narrow, "d1")) is ErrorCode.FORBIDDEN
    assert await refused(twin.get(VIEWER, "nope")) is ErrorCode.NOT_FOUND
    assert await refused(twin.update_desired(VIEWER, "d1", {"a": 1})) is ErrorCode.FORBIDDEN
    assert await refused(twin.update_desired(narrow, "d1", {"a": 1})) is ErrorCode.FORBIDDEN
    assert await refused(twin.update_desired(device_principal("d1"), "d1", {"a": 1})) is ErrorCode.FORBIDDEN
    assert await refused(twin.report(OPERATOR, "d1", {"a": 1})) is ErrorCode.FORBIDDEN
    assert await refused(twin.report(device_principal("d2"), "d1", {"a": 1})) is ErrorCode.FORBIDDEN
    assert await refused(twin.update_desired(OPERATOR, "nope", {"a": 1})) is ErrorCode.NOT_FOUND
    assert (await twin.get(VIEWER, "d1")) == Twin.empty("d1")
    assert (await twin.update_desired(narrow, "d2", {"a": 1})).desired == {"a": 1}
    assert (await twin.report(device_principal("d1"), "d1", {"b": 2})).reported == {"b": 2}
    assert (await twin.report(ADMIN, "d2", {"c": 3})).version == 3


async def test_writes_refused_by_content_conflict_or_outage_change_nothing(node: Node) -> None:
    """A bad patch is invalid_message before anything is queued; a stale if_version is a
    conflict; a store outage is `unavailable`; the twin stays as it was through all."""
    twin = node.services.twin
    await node.register("d1")
    await twin.update_desired(OPERATOR, "d1", {"a": 1})
    assert await refused(twin.update_desired(OPERATOR, "d1", {"bad key": 1})) is ErrorCode.INVALID_MESSAGE
    assert await refused(twin.update_desired(OPERATOR, "d1", [1])) is ErrorCode.INVALID_MESSAGE
    assert await refused(twin.update_desired(OPERATOR, "d1", {"a": 2}, if_version=1)) is ErrorCode.CONFLICT
    node.store.down = True
    assert await refused(twin.update_desired(OPERATOR, "d1", {"a": 3})) is ErrorCode.UNAVAILABLE
    node.store.down = False
    assert (await twin.get(VIEWER, "d1")).desired == {"a": 1}


async def test_small_limits_from_settings() -> None:
    """FLEETWIRE_MAX_TWIN_BYTES / _DEPTH reach the service: over them, too_large and
    invalid_message."""
    async with running(make_node(max_twin_bytes=32, max_twin_depth=2)) as node:
        await node.register("d1")
        twin = node.services.twin
        assert await refused(twin.update_desired(OPERATOR, "d1", {"a": "x" * 40})) is ErrorCode.TOO_LARGE
        deep = {"a": {"b": {"c": 1}}}
        assert await refused(twin.update_desired(OPERATOR, "d1", deep)) is ErrorCode.INVALID_MESSAGE
        assert (await twin.update_desired(OPERATOR, "d1", {"a": {"b": 1}})).version == 2


async def test_delta_after_connect_and_after_writes(node: Node) -> None:
    """A device connecting with a non-empty delta is told it after `device.connected` and
    queued commands; later writes tell it again only when the delta changed."""
    twin = node.services.twin
    await node.register("d1")
    await twin.update_desired(OPERATOR, "d1", {"fw": "2"})
    session = await node.connect("d1")
    await until(lambda: len(deltas(session)) == 1)
    assert deltas(session) == [{"type": "twin_delta", "version": 2, "delta": {"fw": "2"}}]
    await twin.report(device_principal("d1"), "d1", {"uptime": 1})  # delta as it was
    await twin.report(device_principal("d1"), "d1", {"fw": "2"})  # delta empties
    await node.seen("d1", "twin.updated", 3)
    assert deltas(session)[1:] == [{"type": "twin_delta", "version": 4, "delta": {}}]


async def test_no_delta_after_connect_when_empty_and_none_after_close(node: Node) -> None:
    """An empty delta sends nothing on connect; a closed session is forgotten and sent
    nothing more."""
    twin = node.services.twin
    await node.register("d1")
    session = await node.connect("d1")
    await node.settle()
    assert deltas(session) == []
    node.services.sessions.device_closed(session, "closed")
    await twin.update_desired(OPERATOR, "d1", {"a": 1})
    await node.seen("d1", "twin.updated")
    assert deltas(session) == []


async def test_an_event_during_the_sync_read_is_not_lost() -> None:
    """A write that commits while the connecting session reads the stored twin (an old
    snapshot): the session is told the newer delta once, not the stale one."""
    store = GatedStore()
    async with running(make_node(store=store)) as node:
        twin = node.services.twin
        await node.register("d1")
        await twin.update_desired(OPERATOR, "d1", {"x": 1})  # a delta: the connect reads the twin
        store.gate = asyncio.Event()
        device = await node.services.registry.get("d1")
        session = FakeDeviceSession(device, node.clock.now_ms())
        node.services.sessions.device_opened(session)
        await asyncio.wait_for(store.reading.wait(), LIMIT_S)
        twin.on_event(twin_event("d1", 90, 7, {"x": 7}))  # as if committed meanwhile
        twin.on_event(twin_event("d1", 89, 6, {"x": 6}))  # an older one arriving late
        store.gate.set()
        await until(lambda: len(deltas(session)) == 1)
        assert deltas(session) == [{"type": "twin_delta", "version": 7, "delta": {"x": 7}}]
        twin.on_event(twin_event("d1", 91, 5, {"x": 5}))  # older than told: never sent
        twin.on_event(twin_event("d1", 92, 8, {"x": 7}))  # same delta: nothing to tell
        twin.on_event(twin_event("d1", 93, 9, {"x": 9}))
        assert [d["version"] for d in deltas(session)] == [7, 9]


async def test_a_session_closed_during_its_sync_is_told_nothing() -> None:
    store = GatedStore()
    async with running(make_node(store=store)) as node:
        await node.register("d1")
        await node.services.twin.update_desired(OPERATOR, "d1", {"a": 1})
        store.gate = asyncio.Event()
        device = await node.services.registry.get("d1")
        session = FakeDeviceSession(device, node.clock.now_ms())
        node.services.sessions.device_opened(session)
        await asyncio.wait_for(store.reading.wait(), LIMIT_S)
        node.services.sessions.device_closed(session, "closed")
        store.gate.set()
        await node.settle()
        assert deltas(session) == []


async def test_resync_tells_only_a_newer_different_delta(node: Node) -> None:
    """`sync` again (after an outage): nothing when the twin has not moved past what the
    session was told; the delta when it has."""
    twin = node.services.twin
    await node.register("d1")
    await twin.update_desired(OPERATOR, "d1", {"a": 1})
    session = await node.connect("d1")
    await until(lambda: len(deltas(session)) == 1)
    await asyncio.wait_for(twin.sync(session), LIMIT_S)
    assert len(deltas(session)) == 1
    # A write whose event this node missed (the outbox overflowed during an outage):
    node.store.database.twins["d1"] = Twin("d1", 5, {"a": 2}, {}, {"desired": {}, "reported": {}})
    await asyncio.wait_for(twin.sync(session), LIMIT_S)
    assert deltas(session)[1:] == [{"type": "twin_delta", "version": 5, "delta": {"a": 2}}]
    twin.session_closed(session.session_id)
    twin.on_event(twin_event("d1", 50, 9, {"z": 1}))  # not synced: its own read would see it
    assert len(deltas(session)) == 2


async def test_events_of_other_kinds_or_devices_are_ignored(node: Node) -> None:
    twin = node.services.twin
    await node.register("d1")
    session = await node.connect("d1")
    await node.settle()
    other = EncodedEvent("d1", 99, "device.status", "status", b"{}")
    twin.on_event(other)
    twin.on_event(twin_event("elsewhere", 1, 2, {"a": 1}))
    assert deltas(session) == []


async def test_desired_written_on_one_node_reaches_the_device_on_another(pair: tuple[Node, Node]) -> None:
    """The hub of every node sees twin.updated; only the node holding the session tells it."""
    n1, n2 = pair
    await n1.register("d1")
    session = await n2.connect("d1")
    await n1.services.twin.update_desired(OPERATOR, "d1", {"mode": "eco"})
    await until(lambda: len(deltas(session)) == 1)
    assert deltas(session) == [{"type": "twin_delta", "version": 2, "delta": {"mode": "eco"}}]


async def test_a_device_known_to_have_no_delta_connects_without_a_read() -> None:
    """The index filled at start says which devices have a delta; a connect of any other
    device reads nothing (the gated read would never return) and tells nothing; a write
    puts the device in the index and its next session reads and is told."""
    store = GatedStore()
    async with running(make_node(store=store)) as node:
        twin = node.services.twin
        await node.register("d1")
        store.gate = asyncio.Event()
        quiet = await node.connect("d1")
        await node.settle()
        assert (store.reading.is_set(), deltas(quiet)) == (False, [])
        store.gate = None
        await twin.update_desired(OPERATOR, "d1", {"a": 1})
        await until(lambda: len(deltas(quiet)) == 1)
        node.services.sessions.device_closed(quiet, "closed")
        again = await node.connect("d1")
        await until(lambda: len(deltas(again)) == 1)
        assert deltas(again) == [{"type": "twin_delta", "version": 2, "delta": {"a": 1}}]
        await twin.report(device_principal("d1"), "d1", {"a": 1})  # the delta empties
        await until(lambda: len(deltas(again)) == 2)
        node.services.sessions.device_closed(again, "closed")
        store.gate = asyncio.Event()
        last = await node.connect("d1")
        await node.settle()
        assert (store.reading.is_set(), deltas(last)) == (False, [])
        node.services.sessions.device_closed(last, "closed")
        store.gate = None
        await twin.update_desired(OPERATOR, "d1", {"b": 2})
        await node.services.registry.delete("d1")  # its twin, and its place in the index, go
        await node.register("d1")
        store.gate = asyncio.Event()
        fresh = await node.connect("d1")
        await node.settle()
        assert (store.reading.is_set(), deltas(fresh)) == (False, [])


async def test_a_delta_given_while_the_index_fills_is_kept() -> None:
    """An outage makes the index stale (every connect reads); a delta whose event arrives
    while the fill query runs (on an older snapshot) stays in the index."""
    store = GatedStore()
    async with running(make_node(store=store)) as node:
        twin = node.services.twin
        await node.register("d1")
        twin.index_stale()
        store.gate = asyncio.Event()
        filling = asyncio.ensure_future(twin.fill())
        await asyncio.wait_for(store.reading.wait(), LIMIT_S)
        twin.on_event(twin_event("d1", 5, 2, {"a": 1}))  # committed after the query's snapshot
        store.gate.set()
        await asyncio.wait_for(filling, LIMIT_S)
        store.gate = asyncio.Event()
        store.reading.clear()
        device = await node.services.registry.get("d1")
        session = FakeDeviceSession(device, node.clock.now_ms())
        node.services.sessions.device_opened(session)
        await asyncio.wait_for(store.reading.wait(), LIMIT_S)  # d1 may have a delta: it reads
        store.gate.set()
        await node.settle()
