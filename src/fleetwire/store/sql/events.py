"""The event log: `write` of a group of operations, history reads, trimming and purge.

The hot path uses a handful of statements per *group* of operations, not per operation:
one lock-and-read of the devices (PostgreSQL always, to lock rows in id order so that
concurrent nodes never deadlock; SQLite only when the group has status writes), one
UPDATE … RETURNING that hands out the seq numbers of every device in the group, one bulk
insert of events and one of telemetry records (executemany on SQLite, COPY on PostgreSQL),
and one upsert of the group's newest value per device and key.

Registry ops (rare: REST calls) split a group into runs of log ops: each registry op runs
its own statements at its place in the group and its event opens the next run, so every
op sees what the ops before it did. A group without registry ops is one run.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import replace
from typing import Any, Final, cast

import orjson

from fleetwire.domain.clock import format_ms
from fleetwire.domain.commands import Command
from fleetwire.domain.events import Event, RecordRun
from fleetwire.domain.telemetry import Record, Value
from fleetwire.store.base import (
    LOG_OPS,
    CreateCommand,
    CreateJob,
    DeleteDevice,
    DispatchExecution,
    EventWrite,
    JobOp,
    LogOp,
    PatchTwin,
    RegisterDevice,
    RegistryOp,
    SetJobState,
    StatusWrite,
    TelemetryWrite,
    TransitionCommand,
    UpdateDevice,
    WriteOp,
    WriteResult,
)
from fleetwire.store.rules import to_store, trim_step
from fleetwire.store.sql import commands as cmd
from fleetwire.store.sql import jobs, registry, twin
from fleetwire.store.sql import telemetry as tm
from fleetwire.store.sql.dialect import Dialect
from fleetwire.store.sql.driver import Tx
from fleetwire.store.sql.engine import dumps

COLUMNS: Final = ("device_id", "seq", "name", "at", "data")
_OF_ITS_COMMAND: Final = "(SELECT c.{column} FROM commands c WHERE c.id = job_executions.command_id)"
_KEEP_OUTCOME: Final = (
    "UPDATE job_executions SET"
    f" state = {_OF_ITS_COMMAND.format(column='state')},"
    f" error = COALESCE(error, {_OF_ITS_COMMAND.format(column='error')}),"
    f" updated_at = {_OF_ITS_COMMAND.format(column='completed_at')}"
    " WHERE state = 'dispatched' AND command_id IN"
    " (SELECT id FROM commands WHERE job_id IS NOT NULL AND {purged})"
)


async def write(tx: Tx, dialect: Dialect, ops: Sequence[WriteOp], history: int) -> list[WriteResult]:
    """Apply `ops` inside the caller's write transaction; one result per op, in order."""
    results = [WriteResult() for _ in ops]
    if all(type(op) in LOG_OPS for op in ops):  # the ingest hot path: one run
        await _write_log(tx, dialect, cast("Sequence[LogOp]", ops), results, history)
        return results
    # `locked`: the devices that exist, with their status, as read by the up-front lock and
    # good until a statement changes them (a registry op, a run's status writes); meanwhile it
    # answers a create's existence check and the first run's lock (a statement per create
    # and one per group fewer on PostgreSQL, issue 12).
    locked: dict[str, str | None] | None = None
    if dialect.locks_every_device:
        # Every device of the group, up front and in id order (see _write_log): the registry
        # statements would otherwise lock rows in op order and could deadlock another node.
        locked = await dialect.lock_devices(tx, {d for op in ops if (d := device_of(op)) is not None})
    # `exists`: the devices known to exist, good as long as `locked` is; without a lock
    # (SQLite) the devices of several creates are read in one statement, not one each.
    exists: Container[str] | None = locked
    if exists is None:
        creating = [op.command.device_id for op in ops if type(op) is CreateCommand]
        if len(creating) > 1:
            exists = await dialect.lock_devices(tx, creating)
    commands = _Commands()
    run_ops: list[LogOp | None] = []  # None: the event of a transition not yet run
    run_results: list[WriteResult] = []
    for op, result in zip(ops, results, strict=True):
        if type(op) in LOG_OPS:
            run_ops.append(cast("LogOp", op))
            run_results.append(result)
            continue
        job_op = type(op) is CreateJob or type(op) is DispatchExecution or type(op) is SetJobState
        command_op = type(op) is CreateCommand or type(op) is TransitionCommand
        # A job or command op reads no seq, and nothing a log op could change (a device's
        # existence, a command, a job): the run goes on, so a rollout step of 500 executions
        # numbers its 500 events in one run, and a group of commands and results one too.
        if run_ops and not (job_op or command_op):
            await commands.run(tx, dialect, run_ops)
            await _write_log(tx, dialect, *_with_events(run_ops, run_results), history, locked)
            run_ops, run_results, locked, exists = [], [], None, None
        follow: EventWrite | None
        if type(op) is CreateCommand:
            follow = await commands.create(tx, dialect, op, result, exists, run_ops)
        elif type(op) is TransitionCommand:
            await commands.move(tx, dialect, op, result, run_ops)
            run_ops.append(None)
            run_results.append(result)
            continue
        else:
            await commands.run(tx, dialect, run_ops)  # what follows may read the commands
            if job_op:
                follow = await jobs.write_op(tx, cast("JobOp", op), result)
            elif type(op) is PatchTwin:
                follow = await twin.patch(tx, op, result)
            else:
                follow = await _write_registry(tx, cast("RegistryOp", op), result)
                locked = exists = None
        if follow is not None:  # its event: numbered by the next run like any other
            run_ops.append(follow)
            run_results.append(result)
    await commands.run(tx, dialect, run_ops)
    if run_ops:
        await _write_log(tx, dialect, *_with_events(run_ops, run_results), history, locked)
    for op, result in zip(ops, results, strict=True):
        if type(op) is not DeleteDevice and result.device is not None and result.events:
            result.device = replace(result.device, seq=result.events[-1].seq)
    return results


