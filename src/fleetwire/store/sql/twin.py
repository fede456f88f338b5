"""Device twins: statements on `twins`, each run inside the caller's transaction.

Plain SQL text with named parameters, the same on SQLite and PostgreSQL: parameters are
str and int only (JSON goes in as orjson text, comes out through CAST AS TEXT), so the
statements port to any driver unchanged.

Concurrency: a PatchTwin runs inside `events.write`, which on PostgreSQL locks the device
row (FOR NO KEY UPDATE, in id order) before any op of a group that is not pure ingest, and
SQLite has one writer at a time (BEGIN IMMEDIATE). The UPDATE is checked against the
version read as well, so a twin changed between the read and the write (which those locks
exclude) could never be overwritten silently.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from fleetwire.domain.twin import Twin, delta
from fleetwire.domain.twin import apply as apply_patch
from fleetwire.store.base import EventWrite, PatchTwin, StoreUnavailableError, WriteResult
from fleetwire.store.sql.engine import dumps

_EMPTY_METADATA: Final = dumps({"desired": {}, "reported": {}})

_INSERT: Final = sa.text(
    "INSERT INTO twins (device_id, version, desired, reported, metadata)"
    " VALUES (:device_id, 1, :empty, :empty, :metadata)"
)
_SELECT: Final = sa.text(
    "SELECT version, CAST(desired AS TEXT) AS desired, CAST(reported AS TEXT) AS reported,"
    " CAST(metadata AS TEXT) AS metadata FROM twins WHERE device_id = :device_id"
)
_UPDATE: Final = sa.text(
    "UPDATE twins SET version = :version, desired = :desired, reported = :reported,"
    " metadata = :metadata WHERE device_id = :device_id AND version = :read_version"
)
_DELETE: Final = sa.text("DELETE FROM twins WHERE device_id = :device_id")
# Twins with something desired (stored as orjson text: empty is exactly '{}').
_WITH_DESIRED: Final = sa.text(
    "SELECT device_id, CAST(desired AS TEXT) AS desired, CAST(reported AS TEXT) AS reported"
    " FROM twins WHERE CAST(desired AS TEXT) <> :empty"
)


async def insert(conn: AsyncConnection, device_id: str) -> None:
    """The empty twin (version 1) of a device just inserted."""
    await conn.execute(_INSERT, {"device_id": device_id, "empty": "{}", "metadata": _EMPTY_METADATA})


async def get(conn: AsyncConnection, device_id: str) -> Twin | None:
    row = (await conn.execute(_SELECT, {"device_id": device_id})).first()
    if row is None:
        return None
    return Twin(
        device_id,
        int(row.version),
        orjson.loads(row.desired),
        orjson.loads(row.reported),
        orjson.loads(row.metadata),
    )


async def devices_with_delta(conn: AsyncConnection) -> set[str]:
    found = (await conn.execute(_WITH_DESIRED, {"empty": "{}"})).all()
    return {row.device_id for row in found if delta(orjson.loads(row.desired), orjson.loads(row.reported))}


async def delete(conn: AsyncConnection, device_id: str) -> None:
    await conn.execute(_DELETE, {"device_id": device_id})


async def patch(conn: AsyncConnection, op: PatchTwin, result: WriteResult) -> EventWrite | None:
    """Apply one PatchTwin; its `twin.updated` to number next when the twin changed."""
    twin = await get(conn, op.device_id)
    if twin is None:
        result.missing = True
        return None
    outcome = apply_patch(twin, op.section, op.patch, op.at_ms, if_version=op.if_version, limits=op.limits)
    result.twin = outcome.twin
    result.refused = outcome.refused
    if not outcome.changed:
        return None
    new = outcome.twin
    values: dict[str, Any] = {
        "device_id": op.device_id,
        "version": new.version,
        "desired": dumps(new.desired),
        "reported": dumps(new.reported),
        "metadata": dumps(new.metadata),
        "read_version": twin.version,
    }
    updated = await conn.execute(_UPDATE, values)
    if updated.rowcount != 1:  # excluded by the row lock (module docstring); never silently lost
        raise StoreUnavailableError(f"the twin of {op.device_id!r} changed during the write; retry")
    result.changed = True
    return EventWrite(op.device_id, "twin.updated", op.at_ms, outcome.event_data(op.section, op.patch))
