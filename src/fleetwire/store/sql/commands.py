"""Commands: statements on `commands`, each run inside the caller's transaction."""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from fleetwire.domain.commands import ALLOWED_FROM, Command, CommandState
from fleetwire.store.schema import commands
from fleetwire.store.sql import rows

_NOT_FINAL: Final = (CommandState.PENDING.value, CommandState.SENT.value)


async def insert(conn: AsyncConnection, command: Command) -> None:
    await conn.execute(commands.insert().values(rows.command_values(command)))


async def _one(conn: AsyncConnection, query: sa.Select[Any]) -> Command | None:
    row = (await conn.execute(query)).first()
    return None if row is None else rows.command(row)


async def _all(conn: AsyncConnection, query: sa.Select[Any]) -> list[Command]:
    return [rows.command(row) for row in (await conn.execute(query)).all()]


async def get(conn: AsyncConnection, command_id: str) -> Command | None:
    return await _one(conn, commands.select().where(commands.c.id == command_id))


async def find(conn: AsyncConnection, issuer: str, idempotency_key: str, since_ms: int) -> Command | None:
    c = commands.c
    query = (
        commands.select()
        .where(c.issuer == issuer, c.idempotency_key == idempotency_key, c.issued_at >= since_ms)
        .order_by(c.issued_at.desc(), c.id.desc())
        .limit(1)
    )
    return await _one(conn, query)


def transition(
    command_id: str,
    state: CommandState,
    at_ms: int,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
) -> sa.UpdateBase | None:
    """The compare-and-set UPDATE … RETURNING; None if no state may move to `state`."""
    allowed = ALLOWED_FROM.get(state)
    if not allowed:
        return None  # nothing ever moves back to pending
    values: dict[str, Any] = {"state": state.value}
    if state is CommandState.SENT:
        values["sent_at"] = at_ms
    if state.final:
        values["completed_at"] = at_ms
    if result is not None:
        values["result"] = result
    if error is not None:
        values["error"] = error
    return (
        commands.update()
        .where(commands.c.id == command_id, commands.c.state.in_(sorted(s.value for s in allowed)))
        .values(values)
        .returning(*commands.c)
    )


async def pending(conn: AsyncConnection, device_id: str, now_ms: int) -> list[Command]:
    c = commands.c
    query = (
        commands.select()
        .where(c.device_id == device_id, c.state == CommandState.PENDING.value, c.expires_at > now_ms)
        .order_by(c.issued_at, c.id)
    )
    return await _all(conn, query)


async def devices_with_pending(conn: AsyncConnection, now_ms: int) -> set[str]:
    c = commands.c
    query = (
        sa.select(c.device_id).where(c.state == CommandState.PENDING.value, c.expires_at > now_ms).distinct()
    )
    return set((await conn.execute(query)).scalars().all())


async def of_device(
    conn: AsyncConnection, device_id: str, state: CommandState | None, limit: int, after: str | None
) -> list[Command]:
    c = commands.c
    query = commands.select().where(c.device_id == device_id).order_by(c.id.desc()).limit(limit)
    if state is not None:
        query = query.where(c.state == state.value)
    if after is not None:
        query = query.where(c.id < after)
    return await _all(conn, query)


async def due(conn: AsyncConnection, now_ms: int, limit: int) -> list[Command]:
    c = commands.c
    query = (
        commands.select()
        .where(c.state.in_(_NOT_FINAL), c.expires_at <= now_ms)
        .order_by(c.expires_at, c.id)
        .limit(limit)
    )
    return await _all(conn, query)
