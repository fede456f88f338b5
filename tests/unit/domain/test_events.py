"""Event: a frozen value, built fast, its payload encoded once and never part of its identity;
RecordRun: the events of a telemetry write, made when read."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from fleetwire.domain.events import Event, RecordRun
from fleetwire.domain.telemetry import Record


def test_an_event_is_frozen_and_equal_by_its_fields() -> None:
    event = Event("d1", 3, "device.status", 1_000, {"status": "busy"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.seq = 4  # type: ignore[misc]  # the point: assignment is refused
    assert event == Event("d1", 3, "device.status", 1_000, {"status": "busy"})
    assert event != Event("d1", 4, "device.status", 1_000, {"status": "busy"})
    assert (
        repr(event)
        == "Event(device_id='d1', seq=3, name='device.status', at_ms=1000, data={'status': 'busy'})"
    )


def test_the_payload_is_encoded_once_and_not_carried_by_replace() -> None:
    event = Event("d1", 3, "device.status", 1_000, {"status": "busy"})
    payload = event.payload
    assert orjson.loads(payload) == {
        "type": "event",
        "event": "device.status",
        "device_id": "d1",
        "seq": 3,
        "at": "1970-01-01T00:00:01.000Z",
        "data": {"status": "busy"},
    }
    assert event.payload is payload  # cached, not encoded again
    assert event == Event("d1", 3, "device.status", 1_000, {"status": "busy"})  # the cache is no field
    moved = dataclasses.replace(event, seq=4)
    assert (moved.seq, orjson.loads(moved.payload)["seq"]) == (4, 4)


def test_a_run_of_records_makes_the_events_the_records_would_have() -> None:
    """RecordRun.events(): one `device.telemetry` per record, seqs first_seq + 1 onwards,
    data exactly Record.event_data() (the per-thread cached timestamps included)."""
    records = [
        Record(1_700_000_000_999, {"t": 1}),
        Record(1_700_000_001_000, {"t": 2}),
        Record(5, {"ok": True}),
    ]
    run = RecordRun("d1", 41, records)
    assert run.last_seq == 44
    assert run.events() == [
        Event("d1", 42 + i, "device.telemetry", r.ts_ms, r.event_data()) for i, r in enumerate(records)
    ]
    assert run.events() == run.events()  # made again, the same
