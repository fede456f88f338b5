"""IngestService: telemetry and status through the group writer, and the stored reads."""

from __future__ import annotations

import logging

import pytest

from fleetwire.domain.clock import format_ms
from fleetwire.domain.devices import Device
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.telemetry import Record
from fleetwire.store.base import TelemetryPoint
from tests.unit.services.fakes import Node

pytestmark = pytest.mark.anyio

SCHEMA = {"type": "object", "properties": {"t": {"type": "number"}}}
UNAVAILABLE = FleetwireError(ErrorCode.UNAVAILABLE, "storage unavailable, retry later")


async def test_telemetry_returns_the_accepted_count(node: Node) -> None:
    """Two records are accepted (2) and delivered as `device.telemetry` seq 2 and 3."""
    device = await node.register("d1")
    records = [Record(1_000, {"t": 20.5}), Record(2_000, {"t": 21, "on": True})]
    assert await node.services.ingest.telemetry(device, records, batch=True) == 2
    await node.seen("d1", "device.telemetry", 2)
    assert node.log.of("d1")[1:] == [("device.telemetry", 2), ("device.telemetry", 3)]
    assert node.log.data("d1", "device.telemetry") == [
        {"ts": format_ms(1_000), "values": {"t": 20.5}},
        {"ts": format_ms(2_000), "values": {"t": 21, "on": True}},
    ]


async def test_telemetry_refused_by_the_schema_stores_nothing(node: Node) -> None:
    """A record that fails the device's schema is `invalid_message` naming the record, and
    none of the batch is stored."""
    device = await node.register("d1", telemetry_schema=SCHEMA)
    records = [Record(1_000, {"t": 1}), Record(2_000, {"t": "hot"})]
    with pytest.raises(FleetwireError) as caught:
        await node.services.ingest.telemetry(device, records, batch=True)
    assert caught.value.code is ErrorCode.INVALID_MESSAGE
    assert caught.value.message == "telemetry does not match the device's schema; none stored"
    assert [d["loc"] for d in caught.value.details] == [["records", 1, "data"]]
    with pytest.raises(FleetwireError) as single:
        await node.services.ingest.telemetry(device, [Record(1_000, {"t": "hot"})], batch=False)
    assert [d["loc"] for d in single.value.details] == [["data"]]
    assert await node.services.ingest.latest("d1") == {}


async def test_telemetry_for_a_missing_device_is_not_found(node: Node) -> None:
    """Telemetry of a device that no longer exists is `not_found`."""
    with pytest.raises(FleetwireError) as caught:
        await node.services.ingest.telemetry(Device("gone"), [Record(1, {"t": 1})], batch=False)
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "device no longer exists")


async def test_status_change_and_repeat(node: Node) -> None:
    """A new status is a change (True, `device.status` recorded); the same again is not
    (False, nothing recorded)."""
    await node.register("d1")
    ingest = node.services.ingest
    assert await ingest.status("d1", "ok", "device") is True
    assert await ingest.status("d1", "ok", "device") is False
    await node.settle()
    assert node.log.of("d1") == [("device.registered", 1), ("device.status", 2)]
    assert node.log.data("d1", "device.status") == [
        {"status": "ok", "previous_status": None, "source": "device"}
    ]
    device = await ingest.device("d1")
    assert (device.status, device.status_at_ms) == ("ok", node.clock.now_ms())


async def test_status_of_a_missing_device_is_not_found(node: Node) -> None:
    """A status for an unknown device is `not_found`."""
    with pytest.raises(FleetwireError) as caught:
        await node.services.ingest.status("gone", "ok", "device")
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such device")


async def test_store_outage_is_unavailable_with_a_generic_message(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """A store outage is `unavailable` with a generic message for the client; the storage
    detail goes to the log only (13.15)."""
    device = await node.register("d1")
    node.store.down = True
    with caplog.at_level(logging.WARNING, logger="fleetwire.services.ingest"):
        with pytest.raises(FleetwireError) as telemetry:
            await node.services.ingest.telemetry(device, [Record(1, {"t": 1})], batch=False)
        with pytest.raises(FleetwireError) as status:
            await node.services.ingest.status("d1", "ok", "device")
    assert telemetry.value == UNAVAILABLE
    assert status.value == UNAVAILABLE
    assert "db.internal" not in str(telemetry.value)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fleetwire.services.ingest"]
    assert warnings == ["storage unavailable: connection refused by db.internal:5432 (password=hunter2)"] * 2


async def test_points_newest_first_with_filters(node: Node) -> None:
    """points returns (ts, seq, key) newest first, filtered by key and time, paged with
    `before`; an unknown device is `not_found`."""
    device = await node.register("d1")
    ingest = node.services.ingest
    await ingest.telemetry(device, [Record(1_000, {"a": 1, "b": 2}), Record(2_000, {"a": 3})], batch=True)
    everything = await ingest.points("d1", key=None, from_ms=None, to_ms=None, limit=10, before=None)
    assert everything == [
        TelemetryPoint("a", 2_000, 3, 3),
        TelemetryPoint("b", 1_000, 2, 2),
        TelemetryPoint("a", 1_000, 2, 1),
    ]
    only_a = await ingest.points("d1", key="a", from_ms=1_500, to_ms=None, limit=10, before=None)
    assert only_a == [TelemetryPoint("a", 2_000, 3, 3)]
    paged = await ingest.points("d1", key=None, from_ms=None, to_ms=None, limit=1, before=(2_000, 3, "a"))
    assert paged == [TelemetryPoint("b", 1_000, 2, 2)]
    with pytest.raises(FleetwireError) as caught:
        await ingest.points("gone", key=None, from_ms=None, to_ms=None, limit=10, before=None)
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such device")


async def test_latest_per_key(node: Node) -> None:
    """latest holds the newest point of each key; an unknown device is `not_found`."""
    device = await node.register("d1")
    ingest = node.services.ingest
    await ingest.telemetry(device, [Record(2_000, {"a": 1}), Record(1_000, {"a": 0, "b": 5})], batch=True)
    assert await ingest.latest("d1") == {
        "a": TelemetryPoint("a", 2_000, 2, 1),
        "b": TelemetryPoint("b", 1_000, 3, 5),
    }
    with pytest.raises(FleetwireError):
        await ingest.latest("gone")


async def test_device_reads_the_stored_device(node: Node) -> None:
    """`device` returns the stored device for REST ingest; unknown: `not_found`."""
    await node.register("d1", name="x")
    assert (await node.services.ingest.device("d1")).name == "x"
    with pytest.raises(FleetwireError) as caught:
        await node.services.ingest.device("gone")
    assert caught.value.code is ErrorCode.NOT_FOUND