def device_of(op: WriteOp) -> str | None:
    """The id of the device an op writes to (None: a job op that writes to none)."""
    if isinstance(op, RegisterDevice):
        return op.device.id
    if isinstance(op, CreateCommand):
        return op.command.device_id
    if isinstance(op, DispatchExecution):
        return None if op.command is None else op.command.device_id
    if isinstance(op, CreateJob | SetJobState):
        return None
    return op.device_id


class _Commands:
    """The command ops of a run whose statements are put off so that they go together: the
    creates as one executemany INSERT, the transitions as one UPDATE (issue 12: on
    PostgreSQL each cost a round trip). A transition's event keeps its place in the run (a
    None there until the batch has run). The batch runs before a second op on a command in
    it, before anything that may read the commands, and before the run is written."""

    __slots__ = ("_ids", "_inserts", "_moves")

    def __init__(self) -> None:
        self._inserts: list[Command] = []
        self._moves: list[tuple[int, TransitionCommand, WriteResult]] = []  # (place in the run, …)
        self._ids: set[str] = set()

    async def create(
        self,
        tx: Tx,
        dialect: Dialect,
        op: CreateCommand,
        result: WriteResult,
        exists: Container[str] | None,
        run_ops: list[LogOp | None],
    ) -> EventWrite | None:
        """`exists`: the devices known to exist (None: ask)."""
        command = op.command
        # Checked first: a failed insert would abort the transaction on PostgreSQL.
        if exists is not None:
            found = command.device_id in exists
        else:
            found = await tx.fetchrow("SELECT 1 FROM devices WHERE id = ?", command.device_id) is not None
        if not found:
            result.missing = True
            return None
        if command.id in self._ids:
            await self.run(tx, dialect, run_ops)
        self._inserts.append(command)
        self._ids.add(command.id)
        result.command = command
        return EventWrite(command.device_id, "command.updated", command.issued_at_ms, command.event_data())

    async def move(
        self,
        tx: Tx,
        dialect: Dialect,
        op: TransitionCommand,
        result: WriteResult,
        run_ops: list[LogOp | None],
    ) -> None:
        """Queue the transition; its event goes where the run is now (`len(run_ops)`)."""
        if op.command_id in self._ids:
            await self.run(tx, dialect, run_ops)
        self._moves.append((len(run_ops), op, result))
        self._ids.add(op.command_id)

    async def run(self, tx: Tx, dialect: Dialect, run_ops: list[LogOp | None]) -> None:
        """The statements of the batch; each transition that moved puts its event in its place."""
        if self._inserts:
            await cmd.insert_many(tx, self._inserts)
        moves = self._moves
        # One transition alone takes the plain UPDATE by id: on SQLite it costs half the
        # UPDATE … FROM json_each of transition_many (51 against 98 µs, measured), and most
        # SQLite groups hold one.
        if len(moves) == 1:
            _, op, _ = moves[0]
            one = await cmd.transition(
                tx, op.command_id, op.state, op.at_ms, op.result, op.error, op.device_id
            )
            moved = {} if one is None else {one.id: one}
        elif moves:
            moved = await cmd.transition_many(
                tx,
                dialect,
                [
                    (op.command_id, op.device_id, op.state, op.at_ms, op.result, op.error)
                    for _, op, _ in moves
                ],
            )
        else:
            moved = {}
        for place, op, result in moves:
            command = moved.get(op.command_id)
            if command is not None:
                result.command = command
                run_ops[place] = EventWrite(
                    command.device_id, "command.updated", op.at_ms, command.event_data()
                )
        self._inserts, self._moves, self._ids = [], [], set()


