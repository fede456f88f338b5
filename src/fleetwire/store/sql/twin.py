"""Device twins: statements on `twins`, each run inside the caller's transaction.

Plain SQL text with `?` parameters (driver.Tx), the same on SQLite and PostgreSQL:
parameters are str and int only (JSON goes in as orjson text and comes out as text).

Concurrency: a PatchTwin runs inside `events.write`, which on PostgreSQL locks the device
row (FOR NO KEY UPDATE, in id order) before any op of a group that is not pure ingest, and
SQLite has one writer at a time (BEGIN IMMEDIATE). The UPDATE is checked against the
version read as well, so a twin changed between the read and the write (which those locks
exclude) could never be overwritten silently.
"""

from __future__ import annotations

from typing import Final

import orjson

from fleetwire.domain.twin import Twin, delta
from fleetwire.domain.twin import apply as apply_patch
from fleetwire.store.base import EventWrite, PatchTwin, StoreUnavailableError, WriteResult
from fleetwire.store.sql.driver import Tx
from fleetwire.store.sql.engine import dumps

_EMPTY_METADATA: Final = dumps({"desired": {}, "reported": {}})

_INSERT: Final = "INSERT INTO twins (device_id, version, desired, reported, metadata) VALUES (?, 1, ?, ?, ?)"
_SELECT: Final = "SELECT version, desired, reported, metadata FROM twins WHERE device_id = ?"
# RETURNING: the driver API has no rowcount; no row back = the version check failed.
_UPDATE: Final = (
    "UPDATE twins SET version = ?, desired = ?, reported = ?, metadata = ?"
    " WHERE device_id = ? AND version = ? RETURNING version"
)
_DELETE: Final = "DELETE FROM twins WHERE device_id = ?"
# Twins with something desired (stored as orjson text: empty is exactly '{}'); the CAST
# because PostgreSQL's json has no equality operator.
_WITH_DESIRED: Final = "SELECT device_id, desired, reported FROM twins WHERE CAST(desired AS TEXT) <> ?"


async def insert(tx: Tx, device_id: str) -> None:
    """The empty twin (version 1) of a device just inserted."""
    await tx.execute(_INSERT, device_id, "{}", "{}", _EMPTY_METADATA)


async def get(tx: Tx, device_id: str) -> Twin | None:
    row = await tx.fetchrow(_SELECT, device_id)
    if row is None:
        return None
    return Twin(device_id, int(row[0]), orjson.loads(row[1]), orjson.loads(row[2]), orjson.loads(row[3]))


async def devices_with_delta(tx: Tx) -> set[str]:
    found = await tx.fetch(_WITH_DESIRED, "{}")
    return {row[0] for row in found if delta(orjson.loads(row[1]), orjson.loads(row[2]))}


async def delete(tx: Tx, device_id: str) -> None:
    await tx.execute(_DELETE, device_id)


async def patch(tx: Tx, op: PatchTwin, result: WriteResult) -> EventWrite | None:
    """Apply one PatchTwin; its `twin.updated` to number next when the twin changed."""
    twin = await get(tx, op.device_id)
    if twin is None:
        result.missing = True
        return None
    outcome = apply_patch(twin, op.section, op.patch, op.at_ms, if_version=op.if_version, limits=op.limits)
    result.twin = outcome.twin
    result.refused = outcome.refused
    if not outcome.changed:
        return None
    new = outcome.twin
    updated = await tx.fetchrow(
        _UPDATE,
        new.version,
        dumps(new.desired),
        dumps(new.reported),
        dumps(new.metadata),
        op.device_id,
        twin.version,
    )
    if updated is None:  # excluded by the row lock (module docstring); never silently lost
        raise StoreUnavailableError(f"the twin of {op.device_id!r} changed during the write; retry")
    result.changed = True
    return EventWrite(op.device_id, "twin.updated", op.at_ms, outcome.event_data(op.section, op.patch))
