"""RegistryService: register, update, delete and reads, with the events they record."""

from __future__ import annotations

import asyncio

import pytest

from fleetwire.auth.principal import Principal, Role
from fleetwire.domain.clock import format_ms
from fleetwire.domain.close import Close
from fleetwire.domain.devices import Device, DeviceFilter
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.presence.base import SessionInfo
from fleetwire.services.registry import OFFLINE
from tests.unit.services.fakes import ADMIN, LIMIT_S, Node

pytestmark = pytest.mark.anyio

SCHEMA = {"type": "object", "properties": {"t": {"type": "number"}}}


async def test_register_records_registered_with_seq_1(node: Node) -> None:
    """A registration stores the device at seq 1 and delivers `device.registered` seq 1,
    whose data shows the device as inserted (seq 0)."""
    device = await node.register("d1", name="pump", tags=("a",))
    assert (device.id, device.name, device.tags, device.seq) == ("d1", "pump", ("a",), 1)
    assert node.log.of("d1") == [("device.registered", 1)]
    data = node.log.data("d1", "device.registered")[0]
    assert (data["id"], data["name"], data["tags"], data["seq"]) == ("d1", "pump", ["a"], 0)


async def test_register_duplicate_is_a_conflict(node: Node) -> None:
    """Registering an existing id is refused with `conflict`, and records nothing."""
    await node.register("d1")
    with pytest.raises(FleetwireError) as caught:
        await asyncio.wait_for(node.services.registry.register(Device("d1")), LIMIT_S)
    assert caught.value == FleetwireError(ErrorCode.CONFLICT, "device 'd1' exists already")
    await node.settle()
    assert node.log.of("d1") == [("device.registered", 1)]


async def test_register_checks_the_telemetry_schema(node: Node) -> None:
    """A device with a valid telemetry_schema is stored with it; an invalid one is refused
    (`invalid_message`) before anything is written."""
    stored = await node.register("d1", telemetry_schema=SCHEMA)
    assert stored.telemetry_schema == SCHEMA
    with pytest.raises(FleetwireError) as caught:
        await node.services.registry.register(Device("d2", telemetry_schema={"type": 5}))
    assert caught.value.code is ErrorCode.INVALID_MESSAGE
    assert await node.services.registry.find("d2") is None


async def test_update_applies_changes_and_records_updated(node: Node) -> None:
    """A PATCH of registry fields returns the changed device at seq 2 and delivers
    `device.updated` seq 2 with the new fields."""
    await node.register("d1", name="old")
    device = await node.services.registry.update("d1", {"name": "new", "tags": ["x", "y"]}, None)
    assert (device.name, device.tags, device.seq) == ("new", ("x", "y"), 2)
    await node.seen("d1", "device.updated")
    assert node.log.of("d1") == [("device.registered", 1), ("device.updated", 2)]
    data = node.log.data("d1", "device.updated")[0]
    assert (data["name"], data["tags"]) == ("new", ["x", "y"])


async def test_update_checks_a_new_telemetry_schema(node: Node) -> None:
    """A valid new telemetry_schema is stored; an invalid one is refused, nothing changes."""
    await node.register("d1")
    device = await node.services.registry.update("d1", {"telemetry_schema": SCHEMA}, None)
    assert device.telemetry_schema == SCHEMA
    with pytest.raises(FleetwireError) as caught:
        await node.services.registry.update("d1", {"telemetry_schema": {"type": 5}}, None)
    assert caught.value.code is ErrorCode.INVALID_MESSAGE
    assert (await node.services.registry.get("d1")).telemetry_schema == SCHEMA


async def test_update_status_only_records_status_with_source_api(node: Node) -> None:
    """A status-only update sets the status (`source: api`), records `device.status`, no
    `device.updated`, and returns the device read back at its new seq."""
    await node.register("d1")
    device = await node.services.registry.update("d1", {}, "maintenance")
    assert (device.status, device.seq) == ("maintenance", 2)
    await node.seen("d1", "device.status")
    assert node.log.of("d1") == [("device.registered", 1), ("device.status", 2)]
    assert node.log.data("d1", "device.status") == [
        {"status": "maintenance", "previous_status": None, "source": "api"}
    ]