async def _write_registry(tx: Tx, op: RegistryOp, result: WriteResult) -> EventWrite | None:
    """Run one registry op's statements; the event to number next, if it records one."""
    if type(op) is RegisterDevice:
        stored = to_store(op.device, op.at_ms)
        if not await registry.insert(tx, stored):
            result.duplicate = True
            return None
        result.device = stored
        return EventWrite(stored.id, "device.registered", op.at_ms, stored.public())
    if type(op) is UpdateDevice:
        values = registry.change_values(op.changes)
        device = (
            await registry.update(tx, op.device_id, values, op.at_ms)
            if values
            else await registry.get(tx, op.device_id)
        )
        if device is None:
            result.missing = True
            return None
        result.device = device
        return EventWrite(device.id, "device.updated", op.at_ms, device.public()) if values else None
    assert type(op) is DeleteDevice
    deleted = await registry.delete(tx, op.device_id)
    if deleted is None:
        result.missing = True
        return None
    result.device = deleted
    # Published (the writer hands it on in commit order) but not kept: the history is gone.
    result.events.append(Event(deleted.id, deleted.seq + 1, "device.deleted", op.at_ms, deleted.public()))
    return None


def _with_events(
    run_ops: Sequence[LogOp | None], run_results: Sequence[WriteResult]
) -> tuple[list[LogOp], list[WriteResult]]:
    """The run without the transitions that did not move (their None: no event)."""
    ops: list[LogOp] = []
    results: list[WriteResult] = []
    for op, result in zip(run_ops, run_results, strict=True):
        if op is not None:
            ops.append(op)
            results.append(result)
    return ops, results


