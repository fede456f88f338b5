"""FleetActivity: per-minute fleet counts, disconnect reasons and flapping devices from the
events a hub hands its listeners, on a manual clock."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fleetwire.broker.base import EncodedEvent, Published
from fleetwire.domain.clock import format_ms
from fleetwire.domain.events import EVENT_CLASS
from fleetwire.services.activity import FleetActivity
from tests.clock import ManualClock

START = 1_800_000_000_000  # a whole minute (divisible by 60,000)


def event(name: str, device_id: str = "d1", **data: Any) -> Published:
    payload = orjson.dumps({"type": "event", "event": name, "device_id": device_id, "data": data})
    return EncodedEvent(device_id, 1, name, EVENT_CLASS[name], payload)


def test_counts_per_minute_with_quiet_minutes_as_zero_rows() -> None:
    """Each event lands in the minute it arrived; a minute with none is a zero row; rows are
    oldest first and `minutes` picks how many."""
    clock = ManualClock(START)
    activity = FleetActivity(clock, window_minutes=5)
    activity.on_event(event("device.connected", node="n1"))
    activity.on_records("d1", 1)
    activity.on_records("d2", 1)
    activity.on_event(event("command.updated", state="sent"))
    activity.on_event(event("command.updated", state="pending"))
    activity.on_event(event("device.status", status="ok"))  # not counted
    clock.advance(120)
    activity.on_event(event("command.updated", state="succeeded"))
    activity.on_event(event("command.updated", state="failed"))
    activity.on_event(event("command.updated", state="timed_out"))
    activity.on_event(event("command.updated", state="expired"))  # not one of the counted states
    activity.on_event(event("device.disconnected", reason="timeout"))
    summary = activity.summary(3)
    zero = {
        "connects": 0,
        "disconnects": 0,
        "telemetry": 0,
        "commands_issued": 0,
        "commands_succeeded": 0,
        "commands_failed": 0,
        "commands_timed_out": 0,
    }
    assert summary["minutes"] == [
        {**zero, "at": format_ms(START), "connects": 1, "telemetry": 2, "commands_issued": 2},
        {**zero, "at": format_ms(START + 60_000)},
        {
            **zero,
            "at": format_ms(START + 120_000),
            "disconnects": 1,
            "commands_succeeded": 1,
            "commands_failed": 1,
            "commands_timed_out": 1,
        },
    ]
    assert summary["since"] == format_ms(START)
    assert summary["window_minutes"] == 5
    assert summary["nodes"] == ["n1"]
    assert len(activity.summary()["minutes"]) == 5
    assert len(activity.summary(0)["minutes"]) == 1
    assert len(activity.summary(99)["minutes"]) == 5


def test_reasons_and_flapping_over_the_window_then_forgotten() -> None:
    """Reasons are summed over the window (most frequent first); a device with at least the
    threshold of disconnects in the window is flapping, ranked by count; once its disconnects
    leave the window it is no longer listed, and its state is dropped."""
    clock = ManualClock(START)
    activity = FleetActivity(clock, window_minutes=10, flapping_disconnects=3)
    for _ in range(4):
        activity.on_event(event("device.disconnected", "a", reason="timeout"))
    for reason in ("closed", "closed", "replaced"):
        activity.on_event(event("device.disconnected", "b", reason=reason))
    activity.on_event(event("device.disconnected", "c", reason="closed"))
    activity.on_event(event("device.disconnected", "c", reason=7))  # not a string: "unknown"
    summary = activity.summary()
    assert summary["disconnect_reasons"] == {"timeout": 4, "closed": 3, "replaced": 1, "unknown": 1}
    assert summary["flapping"] == [
        {"device_id": "a", "disconnects": 4, "last_at": format_ms(START)},
        {"device_id": "b", "disconnects": 3, "last_at": format_ms(START)},
    ]
    assert summary["flapping_threshold"] == 3
    clock.advance(9 * 60)
    activity.on_event(event("device.disconnected", "b", reason="closed"))
    activity.on_event(event("device.connected", "b", node="n2"))
    assert [row["device_id"] for row in activity.summary()["flapping"]] == ["a", "b"]  # 4 each: by id
    clock.advance(60)  # the first minute leaves the window
    summary = activity.summary()
    assert summary["disconnect_reasons"] == {"closed": 1}
    assert summary["flapping"] == []
    assert summary["nodes"] == ["n2"]
    clock.advance(10 * 60)
    assert activity.summary()["nodes"] == []
    assert activity._disconnects == {}


def test_a_node_that_is_not_a_string_is_not_listed() -> None:
    """A connect whose `node` is missing is counted but names no node."""
    activity = FleetActivity(ManualClock(START))
    activity.on_event(event("device.connected"))
    summary = activity.summary(1)
    assert (summary["minutes"][0]["connects"], summary["nodes"]) == (1, [])


@pytest.mark.parametrize(("window", "threshold"), [(0, 3), (5, 0)])
def test_bad_limits_are_refused(window: int, threshold: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        FleetActivity(ManualClock(START), window_minutes=window, flapping_disconnects=threshold)