async def test_update_with_nothing_returns_the_device_unchanged(node: Node) -> None:
    """No changes and no status: the stored device comes back and nothing is recorded."""
    await node.register("d1", name="n")
    device = await node.services.registry.update("d1", {}, None)
    assert (device.name, device.seq) == ("n", 1)
    await node.settle()
    assert node.log.of("d1") == [("device.registered", 1)]


async def test_update_disabled_closes_the_local_session_4003(node: Node) -> None:
    """Disabling a device closes its live local session with 4003 (forbidden)."""
    await node.register("d1")
    session = await node.connect("d1")
    device = await node.services.registry.update("d1", {"disabled": True}, None)
    assert device.disabled is True
    assert session.closes == [Close.FORBIDDEN]


async def test_update_disabled_closes_a_session_on_another_node(pair: tuple[Node, Node]) -> None:
    """Disabling a device connected to another node closes that session 4003 through the
    broker, without suppressing its own disconnect report."""
    n1, n2 = pair
    await n1.register("d1")
    await n2.seen("d1", "device.registered")
    session = await n2.connect("d1")
    await n1.services.registry.update("d1", {"disabled": True}, None)
    assert session.closes == [Close.FORBIDDEN]
    assert session.session_id not in n2.services.sessions.local.suppressed


async def test_update_disabled_without_session_closes_nothing(node: Node) -> None:
    """Disabling an offline device only changes the record."""
    await node.register("d1")
    device = await node.services.registry.update("d1", {"disabled": True}, None)
    assert device.disabled is True
    assert len(node.services.sessions.local) == 0


async def test_update_missing_device_is_not_found(node: Node) -> None:
    """Updating an unknown device is `not_found`."""
    with pytest.raises(FleetwireError) as caught:
        await node.services.registry.update("nope", {"name": "x"}, None)
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such device")


async def test_update_of_a_device_deleted_meanwhile_is_not_found(node: Node) -> None:
    """A device that vanished between the read and the write is `not_found`."""
    node.store.phantoms.add("ghost")
    with pytest.raises(FleetwireError) as caught:
        await node.services.registry.update("ghost", {"name": "x"}, None)
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such device")


async def test_update_during_a_store_outage_is_unavailable(node: Node) -> None:
    """A store outage during an update is `unavailable` with a generic message."""
    await node.register("d1")
    node.store.down = True
    with pytest.raises(FleetwireError) as caught:
        await node.services.registry.update("d1", {"name": "x"}, None)
    assert caught.value == FleetwireError(ErrorCode.UNAVAILABLE, "storage unavailable, retry later")


async def test_delete_connected_device_reports_disconnect_before_deleted(node: Node) -> None:
    """Deleting a connected device records `device.disconnected` (reason forbidden) before
    `device.deleted`, closes the session 4003 with its own report suppressed, and the
    session's later end records nothing more."""
    await node.register("d1")
    session = await node.connect("d1")
    node.clock.advance(1.5)
    await asyncio.wait_for(node.services.registry.delete("d1"), LIMIT_S)
    await node.seen("d1", "device.deleted")
    assert node.log.of("d1") == [
        ("device.registered", 1),
        ("device.connected", 2),
        ("device.disconnected", 3),
        ("device.deleted", 4),
    ]
    assert node.log.data("d1", "device.disconnected") == [
        {"session_id": session.session_id, "reason": "forbidden", "connected_for_s": 1.5}
    ]
    assert session.closes == [Close.FORBIDDEN]
    assert await node.presence.get("d1") is None
    node.services.sessions.device_closed(session, "forbidden")  # the endpoint's report
    await node.settle()
    assert node.log.count("d1", "device.disconnected") == 1
    assert await node.services.registry.find("d1") is None


async def test_delete_offline_device_records_only_deleted(node: Node) -> None:
    """Deleting an offline device delivers `device.deleted` (seq + 1) and nothing else."""
    await node.register("d1")
    await node.services.registry.delete("d1")
    await node.seen("d1", "device.deleted")
    assert node.log.of("d1") == [("device.registered", 1), ("device.deleted", 2)]
    assert await node.services.registry.find("d1") is None


async def test_delete_missing_device_is_not_found(node: Node) -> None:
    """Deleting an unknown device is `not_found`; one that vanished meanwhile too."""
    with pytest.raises(FleetwireError) as caught:
        await node.services.registry.delete("nope")
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such device")
    node.store.phantoms.add("ghost")
    with pytest.raises(FleetwireError) as caught:
        await node.services.registry.delete("ghost")
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such device")


