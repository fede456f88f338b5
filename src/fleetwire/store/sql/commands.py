"""Commands: statements on `commands`, each run inside the caller's transaction."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Final

from fleetwire.domain.commands import ALLOWED_FROM, Command, CommandState
from fleetwire.store.schema import COMMAND_LIVE, COMMAND_PENDING
from fleetwire.store.sql import rows
from fleetwire.store.sql.dialect import Dialect
from fleetwire.store.sql.driver import Tx
from fleetwire.store.sql.engine import dumps

_COLUMNS: Final = rows.COMMAND_COLUMNS
_SELECT: Final = f"SELECT {_COLUMNS} FROM commands"
_INSERT: Final = f"INSERT INTO commands ({_COLUMNS}) VALUES ({','.join('?' * len(rows.COMMAND_FIELDS))})"


async def insert(tx: Tx, command: Command) -> None:
    await tx.execute(_INSERT, *rows.command_values(command))


async def insert_many(tx: Tx, commands: Sequence[Command]) -> None:
    """One executemany (one round trip on PostgreSQL)."""
    if len(commands) == 1:
        await insert(tx, commands[0])
    else:
        await tx.executemany(_INSERT, [rows.command_values(command) for command in commands])


async def _one(tx: Tx, where: str, *args: Any) -> Command | None:
    row = await tx.fetchrow(f"{_SELECT} {where}", *args)
    return None if row is None else rows.command(row)


async def _all(tx: Tx, where: str, *args: Any) -> list[Command]:
    return [rows.command(row) for row in await tx.fetch(f"{_SELECT} {where}", *args)]


async def get(tx: Tx, command_id: str) -> Command | None:
    return await _one(tx, "WHERE id = ?", command_id)


async def find(tx: Tx, issuer: str, idempotency_key: str, since_ms: int) -> Command | None:
    return await _one(
        tx,
        "WHERE issuer = ? AND idempotency_key = ? AND issued_at >= ?"
        " ORDER BY issued_at DESC, id DESC LIMIT 1",
        issuer,
        idempotency_key,
        since_ms,
    )


async def transition(
    tx: Tx,
    command_id: str,
    state: CommandState,
    at_ms: int,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
    device_id: str | None = None,
) -> Command | None:
    """The compare-and-set UPDATE … RETURNING; None if the current state does not allow it
    (or, given `device_id`, the command is another device's)."""
    if not ALLOWED_FROM.get(state):
        return None  # nothing ever moves back to pending
    values: list[Any] = [state.value]
    if state is CommandState.SENT:
        values.append(at_ms)
    if state.final:
        values.append(at_ms)
    if result is not None:
        values.append(dumps(result))
    if error is not None:
        values.append(dumps(error))
    values.append(command_id)
    if device_id is not None:
        values.append(device_id)
    sql = _transition_sql(state, result is not None, error is not None, device_id is not None)
    row = await tx.fetchrow(sql, *values)
    return None if row is None else rows.command(row)


# One UPDATE for many transitions (of different commands): the rows come as parameters, each
# with the state it moves to and its result or error (JSON text), and the moves ALLOWED_FROM
# permits are a constant list; RETURNING names the commands that moved (issue 12: a group of
# results on PostgreSQL cost one round trip each).
_MANY_COLUMNS: Final = (
    ("v_id", "text"),
    ("v_device", "text"),
    ("v_state", "text"),
    ("v_at", "bigint"),
    ("v_result", "json"),
    ("v_error", "json"),
)
_FINALS: Final = ", ".join(sorted(f"'{s.value}'" for s in CommandState if s.final))
_MOVES: Final = ", ".join(
    f"('{to.value}', '{source.value}')"
    for to, sources in sorted(ALLOWED_FROM.items())
    for source in sorted(sources)
)
_MANY_SQL: Final[dict[str, str]] = {}  # per dialect name


def _transition_many_sql(dialect: Dialect) -> str:
    sql = _MANY_SQL.get(dialect.name)
    if sql is None:
        sql = _MANY_SQL[dialect.name] = (
            "UPDATE commands SET state = v_state,"
            f" sent_at = CASE WHEN v_state = '{CommandState.SENT.value}' THEN v_at ELSE sent_at END,"
            f" completed_at = CASE WHEN v_state IN ({_FINALS}) THEN v_at ELSE completed_at END,"
            " result = COALESCE(v_result, result), error = COALESCE(v_error, error)"
            f" FROM {dialect.rows_from(_MANY_COLUMNS)}"
            # `ids_in` as well as the join: the planner cannot count the parameter rows and
            # scanned the whole table for the join (2.9 ms a statement on PostgreSQL, measured).
            f" WHERE {dialect.ids_in('id')} AND id = v_id AND device_id = v_device"
            f" AND (v_state, state) IN (VALUES {_MOVES})"
            f" RETURNING {_COLUMNS}"
        )
    return sql


async def transition_many(
    tx: Tx, dialect: Dialect, moves: Sequence[tuple[str, str, CommandState, int, Any, Any]]
) -> dict[str, Command]:
    """`transition` of each (command_id, device_id, state, at_ms, result, error), all in one
    statement; the commands that moved, by id. The ids must differ (a command twice would
    be moved once, from whichever row the database picks)."""
    params: list[tuple[Any, ...]] = []
    for command_id, device_id, state, at_ms, result, error in moves:
        params.append(
            (
                command_id,
                device_id,
                state.value,
                at_ms,
                None if result is None else dumps(result),
                None if error is None else dumps(error),
            )
        )
    found = await tx.fetch(
        _transition_many_sql(dialect),
        *dialect.rows_params(params, len(_MANY_COLUMNS)),  # the FROM's, before the WHERE's
        dialect.ids_param(row[0] for row in params),
    )
    return {command.id: command for command in map(rows.command, found)}


@functools.cache
def _transition_sql(state: CommandState, with_result: bool, with_error: bool, owned: bool) -> str:
    """The UPDATE of `transition`, built once per shape (a handful exist)."""
    names = ["state"]
    if state is CommandState.SENT:
        names.append("sent_at")
    if state.final:
        names.append("completed_at")
    if with_result:
        names.append("result")
    if with_error:
        names.append("error")
    froms = ", ".join(f"'{s.value}'" for s in sorted(ALLOWED_FROM[state], key=lambda s: s.value))
    owner = " AND device_id = ?" if owned else ""
    return (
        f"UPDATE commands SET {', '.join(f'{n} = ?' for n in names)}"
        f" WHERE id = ? AND state IN ({froms}){owner} RETURNING {_COLUMNS}"
    )


async def pending(tx: Tx, device_id: str, now_ms: int) -> list[Command]:
    return await _all(
        tx,
        # The conditions of the partial indexes verbatim (schema.py), so that they apply;
        # `+expires_at`: not an index term, so SQLite takes ix_commands_pending (this
        # device) instead of ix_commands_due (every live command of the fleet).
        f"WHERE device_id = ? AND {COMMAND_PENDING} AND +expires_at > ? ORDER BY issued_at, id",
        device_id,
        now_ms,
    )


async def devices_with_pending(tx: Tx, now_ms: int) -> set[str]:
    found = await tx.fetch(
        f"SELECT DISTINCT device_id FROM commands WHERE {COMMAND_PENDING} AND +expires_at > ?", now_ms
    )
    return {row[0] for row in found}


async def of_device(
    tx: Tx, device_id: str, state: CommandState | None, limit: int, after: str | None
) -> list[Command]:
    where, args = "WHERE device_id = ?", [device_id]
    if state is not None:
        where += " AND state = ?"
        args.append(state.value)
    if after is not None:
        where += " AND id < ?"
        args.append(after)
    return await _all(tx, where + " ORDER BY id DESC LIMIT ?", *args, limit)


async def due(tx: Tx, now_ms: int, limit: int) -> list[Command]:
    return await _all(
        tx, f"WHERE {COMMAND_LIVE} AND expires_at <= ? ORDER BY expires_at, id LIMIT ?", now_ms, limit
    )
