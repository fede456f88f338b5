"""The event log: `write` of a group of operations, history reads, trimming and purge.

The hot path uses a handful of statements per *group* of operations, not per operation:
one lock-and-read of the devices (PostgreSQL always, to lock rows in id order so that
concurrent nodes never deadlock; SQLite only when the group has status writes), one
UPDATE … RETURNING that hands out the seq numbers of every device in the group, one bulk
insert of events and one of telemetry rows (executemany on SQLite, COPY on PostgreSQL).

Registry ops (rare: REST calls) split a group into runs of log ops: each registry op runs
its own statements at its place in the group and its event opens the next run, so every
op sees what the ops before it did. A group without registry ops is one run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, Final, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from fleetwire.domain.clock import format_ms
from fleetwire.domain.events import Event
from fleetwire.domain.telemetry import Value
from fleetwire.store.base import (
    CommandOp,
    CreateCommand,
    DeleteDevice,
    EventWrite,
    PatchTwin,
    RegisterDevice,
    RegistryOp,
    StatusWrite,
    TelemetryWrite,
    TransitionCommand,
    UpdateDevice,
    WriteOp,
    WriteResult,
)
from fleetwire.store.rules import to_store
from fleetwire.store.schema import commands, devices, events, telemetry
from fleetwire.store.sql import commands as cmd
from fleetwire.store.sql import registry, twin
from fleetwire.store.sql import telemetry as tm
from fleetwire.store.sql.dialect import Dialect
from fleetwire.store.sql.engine import dumps
from fleetwire.store.sql.rows import AnyRow
from fleetwire.store.sql.rows import command as command_of_row

COLUMNS: Final = ("device_id", "seq", "name", "at", "data")
LogOp = EventWrite | TelemetryWrite | StatusWrite
_LOG_OPS: Final = (EventWrite, TelemetryWrite, StatusWrite)


async def write(
    conn: AsyncConnection, dialect: Dialect, ops: Sequence[WriteOp], history: int
) -> list[WriteResult]:
    """Apply `ops` inside the caller's write transaction; one result per op, in order."""
    results = [WriteResult() for _ in ops]
    if all(type(op) in _LOG_OPS for op in ops):  # the ingest hot path: one run
        await _write_log(conn, dialect, cast("Sequence[LogOp]", ops), results, history)
        return results
    if dialect.locks_every_device:
        # Every device of the group, up front and in id order (see _write_log): the registry
        # statements would otherwise lock rows in op order and could deadlock another node.
        await dialect.lock_devices(conn, {device_of(op) for op in ops})
    run_ops: list[LogOp] = []
    run_results: list[WriteResult] = []
    for op, result in zip(ops, results, strict=True):
        if type(op) is EventWrite or type(op) is TelemetryWrite or type(op) is StatusWrite:
            run_ops.append(op)
            run_results.append(result)
            continue
        if run_ops:
            await _write_log(conn, dialect, run_ops, run_results, history)
            run_ops, run_results = [], []
        if type(op) is CreateCommand or type(op) is TransitionCommand:
            follow = await _write_command(conn, op, result)
        elif type(op) is PatchTwin:
            follow = await twin.patch(conn, op, result)
        else:
            follow = await _write_registry(conn, dialect, cast("RegistryOp", op), result)
        if follow is not None:  # its event: numbered by the next run like any other
            run_ops.append(follow)
            run_results.append(result)
    if run_ops:
        await _write_log(conn, dialect, run_ops, run_results, history)
    for op, result in zip(ops, results, strict=True):
        if type(op) is not DeleteDevice and result.device is not None and result.events:
            result.device = replace(result.device, seq=result.events[-1].seq)
    return results


def device_of(op: WriteOp) -> str:
    """The id of the device an op writes to."""
    if isinstance(op, RegisterDevice):
        return op.device.id
    if isinstance(op, CreateCommand):
        return op.command.device_id
    return op.device_id


async def _write_command(conn: AsyncConnection, op: CommandOp, result: WriteResult) -> EventWrite | None:
    """A command op's statement; its `command.updated` event to number next, if it moved."""
    if type(op) is CreateCommand:
        command = op.command
        found = await conn.execute(sa.select(devices.c.id).where(devices.c.id == command.device_id))
        if found.first() is None:  # checked first: a failed insert would abort the transaction
            result.missing = True
            return None
        await cmd.insert(conn, command)
        result.command = command
        return EventWrite(command.device_id, "command.updated", command.issued_at_ms, command.event_data())
    assert type(op) is TransitionCommand
    statement = cmd.transition(op.command_id, op.state, op.at_ms, op.result, op.error)
    row = None if statement is None else (await conn.execute(statement)).first()
    if row is None:
        return None
    moved = command_of_row(row)
    result.command = moved
    return EventWrite(moved.device_id, "command.updated", op.at_ms, moved.event_data())


