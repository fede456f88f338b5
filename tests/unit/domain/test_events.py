"""Event: a frozen value, built fast, its payload encoded once and never part of its identity."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from fleetwire.domain.events import Event


def test_an_event_is_frozen_and_equal_by_its_fields() -> None:
    event = Event("d1", 3, "device.status", 1_000, {"status": "busy"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.seq = 4  # type: ignore[misc]  # the point: assignment is refused
    assert event == Event("d1", 3, "device.status", 1_000, {"status": "busy"})
    assert event != Event("d1", 4, "device.status", 1_000, {"status": "busy"})
    assert repr(event) == "Event(device_id='d1', seq=3, name='device.status', at_ms=1000, data={'status': 'busy'})"


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
