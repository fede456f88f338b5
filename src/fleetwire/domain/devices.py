"""Devices in the registry (contract §3) and the identifiers and names fleetwire accepts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fleetwire.domain.clock import format_optional

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
STATUS = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # telemetry keys and command names


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    name: str | None = None
    type: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str | None = None
    status_at_ms: int | None = None
    disabled: bool = False
    telemetry_schema: dict[str, Any] | None = None
    created_at_ms: int = 0
    updated_at_ms: int = 0
    seq: int = 0  # the last event sequence number given out for this device

    @classmethod
    def from_public(cls, data: dict[str, Any]) -> Device:
        """The inverse of public() for what a session needs (timestamps are not kept)."""
        return cls(
            id=data["id"],
            name=data.get("name"),
            type=data.get("type"),
            tags=tuple(data.get("tags") or ()),
            metadata=data.get("metadata") or {},
            status=data.get("status"),
            disabled=bool(data.get("disabled")),
            telemetry_schema=data.get("telemetry_schema"),
            seq=int(data.get("seq") or 0),
        )

    def public(self) -> dict[str, Any]:
        """The device as REST and `registry` events show it."""
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "tags": list(self.tags),
            "metadata": self.metadata,
            "status": self.status,
            "status_at": format_optional(self.status_at_ms),
            "disabled": self.disabled,
            "telemetry_schema": self.telemetry_schema,
            "created_at": format_optional(self.created_at_ms),
            "updated_at": format_optional(self.updated_at_ms),
            "seq": self.seq,
        }


@dataclass(frozen=True, slots=True)
class DeviceFilter:
    status: str | None = None
    tag: str | None = None
    type: str | None = None
    # Presence narrows the list: only these ids, or none of these ids.
    only_ids: frozenset[str] | None = None
    exclude_ids: frozenset[str] | None = None
    # The caller's `devices` claim; None = no restriction.
    patterns: tuple[str, ...] | None = None


# A PATCH as the fields that were given: any of name, type, tags, metadata, telemetry_schema,
# disabled. Status is not among them: a status change is an event (see store.EventWrite).
DeviceChanges = dict[str, Any]
