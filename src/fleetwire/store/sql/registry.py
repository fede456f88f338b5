"""The device registry: statements on `devices`, each run inside the caller's transaction."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from fleetwire.domain.devices import Device, DeviceChanges, DeviceFilter
from fleetwire.store.rules import check_changes
from fleetwire.store.schema import commands, devices, events, telemetry
from fleetwire.store.sql import rows, twin
from fleetwire.store.sql.dialect import Dialect
from fleetwire.store.sql.globs import has_wildcard


async def insert(conn: AsyncConnection, dialect: Dialect, device: Device) -> bool:
    """Insert the (to_store) device; False if the id exists (nothing written, nothing failed).

    ON CONFLICT DO NOTHING rather than catching the unique violation: on PostgreSQL a failed
    statement aborts the whole transaction, and the rest of a write group must commit.
    """
    statement = dialect.insert_new(devices).values(rows.device_values(device)).returning(devices.c.id)
    if (await conn.execute(statement)).first() is None:
        return False
    await twin.insert(conn, device.id)  # created with the device (contract §6)
    return True


async def get(conn: AsyncConnection, device_id: str) -> Device | None:
    row = (await conn.execute(devices.select().where(devices.c.id == device_id))).first()
    return None if row is None else rows.device(row)


def list_query(dialect: Dialect, where: DeviceFilter, limit: int, after: str | None) -> sa.Select[Any] | None:
    """Devices ordered by id after `after`; None when the filter can match nothing."""
    query = devices.select().order_by(devices.c.id).limit(limit)
    if after is not None:
        query = query.where(devices.c.id > after)
    if where.status is not None:
        query = query.where(devices.c.status == where.status)
    if where.type is not None:
        query = query.where(devices.c.type == where.type)
    if where.tag is not None:
        query = query.where(dialect.has_tag(devices.c.tags, where.tag))
    if where.only_ids is not None:
        if not where.only_ids:
            return None
        query = query.where(dialect.ids_in(devices.c.id, where.only_ids))
    if where.exclude_ids:
        query = query.where(sa.not_(dialect.ids_in(devices.c.id, where.exclude_ids)))
    if where.patterns is not None:
        # Two terms whatever the number of patterns: exact ids, and globs (issue 13.14).
        ids = [p for p in where.patterns if not has_wildcard(p)]
        globs = [p for p in where.patterns if has_wildcard(p)]
        matches: list[sa.ColumnElement[bool]] = []
        if ids:
            matches.append(dialect.ids_in(devices.c.id, ids))
        if any(dialect.glob(devices.c.id, g) is not None for g in globs):
            matches.append(dialect.globs_any(devices.c.id, globs))
        if not matches:
            return None
        query = query.where(sa.or_(*matches))
    return query


def change_values(changes: DeviceChanges) -> dict[str, Any]:
    """The columns to set for `changes` (ValueError for a field that may not change)."""
    check_changes(changes)
    values: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "tags":
            values["tags"] = list(value)
        elif name == "disabled":
            values["disabled"] = bool(value)
        else:
            values[name] = value
    return values


async def update(conn: AsyncConnection, device_id: str, values: dict[str, Any], at_ms: int) -> Device | None:
    """Set `values` (from change_values, not empty) and updated_at; the updated device."""
    statement = (
        devices.update()
        .where(devices.c.id == device_id)
        .values({**values, "updated_at": at_ms})
        .returning(*devices.c)
    )
    row = (await conn.execute(statement)).first()
    return None if row is None else rows.device(row)


async def delete(conn: AsyncConnection, device_id: str) -> Device | None:
    """Delete the device with its history, telemetry and commands; it as it was."""
    # The device row first: it waits for (and then excludes) writes in flight.
    row = (
        await conn.execute(devices.delete().where(devices.c.id == device_id).returning(*devices.c))
    ).first()
    if row is None:
        return None
    # Events and commands also cascade by foreign key; telemetry has none (see schema).
    await conn.execute(telemetry.delete().where(telemetry.c.device_id == device_id))
    await conn.execute(events.delete().where(events.c.device_id == device_id))
    await conn.execute(commands.delete().where(commands.c.device_id == device_id))
    await twin.delete(conn, device_id)
    return rows.device(row)