async def _write_registry(
    conn: AsyncConnection, dialect: Dialect, op: RegistryOp, result: WriteResult
) -> EventWrite | None:
    """Run one registry op's statements; the event to number next, if it records one."""
    if type(op) is RegisterDevice:
        stored = to_store(op.device, op.at_ms)
        if not await registry.insert(conn, dialect, stored):
            result.duplicate = True
            return None
        result.device = stored
        return EventWrite(stored.id, "device.registered", op.at_ms, stored.public())
    if type(op) is UpdateDevice:
        values = registry.change_values(op.changes)
        device = (
            await registry.update(conn, op.device_id, values, op.at_ms)
            if values
            else await registry.get(conn, op.device_id)
        )
        if device is None:
            result.missing = True
            return None
        result.device = device
        return EventWrite(device.id, "device.updated", op.at_ms, device.public()) if values else None
    assert type(op) is DeleteDevice
    deleted = await registry.delete(conn, op.device_id)
    if deleted is None:
        result.missing = True
        return None
    result.device = deleted
    # Published (the writer hands it on in commit order) but not kept: the history is gone.
    result.events.append(Event(deleted.id, deleted.seq + 1, "device.deleted", op.at_ms, deleted.public()))
    return None


async def _write_log(
    conn: AsyncConnection,
    dialect: Dialect,
    ops: Sequence[LogOp],
    results: Sequence[WriteResult],
    history: int,
) -> None:
    """One run of log ops: a handful of statements whatever its length (module docstring)."""
    # Events per device before status writes are judged; device order = first appearance.
    counts: dict[str, int] = {}
    status_devices: set[str] = set()
    for op in ops:
        if type(op) is TelemetryWrite:
            counts[op.device_id] = counts.get(op.device_id, 0) + len(op.records)
        elif type(op) is EventWrite:
            counts[op.device_id] = counts.get(op.device_id, 0) + 1
        else:
            counts.setdefault(op.device_id, 0)
            status_devices.add(op.device_id)

    # Status writes need the stored status; PostgreSQL also locks every row, in id order, so
    # that two nodes writing overlapping groups cannot deadlock.
    lock_all = dialect.locks_every_device
    status_now: dict[str, str | None] = {}
    final_status: dict[str, tuple[str, int]] = {}
    if lock_all or status_devices:
        known = await dialect.lock_devices(conn, counts.keys() if lock_all else status_devices)
        for device_id in [d for d in counts if d not in known and (lock_all or d in status_devices)]:
            del counts[device_id]  # missing: nothing of it is written
        status_now = {d: known[d] for d in status_devices if d in known}
        current = dict(status_now)
        for op in ops:
            if type(op) is StatusWrite and op.device_id in current and current[op.device_id] != op.status:
                counts[op.device_id] += 1
                current[op.device_id] = op.status
                final_status[op.device_id] = (op.status, op.at_ms)
    last = await dialect.advance(conn, counts, final_status) if counts else {}

    # Hand out seqs in op order and build the rows and events.
    next_seq = {d: last[d] - counts[d] for d in last}
    event_rows: list[tuple[Any, ...]] = []
    telemetry_rows: list[tuple[Any, ...]] = []
    stamp = tm.Timestamps()
    add_rows = tm.rows  # a local name in the per-record loop
    for op, result in zip(ops, results, strict=True):
        device_id = op.device_id
        seq = next_seq.get(device_id)
        if seq is None:
            result.missing = True
            continue
        if type(op) is TelemetryWrite:
            out = result.events
            for record in op.records:
                seq += 1
                ts, values = record.ts_ms, record.values
                add_rows(device_id, seq, ts, values, telemetry_rows)
                # == record.event_data(), faster (see Timestamps)
                out.append(Event(device_id, seq, "device.telemetry", ts, {"ts": stamp(ts), "values": values}))
        elif type(op) is EventWrite:
            seq += 1
            event_rows.append((device_id, seq, op.name, op.at_ms, dumps(op.data)))
            result.events.append(Event(device_id, seq, op.name, op.at_ms, op.data))
        else:
            assert isinstance(op, StatusWrite)
            previous = status_now[device_id]
            if previous == op.status:
                continue
            seq += 1
            status_now[device_id] = op.status
            change = {"status": op.status, "previous_status": previous, "source": op.source}
            event_rows.append((device_id, seq, "device.status", op.at_ms, dumps(change)))
            result.events.append(Event(device_id, seq, "device.status", op.at_ms, change))
            result.changed = True
        next_seq[device_id] = seq

    if event_rows:
        await dialect.bulk_insert(conn, "events", COLUMNS, event_rows)
    if telemetry_rows:
        await dialect.bulk_insert(conn, "telemetry", tm.COLUMNS, telemetry_rows)
    # Amortised O(1) per event: trim a device whenever its seq crosses a multiple of history.
    crossed = [d for d, seq in last.items() if (seq - counts[d]) // history != seq // history]
    if crossed:
        await trim(conn, dialect, crossed, history)


async def trim(conn: AsyncConnection, dialect: Dialect, device_ids: Iterable[str], keep: int) -> None:
    """Delete all but the newest `keep` events of these devices."""
    ranked = (
        sa.select(
            events.c.device_id,
            events.c.seq,
            sa.func.row_number()
            .over(partition_by=events.c.device_id, order_by=events.c.seq.desc())
            .label("rn"),
        )
        .where(dialect.ids_in(events.c.device_id, device_ids))
        .subquery()
    )
    old = sa.select(ranked.c.device_id, ranked.c.seq).where(ranked.c.rn > keep)
    await conn.execute(events.delete().where(sa.tuple_(events.c.device_id, events.c.seq).in_(old)))


async def history(conn: AsyncConnection, device_id: str, after_seq: int, limit: int) -> list[Event]:
    """Stored events and telemetry records merged by seq (`conn` must read one snapshot)."""
    if limit <= 0:
        return []
    stored = (
        await conn.execute(
            sa.select(events.c.seq, events.c.name, events.c.at, events.c.data)
            .where(events.c.device_id == device_id, events.c.seq > after_seq)
            .order_by(events.c.seq)
            .limit(limit)
        )
    ).all()
    telemetry_seqs = (
        (
            await conn.execute(
                sa.select(telemetry.c.seq)
                .distinct()
                .where(telemetry.c.device_id == device_id, telemetry.c.seq > after_seq)
                .order_by(telemetry.c.seq)
                .limit(limit)
            )
        )
        .scalars()
        .all()
    )
    seqs = sorted({row.seq for row in stored}.union(telemetry_seqs))[:limit]
    if not seqs:
        return []
    highest = seqs[-1]
    rows: Sequence[AnyRow] = []
    if telemetry_seqs and telemetry_seqs[0] <= highest:
        rows = (
            await conn.execute(
                sa.select(
                    telemetry.c.seq,
                    telemetry.c.ts,
                    telemetry.c.key,
                    telemetry.c.kind,
                    telemetry.c.num,
                    telemetry.c.txt,
                )
                .where(
                    telemetry.c.device_id == device_id,
                    telemetry.c.seq > after_seq,
                    telemetry.c.seq <= highest,
                )
                .order_by(telemetry.c.seq, telemetry.c.key)
            )
        ).all()
    merged = [Event(device_id, row.seq, row.name, row.at, row.data) for row in stored if row.seq <= highest]
    grouped: dict[int, tuple[int, dict[str, Value]]] = {}
    for row in rows:
        entry = grouped.get(row.seq)
        if entry is None:
            entry = grouped[row.seq] = (row.ts, {})
        entry[1][row.key] = tm.value(row.kind, row.num, row.txt)
    for seq, (ts, values) in grouped.items():
        merged.append(Event(device_id, seq, "device.telemetry", ts, {"ts": format_ms(ts), "values": values}))
    merged.sort(key=lambda e: e.seq)
    return merged


async def purge_chunk(
    conn: AsyncConnection, dialect: Dialect, after: str, chunk: int, telemetry_before_ms: int, history: int
) -> str | None:
    """Purge the next `chunk` devices by id after `after`; the last id, None when done."""
    ids = (
        (
            await conn.execute(
                sa.select(devices.c.id).where(devices.c.id > after).order_by(devices.c.id).limit(chunk)
            )
        )
        .scalars()
        .all()
    )
    if not ids:
        return None
    await conn.execute(
        telemetry.delete().where(
            dialect.ids_in(telemetry.c.device_id, ids), telemetry.c.ts < telemetry_before_ms
        )
    )
    await trim(conn, dialect, ids, max(history, 0))
    # Final commands live as long as telemetry (issue 13.17); non-final ones are never purged.
    await conn.execute(
        commands.delete().where(
            dialect.ids_in(commands.c.device_id, ids),
            commands.c.completed_at.is_not(None),
            commands.c.completed_at < telemetry_before_ms,
        )
    )
    last: str = ids[-1]
    return last
