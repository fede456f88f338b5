"""MemoryStore: the whole Store seam in memory, for tests and a single process without a database.

The same contract as SqlStore (store.base), checked by the same suite (tests/contract):
per-device seq +1 per event, the history bounded the same amortised way, compare-and-set
command transitions, globs with fnmatchcase, the same page orders, and a write group that is
all or nothing.

Atomicity: `write` first prepares every op of the group (encodes its JSON, checks its values
and changes) and only then applies them, with no await in between, so an op that raises
leaves nothing of its group behind and no other task sees a group half applied.

Sharing: the data lives in a MemoryDatabase. Several MemoryStores on one database are what
several processes on one SQL database are (each with its own open/closed state); a store
made without one gets its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any, Final

import orjson

from fleetwire.domain.clock import format_ms, now_ms
from fleetwire.domain.commands import ALLOWED_FROM, Command, CommandState
from fleetwire.domain.devices import Device, DeviceChanges, DeviceFilter
from fleetwire.domain.events import Event, RecordRun
from fleetwire.domain.jobs import (
    STORED_CANCELED,
    STORED_DISPATCHED,
    STORED_PENDING,
    STORED_SKIPPED,
    Execution,
    ExecutionState,
    Job,
    JobState,
)
from fleetwire.domain.telemetry import Value
from fleetwire.domain.twin import Twin
from fleetwire.domain.twin import apply as apply_patch
from fleetwire.store.base import (
    LOG_OPS,
    CreateCommand,
    CreateJob,
    DeleteDevice,
    DispatchExecution,
    DuplicateError,
    EventWrite,
    PatchTwin,
    RegisterDevice,
    SetJobState,
    StatusWrite,
    Store,
    StoreUnavailableError,
    TelemetryPoint,
    TelemetryWrite,
    TransitionCommand,
    UpdateDevice,
    WriteOp,
    WriteResult,
)
from fleetwire.store.rules import check_changes, scalar, to_store, trim_step

_SCALARS: Final = (float, int, bool, str)
_NOT_FINAL: Final = frozenset({CommandState.PENDING, CommandState.SENT})


def _json(value: Any) -> Any:
    """A JSON value as a SQL JSON column gives it back: a fresh copy, encoded by orjson.

    Encoding on the way in also refuses what SqlStore refuses (a set, a 65-bit integer…).
    """
    return orjson.loads(orjson.dumps(value))


def _fresh_device(device: Device) -> Device:
    """A copy whose JSON fields the caller may change without changing the store."""
    return replace(
        device,
        metadata=_json(device.metadata),
        telemetry_schema=None if device.telemetry_schema is None else _json(device.telemetry_schema),
    )


def _fresh_command(command: Command) -> Command:
    return replace(
        command,
        params=_json(command.params),
        result=None if command.result is None else _json(command.result),
        error=None if command.error is None else _json(command.error),
        extra=_json(command.extra),
    )


@dataclass(slots=True)
class _Record:
    """One telemetry record as stored: one seq, one ts, its values."""

    seq: int
    ts: int
    values: dict[str, Value]


@dataclass(slots=True)
class _ExecutionRow:
    """One row of job_executions (see store/sql/jobs.py)."""

    device_id: str
    command_id: str
    state: str
    error: dict[str, Any] | None
    updated_at_ms: int


@dataclass(slots=True)
class MemoryDatabase:
    """What a SQL database holds: devices, event history, telemetry, commands."""

    devices: dict[str, Device] = field(default_factory=dict)
    history: dict[str, list[Event]] = field(default_factory=dict)  # non-telemetry, ascending seq
    telemetry: dict[str, list[_Record]] = field(default_factory=dict)  # in seq order
    commands: dict[str, Command] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    executions: dict[str, list[_ExecutionRow]] = field(default_factory=dict)  # by job, in order
    leases: dict[str, tuple[str | None, int]] = field(default_factory=dict)  # job: (holder, until)
    twins: dict[str, Twin] = field(default_factory=dict)

    def drop(self, device_id: str) -> Device | None:
        device = self.devices.pop(device_id, None)
        if device is not None:
            self.twins.pop(device_id, None)
            self.history.pop(device_id, None)
            self.telemetry.pop(device_id, None)
            for command_id in [c.id for c in self.commands.values() if c.device_id == device_id]:
                del self.commands[command_id]
        return device

    def trim(self, device_id: str, keep: int) -> None:
        events = self.history.get(device_id)
        if events is not None and len(events) > keep:
            self.history[device_id] = events[len(events) - keep :] if keep > 0 else []


# An op ready to apply: every value checked and encoded, so that applying it cannot fail.
_Prepared = tuple[WriteOp, Any]


class MemoryStore:
    """The Store in memory (see the module docstring and store.base for the contract).

    `history` bounds the event history per device as SqlStore does: a device's events are
    trimmed to the newest `history` whenever its seq crosses a multiple of
    `rules.trim_step(history)`.
    """

    def __init__(self, database: MemoryDatabase | None = None, *, history: int = 1000) -> None:
        if history < 1:
            raise ValueError("history must be at least 1")
        self.database = database if database is not None else MemoryDatabase()
        self._history = history
        self._open = False

    @property
    def dialect(self) -> str:
        return "memory"

    @property
    def concurrent_writes(self) -> bool:
        return False

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    async def ping(self) -> None:
        self._db()

    def _db(self) -> MemoryDatabase:
        if not self._open:
            raise StoreUnavailableError("the store is closed")
        return self.database

    async def _turn(self) -> MemoryDatabase:
        """Yield once, as every database round trip does, then the database if open."""
        await asyncio.sleep(0)
        return self._db()

    # -- registry ------------------------------------------------------------------------

    async def create_device(self, device: Device) -> Device:
        db = await self._turn()
        stored = to_store(device, now_ms())
        kept = _fresh_device(stored)  # encodes: refuses what the SQL JSON columns refuse
        if stored.id in db.devices:
            raise DuplicateError(f"device {device.id!r} exists already")
        db.devices[stored.id] = kept
        db.twins[stored.id] = Twin.empty(stored.id)
        return stored

    async def get_device(self, device_id: str) -> Device | None:
        device = (await self._turn()).devices.get(device_id)
        return None if device is None else _fresh_device(device)

    async def list_devices(self, where: DeviceFilter, limit: int, after: str | None = None) -> list[Device]:
        db = await self._turn()
        found: list[Device] = []
        for device_id in sorted(db.devices):  # code-point order, as the SQL C collation
            device = db.devices[device_id]
            if after is not None and device_id <= after:
                continue
            if where.status is not None and device.status != where.status:
                continue
            if where.type is not None and device.type != where.type:
                continue
            if where.tag is not None and where.tag not in device.tags:
                continue
            if where.only_ids is not None and device_id not in where.only_ids:
                continue
            if where.exclude_ids and device_id in where.exclude_ids:
                continue
            if where.patterns is not None and not any(fnmatchcase(device_id, p) for p in where.patterns):
                continue
            if len(found) >= limit:
                break
            found.append(_fresh_device(device))
        return found

    async def update_device(self, device_id: str, changes: DeviceChanges) -> Device | None:
        check_changes(changes)
        db = await self._turn()
        device = db.devices.get(device_id)
        if device is None:
            return None
        if changes:
            device = _changed(device, changes, now_ms())
            db.devices[device_id] = device
        return _fresh_device(device)

    async def delete_device(self, device_id: str) -> Device | None:
        return (await self._turn()).drop(device_id)

    # -- event log -----------------------------------------------------------------------

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        db = await self._turn()
        prepared = [_prepare(op) for op in ops]  # may raise: nothing is applied yet
        new_ids = [op.command.id for op in ops if type(op) is CreateCommand]
        new_ids += [op.command.id for op in ops if type(op) is DispatchExecution and op.command is not None]
        if any(i in db.commands for i in new_ids) or len(set(new_ids)) != len(new_ids):
            raise DuplicateError("a command id exists already")  # as SQL's unique key: the whole group
        return _Group(db, self._history).apply(prepared)

    async def events(self, device_id: str, after_seq: int, limit: int) -> list[Event]:
        db = await self._turn()
        if limit <= 0:
            return []
        merged = [
            Event(e.device_id, e.seq, e.name, e.at_ms, _json(e.data))
            for e in db.history.get(device_id, ())
            if e.seq > after_seq
        ]
        merged += (
            Event(
                device_id, r.seq, "device.telemetry", r.ts, {"ts": format_ms(r.ts), "values": dict(r.values)}
            )
            for r in db.telemetry.get(device_id, ())
            if r.seq > after_seq
        )
        merged.sort(key=lambda e: e.seq)
        return merged[:limit]

    async def purge(self, telemetry_before_ms: int, history: int) -> None:
        db = await self._turn()
        for device_id, records in db.telemetry.items():
            db.telemetry[device_id] = [r for r in records if r.ts >= telemetry_before_ms]
        for device_id in list(db.history):
            db.trim(device_id, max(history, 0))
        purged = {  # final commands live as long as telemetry
            command.id
            for command in db.commands.values()
            if command.completed_at_ms is not None and command.completed_at_ms < telemetry_before_ms
        }
        for rows in db.executions.values():  # an execution keeps its command's outcome (events.py)
            for row in rows:
                if row.state == STORED_DISPATCHED and row.command_id in purged:
                    _keep_outcome(row, db.commands[row.command_id])
        for command_id in purged:
            del db.commands[command_id]

    # -- twin ----------------------------------------------------------------------------

    async def twin(self, device_id: str) -> Twin | None:
        twin = (await self._turn()).twins.get(device_id)
        return None if twin is None else _fresh_twin(twin)

    async def devices_with_delta(self) -> set[str]:
        db = await self._turn()
        return {device_id for device_id, twin in db.twins.items() if twin.delta}

    # -- telemetry -----------------------------------------------------------------------

    async def telemetry(
        self,
        device_id: str,
        *,
        key: str | None,
        from_ms: int | None,
        to_ms: int | None,
        limit: int,
        before: tuple[int, int, str] | None = None,
    ) -> list[TelemetryPoint]:
        """Points with from_ms <= ts <= to_ms (both inclusive), newest first by (ts, seq, key)."""
        db = await self._turn()
        if limit <= 0:
            return []
        found = [
            point
            for point in _points(db.telemetry.get(device_id, ()))
            if (key is None or point.key == key)
            and (from_ms is None or point.ts_ms >= from_ms)
            and (to_ms is None or point.ts_ms <= to_ms)
            and (before is None or (point.ts_ms, point.seq, point.key) < before)
        ]
        found.sort(key=lambda p: (p.ts_ms, p.seq, p.key), reverse=True)
        return found[:limit]

    async def latest_telemetry(self, device_id: str) -> dict[str, TelemetryPoint]:
        db = await self._turn()
        latest: dict[str, TelemetryPoint] = {}
        for point in _points(db.telemetry.get(device_id, ())):
            held = latest.get(point.key)
            if held is None or (point.ts_ms, point.seq) > (held.ts_ms, held.seq):
                latest[point.key] = point
        return latest

    # -- commands ------------------------------------------------------------------------

    async def create_command(self, command: Command) -> Command:
        """Insert; DuplicateError for an existing id, LookupError if the device is absent."""
        db = await self._turn()
        kept = _fresh_command(command)
        if command.id in db.commands:
            raise DuplicateError(f"command {command.id!r} exists already")
        if command.device_id not in db.devices:
            raise LookupError(f"device {command.device_id!r} does not exist")
        db.commands[command.id] = kept
        return command

    async def get_command(self, command_id: str) -> Command | None:
        command = (await self._turn()).commands.get(command_id)
        return None if command is None else _fresh_command(command)

    async def find_command(self, issuer: str, idempotency_key: str, since_ms: int) -> Command | None:
        db = await self._turn()
        matches = [
            c
            for c in db.commands.values()
            if c.issuer == issuer and c.idempotency_key == idempotency_key and c.issued_at_ms >= since_ms
        ]
        if not matches:
            return None
        return _fresh_command(max(matches, key=lambda c: (c.issued_at_ms, c.id)))

    async def transition_command(
        self,
        command_id: str,
        state: CommandState,
        at_ms: int,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> Command | None:
        db = await self._turn()
        changed = _moved(db.commands.get(command_id), state, at_ms, result, error)
        if changed is None:
            return None  # the compare of compare-and-set: no await between it and the set
        db.commands[command_id] = changed
        return _fresh_command(changed)

    async def pending_commands(self, device_id: str, now_ms: int) -> list[Command]:
        db = await self._turn()
        found = [
            c
            for c in db.commands.values()
            if c.device_id == device_id and c.state is CommandState.PENDING and c.expires_at_ms > now_ms
        ]
        return [_fresh_command(c) for c in sorted(found, key=lambda c: (c.issued_at_ms, c.id))]

    async def devices_with_pending(self, now_ms: int) -> set[str]:
        db = await self._turn()
        return {
            c.device_id
            for c in db.commands.values()
            if c.state is CommandState.PENDING and c.expires_at_ms > now_ms
        }

    async def list_commands(
        self, device_id: str, state: CommandState | None, limit: int, after: str | None = None
    ) -> list[Command]:
        db = await self._turn()
        found = [
            c
            for c in db.commands.values()
            if c.device_id == device_id
            and (state is None or c.state is state)
            and (after is None or c.id < after)
        ]
        found.sort(key=lambda c: c.id, reverse=True)
        return [_fresh_command(c) for c in found[: max(limit, 0)]]

    async def due_commands(self, now_ms: int, limit: int) -> list[Command]:
        db = await self._turn()
        found = [c for c in db.commands.values() if c.state in _NOT_FINAL and c.expires_at_ms <= now_ms]
        found.sort(key=lambda c: (c.expires_at_ms, c.id))
        return [_fresh_command(c) for c in found[: max(limit, 0)]]

    # -- jobs ------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        return (await self._turn()).jobs.get(job_id)

    async def list_jobs(self, limit: int, before: str | None = None) -> list[Job]:
        db = await self._turn()
        ids = sorted((j for j in db.jobs if before is None or j < before), reverse=True)
        return [db.jobs[j] for j in ids[: max(limit, 0)]]

    async def job_counts(self, job_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        db = await self._turn()
        out: dict[str, dict[str, int]] = {}
        for job_id in job_ids:
            by_state: dict[str, int] = {}
            for row in db.executions.get(job_id, ()):
                state = _count_state(db, row)
                by_state[state] = by_state.get(state, 0) + 1
            out[job_id] = by_state
        return out

    async def job_executions(
        self, job_id: str, state: ExecutionState | None, limit: int, after: int | None = None
    ) -> list[Execution]:
        db = await self._turn()
        found: list[Execution] = []
        for index, row in enumerate(db.executions.get(job_id, ())):
            if (after is not None and index <= after) or len(found) >= limit:
                continue
            execution = _execution(db, job_id, index, row)
            if state is None or execution.state is state:
                found.append(execution)
        return found

    async def job_progress(self, job_id: str) -> tuple[int, int]:
        db = await self._turn()
        undispatched = in_flight = 0
        for row in db.executions.get(job_id, ()):
            if row.state == STORED_PENDING:
                undispatched += 1
            elif row.state == STORED_DISPATCHED:
                command = db.commands.get(row.command_id)
                in_flight += command is not None and command.state in _NOT_FINAL
        return undispatched, in_flight

    async def next_executions(self, job_id: str, limit: int) -> list[Execution]:
        db = await self._turn()
        found = [
            Execution(job_id, i, row.device_id, row.command_id, ExecutionState.PENDING, row.updated_at_ms)
            for i, row in enumerate(db.executions.get(job_id, ()))
            if row.state == STORED_PENDING
        ]
        return found[: max(limit, 0)]

    async def take_job_lease(self, job_id: str, node: str, now_ms: int, until_ms: int) -> bool:
        db = await self._turn()
        job = db.jobs.get(job_id)
        if job is None or job.state.final:
            return False
        holder, until = db.leases.get(job_id, (None, 0))
        if holder != node and until > now_ms:
            return False
        db.leases[job_id] = (node, until_ms)
        return True

    async def release_job_lease(self, job_id: str, node: str) -> None:
        db = await self._turn()
        if db.leases.get(job_id, (None, 0))[0] == node:
            db.leases[job_id] = (None, 0)

    async def orphan_jobs(self, now_ms: int, limit: int) -> list[str]:
        db = await self._turn()
        found = [
            job_id
            for job_id in sorted(db.jobs)
            if not db.jobs[job_id].state.final and db.leases.get(job_id, (None, 0))[1] <= now_ms
        ]
        return found[: max(limit, 0)]


def _keep_outcome(row: _ExecutionRow, command: Command) -> None:
    row.state = command.state.value
    if row.error is None and command.error is not None:
        row.error = _json(command.error)
    row.updated_at_ms = command.completed_at_ms or row.updated_at_ms


def _count_state(db: MemoryDatabase, row: _ExecutionRow) -> str:
    """The state Store.job_counts counts an execution in."""
    if row.state != STORED_DISPATCHED:
        return row.state
    command = db.commands.get(row.command_id)
    if command is None:
        return STORED_CANCELED
    return "queued" if command.state is CommandState.PENDING else command.state.value


def _execution(db: MemoryDatabase, job_id: str, index: int, row: _ExecutionRow) -> Execution:
    command = db.commands.get(row.command_id) if row.state == STORED_DISPATCHED else None
    if row.state != STORED_DISPATCHED:
        state = ExecutionState(row.state)
    else:
        state = ExecutionState.CANCELED if command is None else ExecutionState(command.state.value)
    updated = row.updated_at_ms
    if command is not None:
        updated = command.completed_at_ms or command.sent_at_ms or updated
    return Execution(
        job_id=job_id,
        index=index,
        device_id=row.device_id,
        command_id=row.command_id,
        state=state,
        updated_at_ms=updated,
        result=None if command is None or command.result is None else _json(command.result),
        error=_json(row.error)
        if row.error is not None
        else (None if command is None or command.error is None else _json(command.error)),
    )


def _fresh_twin(twin: Twin) -> Twin:
    return replace(
        twin, desired=_json(twin.desired), reported=_json(twin.reported), metadata=_json(twin.metadata)
    )


def _points(records: Iterable[_Record]) -> Iterable[TelemetryPoint]:
    for record in records:
        for key, value in record.values.items():
            yield TelemetryPoint(key, record.ts, record.seq, value)


def _changed(device: Device, changes: DeviceChanges, at_ms: int) -> Device:
    """The device with `changes` applied (already checked and JSON-encoded) and updated_at."""
    fields: dict[str, Any] = {"updated_at_ms": at_ms}
    for name, value in changes.items():
        if name == "tags":
            fields["tags"] = tuple(value)
        elif name == "disabled":
            fields["disabled"] = bool(value)
        elif name in ("metadata", "telemetry_schema"):
            fields[name] = None if value is None else _json(value)
        else:
            fields[name] = value
    return replace(device, **fields)


def _moved(
    command: Command | None,
    state: CommandState,
    at_ms: int,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
) -> Command | None:
    """The command after a compare-and-set to `state`; None when its state does not allow it."""
    allowed = ALLOWED_FROM.get(state)
    if command is None or not allowed or command.state not in allowed:
        return None
    return replace(
        command,
        state=state,
        sent_at_ms=at_ms if state is CommandState.SENT else command.sent_at_ms,
        completed_at_ms=at_ms if state.final else command.completed_at_ms,
        result=command.result if result is None else _json(result),
        error=command.error if error is None else _json(error),
    )


def _prepare(op: WriteOp) -> _Prepared:
    """Check and encode one op; raises for what SqlStore would refuse (nothing applied)."""
    if type(op) is TelemetryWrite:
        records = []
        for record in op.records:
            values = record.values
            if not all(type(v) in _SCALARS for v in values.values()):
                values = {k: scalar(k, v) for k, v in values.items()}
            records.append((record.ts_ms, values))
        return op, records
    if type(op) is EventWrite:
        return op, _json(op.data)
    if type(op) is DispatchExecution:
        if op.command is not None:
            _fresh_command(op.command)  # encodes: refuses what the SQL JSON columns refuse
        return op, None if op.error is None else _json(op.error)
    if type(op) is CreateJob:
        _json(op.job.spec.stored())
        return op, None
    if type(op) is RegisterDevice:
        return op, _fresh_device(op.device)
    if type(op) is UpdateDevice:
        check_changes(op.changes)
        encoded = {
            k: (None if v is None else _json(v)) if k in ("metadata", "telemetry_schema") else v
            for k, v in op.changes.items()
        }
        return op, encoded
    if type(op) is PatchTwin:
        return op, _json(op.patch)
    return op, None


class _Group:
    """One write group applied to the database, op by op, with the SQL store's numbering.

    Like events.write in store/sql: registry ops split the group into runs, and a device's
    history is trimmed at the end of a run when its seq crossed a multiple of `trim_step`.
    """

    def __init__(self, db: MemoryDatabase, history: int) -> None:
        self._db = db
        self._history = history
        self._run_start: dict[str, int] = {}  # seq of each device when the run touched it

    def apply(self, prepared: list[_Prepared]) -> list[WriteResult]:
        results = []
        for op, data in prepared:
            result = WriteResult()
            if type(op) is RegisterDevice or type(op) is UpdateDevice or type(op) is DeleteDevice:
                self._end_run()
                self._registry(op, data, result)
            elif type(op) is CreateCommand or type(op) is TransitionCommand:
                self._command(op, result)
            elif type(op) is CreateJob or type(op) is DispatchExecution or type(op) is SetJobState:
                self._job(op, data, result)
            elif type(op) is PatchTwin:
                self._twin(op, data, result)
            else:
                self._log(op, data, result)
            results.append(result)
        self._end_run()
        return results

    def _end_run(self) -> None:
        history, step = self._history, trim_step(self._history)
        for device_id, start in self._run_start.items():
            device = self._db.devices.get(device_id)
            if device is not None and start // step != device.seq // step:
                self._db.trim(device_id, history)
        self._run_start = {}

    def _event(self, device_id: str, name: str, at_ms: int, data: dict[str, Any], kept: Any) -> Event:
        """Number one event (the device exists), keep `kept` as its data in the history."""
        device = self._db.devices[device_id]
        self._run_start.setdefault(device_id, device.seq)
        seq = device.seq + 1
        self._db.devices[device_id] = replace(device, seq=seq)
        self._db.history.setdefault(device_id, []).append(Event(device_id, seq, name, at_ms, kept))
        return Event(device_id, seq, name, at_ms, data)

    def _log(self, op: WriteOp, data: Any, result: WriteResult) -> None:
        assert isinstance(op, LOG_OPS)
        db = self._db
        device = db.devices.get(op.device_id)
        if device is None:
            result.missing = True
            return
        self._run_start.setdefault(op.device_id, device.seq)
        if type(op) is TelemetryWrite:
            kept = db.telemetry.setdefault(op.device_id, [])
            seq = device.seq
            for ts, values in data:
                seq += 1
                kept.append(_Record(seq, ts, values))
            if op.records:
                result.records = RecordRun(op.device_id, device.seq, op.records)
            db.devices[op.device_id] = replace(device, seq=seq)
        elif type(op) is EventWrite:
            result.events.append(self._event(op.device_id, op.name, op.at_ms, op.data, data))
        else:
            assert type(op) is StatusWrite
            if device.status == op.status:
                return
            change = {"status": op.status, "previous_status": device.status, "source": op.source}
            db.devices[op.device_id] = replace(device, status=op.status, status_at_ms=op.at_ms)
            result.events.append(self._event(op.device_id, "device.status", op.at_ms, change, _json(change)))
            result.changed = True

    def _command(self, op: CreateCommand | TransitionCommand, result: WriteResult) -> None:
        db = self._db
        if type(op) is CreateCommand:
            command = op.command
            if command.device_id not in db.devices:
                result.missing = True
                return
            db.commands[command.id] = _fresh_command(command)
            at_ms = command.issued_at_ms
        else:
            assert type(op) is TransitionCommand
            current = db.commands.get(op.command_id)
            if current is not None and current.device_id != op.device_id:
                return  # another device's command: not moved (TransitionCommand)
            moved = _moved(current, op.state, op.at_ms, op.result, op.error)
            if moved is None:
                return
            db.commands[op.command_id] = command = moved
            at_ms = op.at_ms
        result.command = _fresh_command(command)
        data = command.event_data()
        result.events.append(self._event(command.device_id, "command.updated", at_ms, data, _json(data)))

    def _job(self, op: CreateJob | DispatchExecution | SetJobState, data: Any, result: WriteResult) -> None:
        db = self._db
        if type(op) is CreateJob:
            job: Job | None = op.job
            assert job is not None
            db.jobs[job.id] = job
            db.leases[job.id] = (None, 0)
            at = job.created_at_ms
            db.executions[job.id] = [_ExecutionRow(d, c, STORED_PENDING, None, at) for d, c in op.executions]
            result.job = job
        elif type(op) is SetJobState:
            job = db.jobs.get(op.job_id)
            if job is None or job.state not in op.from_states:
                return
            job = replace(
                job,
                state=op.state,
                updated_at_ms=op.at_ms,
                finished_at_ms=op.at_ms if op.state.final else job.finished_at_ms,
            )
            db.jobs[job.id] = job
            if op.state in (JobState.ABORTED, JobState.CANCELED):
                for row in db.executions.get(job.id, ()):
                    if row.state == STORED_PENDING:
                        row.state, row.updated_at_ms = STORED_CANCELED, op.at_ms
            result.job = job
        else:
            assert type(op) is DispatchExecution
            rows = db.executions.get(op.job_id, [])
            owner = db.jobs.get(op.job_id)
            if owner is None or owner.state is not JobState.RUNNING:
                return  # paused or ended: nothing leaves after that committed
            if not 0 <= op.index < len(rows) or rows[op.index].state != STORED_PENDING:
                return  # not pending any more: never dispatched twice
            row = rows[op.index]
            result.applied = True
            row.updated_at_ms = op.at_ms
            command = op.command
            if command is None:
                row.state, row.error = STORED_SKIPPED, data
                return
            if command.device_id not in db.devices:
                row.state = STORED_CANCELED
                row.error = {"code": "not_found", "message": "the device was deleted"}
                result.missing = True
                return
            row.state = STORED_DISPATCHED
            self._command(CreateCommand(command), result)

    def _twin(self, op: PatchTwin, patch: dict[str, Any], result: WriteResult) -> None:
        db = self._db
        twin = db.twins.get(op.device_id)
        if twin is None:
            result.missing = True
            return
        outcome = apply_patch(twin, op.section, patch, op.at_ms, if_version=op.if_version, limits=op.limits)
        result.twin = _fresh_twin(outcome.twin)
        result.refused = outcome.refused
        if not outcome.changed:
            return
        db.twins[op.device_id] = _fresh_twin(outcome.twin)  # shares nothing with the event
        result.changed = True
        data = outcome.event_data(op.section, patch)
        result.events.append(self._event(op.device_id, "twin.updated", op.at_ms, data, _json(data)))

    def _registry(self, op: WriteOp, data: Any, result: WriteResult) -> None:
        db = self._db
        if type(op) is RegisterDevice:
            if op.device.id in db.devices:
                result.duplicate = True
                return
            stored = to_store(data, op.at_ms)
            db.devices[stored.id] = stored
            db.twins[stored.id] = Twin.empty(stored.id)
            public = stored.public()
            result.events.append(self._event(stored.id, "device.registered", op.at_ms, public, _json(public)))
            result.device = _fresh_device(db.devices[stored.id])
        elif type(op) is UpdateDevice:
            device = db.devices.get(op.device_id)
            if device is None:
                result.missing = True
                return
            if data:
                device = _changed(device, data, op.at_ms)
                db.devices[op.device_id] = device
                public = device.public()
                result.events.append(
                    self._event(device.id, "device.updated", op.at_ms, public, _json(public))
                )
            result.device = _fresh_device(db.devices[op.device_id])
        else:
            assert type(op) is DeleteDevice
            deleted = db.drop(op.device_id)
            if deleted is None:
                result.missing = True
                return
            result.device = deleted
            # Published by the writer but not kept: the history went with the device.
            result.events.append(
                Event(deleted.id, deleted.seq + 1, "device.deleted", op.at_ms, deleted.public())
            )


_: type[Store] = MemoryStore  # static conformance: mypy checks MemoryStore against the protocol