async def test_delete_closes_a_local_session_presence_lost(node: Node) -> None:
    """Deleting a device ends its live local session (4003) even when Presence has lost it."""
    await node.register("d1")
    session = await node.connect("d1")
    assert await node.presence.remove("d1", session.session_id)  # e.g. Redis restarted
    await node.services.registry.delete("d1")
    assert session.closes == [Close.FORBIDDEN]


async def test_reads_get_find_and_list(node: Node) -> None:
    """get/find return the stored device (find: None when absent, get: not_found); the list
    pages in id order after a cursor and filters."""
    for device_id, type_ in (("a", "pump"), ("b", "valve"), ("c", "pump")):
        await node.register(device_id, type=type_)
    registry = node.services.registry
    assert (await registry.get("a")).type == "pump"
    assert (await registry.find("b")) is not None
    assert await registry.find("zz") is None
    with pytest.raises(FleetwireError) as caught:
        await registry.get("zz")
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such device")
    pumps = await registry.list_devices(DeviceFilter(type="pump"), 10, None)
    assert [d.id for d in pumps] == ["a", "c"]
    assert [d.id for d in await registry.list_devices(DeviceFilter(), 1, "a")] == ["b"]


async def test_events_reads_history_after_a_seq(node: Node) -> None:
    """`events` returns the history after `since`, at most `limit`; unknown device: not_found."""
    await node.register("d1")
    await node.services.ingest.status("d1", "ok", "device")
    await node.services.ingest.status("d1", "hot", "device")
    events = await node.services.registry.events("d1", 1, 10)
    assert [(e.name, e.seq, e.data["status"]) for e in events] == [
        ("device.status", 2, "ok"),
        ("device.status", 3, "hot"),
    ]
    assert [e.seq for e in await node.services.registry.events("d1", 0, 1)] == [1]
    with pytest.raises(FleetwireError):
        await node.services.registry.events("zz", 0, 10)


async def test_connection_blocks_offline_and_online(node: Node) -> None:
    """The connection block is OFFLINE for an offline device and the session (without the
    device id) for a connected one; `connections` answers for several devices."""
    await node.register("d1")
    await node.register("d2")
    session = await node.connect("d1")
    registry = node.services.registry
    at = format_ms(session.connected_at_ms)
    online = {
        "connected": True,
        "session_id": session.session_id,
        "node": "n1",
        "connected_at": at,
        "last_seen_at": at,
    }
    assert await registry.connection("d1") == online
    assert await registry.connection("d2") == OFFLINE
    assert await registry.connections(["d1", "d2"]) == {"d1": online, "d2": OFFLINE}


async def test_session_reads(node: Node) -> None:
    """connected_ids and sessions (paged by device id) come from Presence."""
    await node.register("d1")
    await node.register("d2")
    s1 = await node.connect("d1")
    s2 = await node.connect("d2")
    registry = node.services.registry
    assert await registry.connected_ids() == frozenset({"d1", "d2"})
    page = await registry.sessions(10, None)
    assert [(i.device_id, i.session_id, i.node) for i in page] == [
        ("d1", s1.session_id, "n1"),
        ("d2", s2.session_id, "n1"),
    ]
    assert await registry.sessions(10, "d1") == [
        SessionInfo("d2", s2.session_id, "n1", s2.connected_at_ms, s2.connected_at_ms)
    ]


async def test_session_count_counts_what_the_principal_may_see(node: Node) -> None:
    """An unrestricted principal counts every session; a restricted one only those of its
    claim, over every page of Presence (here 501 sessions, two pages)."""
    for index in range(501):
        await node.presence.add(SessionInfo(f"d{index:03d}", f"s{index}", "n9", 1, 1))
    registry = node.services.registry
    assert await registry.session_count(ADMIN) == 501
    restricted = Principal("vera", Role.VIEWER, 2**62, ("d00*", "d500"))
    assert await registry.session_count(restricted) == 11


async def test_require_active(node: Node) -> None:
    """require_active passes for an enabled device and is `forbidden` for a missing or a
    disabled one."""
    await node.register("d1")
    await node.register("d2", disabled=True)
    await node.services.registry.require_active("d1")
    for device_id in ("d2", "zz"):
        with pytest.raises(FleetwireError) as caught:
            await node.services.registry.require_active(device_id)
        assert caught.value == FleetwireError(ErrorCode.FORBIDDEN, "unknown or disabled device")