async def _write_log(
    tx: Tx,
    dialect: Dialect,
    ops: Sequence[LogOp],
    results: Sequence[WriteResult],
    history: int,
    locked: dict[str, str | None] | None = None,
) -> None:
    """One run of log ops: a handful of statements whatever its length (module docstring).
    `locked`: the group's devices as its up-front lock found them, still current (the lock
    is not taken again)."""
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
        if locked is not None:
            known = locked
        else:
            known = await dialect.lock_devices(tx, counts.keys() if lock_all else status_devices)
        for device_id in [d for d in counts if d not in known and (lock_all or d in status_devices)]:
            del counts[device_id]  # missing: nothing of it is written
        status_now = {d: known[d] for d in status_devices if d in known}
        current = dict(status_now)
        for op in ops:
            if type(op) is StatusWrite and op.device_id in current and current[op.device_id] != op.status:
                counts[op.device_id] += 1
                current[op.device_id] = op.status
                final_status[op.device_id] = (op.status, op.at_ms)
    last = await dialect.advance(tx, counts, final_status) if counts else {}

    # Hand out seqs in op order and build the rows and events.
    next_seq = {d: last[d] - counts[d] for d in last}
    event_rows: list[tuple[Any, ...]] = []
    records: list[tuple[Any, ...]] = []
    newest: dict[tuple[str, str], tuple[int, int, Value]] = {}
    encode = tm.encode  # local names in the per-record loop
    add_record = records.append
    for op, result in zip(ops, results, strict=True):
        device_id = op.device_id
        seq = next_seq.get(device_id)
        if seq is None:
            result.missing = True
            continue
        if type(op) is TelemetryWrite:
            first, last_ts, ordered = seq, -(1 << 63), True
            for record in op.records:
                seq += 1
                ts = record.ts_ms
                add_record((device_id, seq, ts, encode(record.values)))
                ordered = ordered and ts >= last_ts
                last_ts = ts
            if op.records:  # made into Events only for a reader (RecordRun)
                result.records = RecordRun(device_id, first, op.records)
            _keep_newest(newest, device_id, op.records, first, ordered)
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
        await tx.copy("events", COLUMNS, event_rows)
    if records:
        await tx.copy("telemetry", tm.COLUMNS, records)
        await tm.write_latest(tx, newest)
    # Amortised O(1) per event, in small steps: trim a device whenever its seq crosses a
    # multiple of trim_step (rules.py says why not of `history`).
    step = trim_step(history)
    crossed = [d for d, seq in last.items() if (seq - counts[d]) // step != seq // step]
    if crossed:
        await trim(tx, crossed, history)


def _keep_newest(
    newest: dict[tuple[str, str], tuple[int, int, Value]],
    device_id: str,
    records: Sequence[Record],
    first_seq: int,
    ordered: bool,
) -> None:
    """Each key's newest point of `records` (seqs first_seq + 1, …) into `newest`, where the
    greater (ts, seq) wins (a tie goes to the later seq). Records in time order, as a batch
    usually is: a key's newest is its last record, found walking back, and a record whose
    keys were all seen costs one set test, not a comparison per key (measured on batch ingest
    with 4 keys per record: the per-key loop was a quarter of the writer thread's CPU)."""
    if ordered:
        seen: set[str] = set()
        seq = first_seq + len(records)
        for record in reversed(records):
            values = record.values
            if not seen.issuperset(values):
                ts = record.ts_ms
                for key, value in values.items():
                    if key not in seen:
                        seen.add(key)
                        held = newest.get((device_id, key))  # from an earlier op of the group
                        if held is None or ts >= held[0]:
                            newest[(device_id, key)] = (ts, seq, value)
            seq -= 1
        return
    seq = first_seq
    for record in records:
        seq += 1
        ts = record.ts_ms
        for key, value in record.values.items():
            held = newest.get((device_id, key))
            if held is None or ts >= held[0]:
                newest[(device_id, key)] = (ts, seq, value)


_TRIM: Final = (
    "DELETE FROM events WHERE device_id = ? AND seq <= "
    "(SELECT seq FROM events WHERE device_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)"
)


async def trim(tx: Tx, device_ids: Iterable[str], keep: int) -> None:
    """Delete all but the newest `keep` events of these devices.

    Per device, by key range: the (keep+1)-th newest seq is an index walk of `keep` entries,
    and what goes is one contiguous range of the primary key (none when there are fewer).
    The ranked delete it replaces, `(device_id, seq) IN (row_number() … > keep)`, scanned the
    whole events table on SQLite: 5-25 ms per trim with 10 devices (measured, issue 12).
    """
    await tx.executemany(_TRIM, [(d, d, keep) for d in sorted(device_ids)])


async def history(tx: Tx, device_id: str, after_seq: int, limit: int) -> list[Event]:
    """Stored events and telemetry records merged by seq (`tx` must read one snapshot)."""
    if limit <= 0:
        return []
    stored = await tx.fetch(
        "SELECT seq, name, at, data FROM events WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        device_id,
        after_seq,
        limit,
    )
    records = await tx.fetch(
        "SELECT seq, ts, data FROM telemetry WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        device_id,
        after_seq,
        limit,
    )
    loads = orjson.loads
    merged = [Event(device_id, seq, name, at, loads(data)) for seq, name, at, data in stored]
    decode = tm.decode
    merged += (
        Event(device_id, seq, "device.telemetry", ts, {"ts": format_ms(ts), "values": decode(data)})
        for seq, ts, data in records
    )
    merged.sort(key=lambda e: e.seq)
    return merged[:limit]


async def purge_chunk(
    tx: Tx, dialect: Dialect, after: str, chunk: int, telemetry_before_ms: int, history: int
) -> str | None:
    """Purge the next `chunk` devices by id after `after`; the last id, None when done."""
    found = await tx.fetch("SELECT id FROM devices WHERE id > ? ORDER BY id LIMIT ?", after, chunk)
    if not found:
        return None
    ids = [row[0] for row in found]
    in_ids, param = dialect.ids_in("device_id"), dialect.ids_param(ids)
    # A key whose newest point goes has no point left: the latest row goes with it.
    for table in ("telemetry", "telemetry_latest"):
        await tx.execute(f"DELETE FROM {table} WHERE {in_ids} AND ts < ?", param, telemetry_before_ms)
    await trim(tx, ids, max(history, 0))
    # Final commands live as long as telemetry (issue 13.17); non-final ones are never purged.
    purged = f"{in_ids} AND completed_at IS NOT NULL AND completed_at < ?"
    # A job execution reads its state from its command once dispatched (store/sql/jobs.py):
    # it keeps the command's final state, time and error (not its result) from here on, or it
    # would read `canceled` once the command is gone.
    await tx.execute(_KEEP_OUTCOME.format(purged=purged), param, telemetry_before_ms)
    await tx.execute(f"DELETE FROM commands WHERE {purged}", param, telemetry_before_ms)
    last: str = ids[-1]
    return last
