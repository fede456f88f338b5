"""What every Store implementation applies alike, so that memory and SQL cannot drift apart."""

from __future__ import annotations

from typing import Final

from fleetwire.domain.devices import Device, DeviceChanges
from fleetwire.domain.telemetry import Value

# What UpdateDevice / update_device may change (status is an event, seq the counter).
CHANGEABLE: Final = frozenset({"name", "type", "tags", "metadata", "telemetry_schema", "disabled"})


def trim_step(history: int) -> int:
    """How many seqs apart a device's event history is trimmed back to its newest `history`.

    An eighth of the bound, not the bound itself: trimming 1000 events at once held the write
    transaction of every device crossing the mark for 5-25 ms (measured, issue 12), one
    eighth costs the same per event in steps of ~125 rows, and the history never exceeds
    `history` + `trim_step(history)` events between purges.
    """
    return max(1, history // 8)


def check_changes(changes: DeviceChanges) -> None:
    """Refuse fields that UpdateDevice / update_device may not change (ValueError)."""
    unknown = changes.keys() - CHANGEABLE
    if unknown:
        raise ValueError(f"not changeable through update_device: {sorted(unknown)}")


def to_store(device: Device, now_ms: int) -> Device:
    """The device as it will be stored: created_at 0 = now, updated_at 0 = created_at."""
    created = device.created_at_ms or now_ms
    return Device(
        id=device.id,
        name=device.name,
        type=device.type,
        tags=tuple(device.tags),
        metadata=dict(device.metadata),
        status=device.status,
        status_at_ms=device.status_at_ms,
        disabled=device.disabled,
        telemetry_schema=device.telemetry_schema,
        created_at_ms=created,
        updated_at_ms=device.updated_at_ms or created,
        seq=device.seq,
    )


def scalar(key: str, value: object) -> Value:
    """`value` as exactly a float, int, bool or str (subclasses such as IntEnum normalised).

    The store keeps scalars only (domain.telemetry refuses the rest); anything else reaching
    a store is a bug upstream and fails its op with TypeError instead of being stored as junk.
    """
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    raise TypeError(
        f"telemetry value of {key!r} must be a number, a boolean or a string, not {type(value).__name__}"
    )
