"""The device registry: statements on `devices`, each run inside the caller's transaction."""

from __future__ import annotations

from typing import Any, Final

from fleetwire.domain.devices import Device, DeviceChanges, DeviceFilter
from fleetwire.store.rules import check_changes
from fleetwire.store.sql import rows, twin
from fleetwire.store.sql.dialect import Dialect
from fleetwire.store.sql.driver import Tx
from fleetwire.store.sql.engine import dumps
from fleetwire.store.sql.globs import has_wildcard

_COLUMNS: Final = rows.DEVICE_COLUMNS
# ON CONFLICT DO NOTHING rather than catching the unique violation: on PostgreSQL a failed
# statement aborts the whole transaction, and the rest of a write group must commit.
_INSERT: Final = (
    f"INSERT INTO devices ({_COLUMNS}) VALUES ({','.join('?' * len(rows.DEVICE_FIELDS))})"
    " ON CONFLICT DO NOTHING RETURNING id"
)
_GET: Final = f"SELECT {_COLUMNS} FROM devices WHERE id = ?"


async def insert(tx: Tx, device: Device) -> bool:
    """Insert the (to_store) device; False if the id exists (nothing written, nothing failed)."""
    if await tx.fetchrow(_INSERT, *rows.device_values(device)) is None:
        return False
    await twin.insert(tx, device.id)  # created with the device (contract §6)
    return True


async def get(tx: Tx, device_id: str) -> Device | None:
    row = await tx.fetchrow(_GET, device_id)
    return None if row is None else rows.device(row)


def list_query(
    dialect: Dialect, where: DeviceFilter, limit: int, after: str | None
) -> tuple[str, list[Any]] | None:
    """(SQL, parameters) of the devices ordered by id after `after`; None when the filter can
    match nothing."""
    terms: list[str] = []
    params: list[Any] = []
    if after is not None:
        terms.append("id > ?")
        params.append(after)
    if where.status is not None:
        terms.append("status = ?")
        params.append(where.status)
    if where.type is not None:
        terms.append("type = ?")
        params.append(where.type)
    if where.tag is not None:
        terms.append(dialect.has_tag("tags"))
        params.append(where.tag)
    if where.only_ids is not None:
        if not where.only_ids:
            return None
        terms.append(dialect.ids_in("id"))
        params.append(dialect.ids_param(where.only_ids))
    if where.exclude_ids:
        terms.append("NOT " + dialect.ids_in("id"))
        params.append(dialect.ids_param(where.exclude_ids))
    if where.patterns is not None:
        # Two terms whatever the number of patterns: exact ids, and globs (issue 13.14).
        ids = [p for p in where.patterns if not has_wildcard(p)]
        globs = dialect.globs_param(p for p in where.patterns if has_wildcard(p))
        matches: list[str] = []
        if ids:
            matches.append(dialect.ids_in("id"))
            params.append(dialect.ids_param(ids))
        if globs is not None:
            matches.append(dialect.globs_any("devices.id"))  # json_each has an `id` too
            params.append(globs)
        if not matches:
            return None
        terms.append("(" + " OR ".join(matches) + ")")
    where_sql = " WHERE " + " AND ".join(terms) if terms else ""
    params.append(limit)
    return f"SELECT {_COLUMNS} FROM devices{where_sql} ORDER BY id LIMIT ?", params


def change_values(changes: DeviceChanges) -> dict[str, Any]:
    """The column values to set for `changes` (ValueError for a field that may not change)."""
    check_changes(changes)
    values: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "tags":
            values["tags"] = dumps(list(value))
        elif name == "disabled":
            values["disabled"] = bool(value)
        elif name in ("metadata", "telemetry_schema"):
            values[name] = None if value is None else dumps(value)
        else:
            values[name] = value
    return values


async def update(tx: Tx, device_id: str, values: dict[str, Any], at_ms: int) -> Device | None:
    """Set `values` (from change_values, not empty) and updated_at; the updated device."""
    names = sorted(values)  # column names from CHANGEABLE only (check_changes), never input
    assignments = ", ".join(f"{name} = ?" for name in names)
    row = await tx.fetchrow(
        f"UPDATE devices SET {assignments}, updated_at = ? WHERE id = ? RETURNING {_COLUMNS}",
        *(values[name] for name in names),
        at_ms,
        device_id,
    )
    return None if row is None else rows.device(row)


async def delete(tx: Tx, device_id: str) -> Device | None:
    """Delete the device with its history, telemetry and commands; it as it was."""
    # The device row first: it waits for (and then excludes) writes in flight.
    row = await tx.fetchrow(f"DELETE FROM devices WHERE id = ? RETURNING {_COLUMNS}", device_id)
    if row is None:
        return None
    # Events and commands also cascade by foreign key; telemetry has none (see schema).
    for table in ("telemetry", "telemetry_latest", "events", "commands"):
        await tx.execute(f"DELETE FROM {table} WHERE device_id = ?", device_id)
    await twin.delete(tx, device_id)
    return rows.device(row)
