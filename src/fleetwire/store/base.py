"""The Store seam: the registry, the numbered event log, telemetry and commands.

Contract of every implementation:
- `write` applies a group of operations in ONE transaction and returns one WriteResult per
  operation, in order. Each produced event gets the device's next `seq` (strictly +1 per
  device, also across processes sharing the database: the counter lives in the device row).
  Nothing of a group is visible or durable before `write` returns, and all of it is after.
- Operations apply in order: an op sees what the ops before it in the group did (a device
  registered earlier in the group exists, one deleted earlier is missing).
- An operation on a device that does not exist produces no event and changes nothing
  (WriteResult.missing); a RegisterDevice of an existing id writes nothing
  (WriteResult.duplicate); either way the rest of the group still commits.
- An operation that raises anything else (a bad value: TypeError, ValueError) fails the
  whole `write` call and nothing of the group is written; GroupWriter then isolates it.
- Registry ops (RegisterDevice, UpdateDevice, DeleteDevice) write the registry row and its
  event in the same transaction. `device.deleted` is returned but not kept: the device's
  history goes with it.
- Telemetry events are kept as the telemetry rows themselves (each row carries its seq);
  every other event is kept in the event history, at most `history` per device (`purge`).
- `transition_command` is a compare-and-set: it succeeds only from the states that
  domain.commands.ALLOWED_FROM permits, so exactly one of several racing nodes wins.
- PatchTwin is the only way a twin changes: the merge (domain.twin.apply) runs on the
  stored twin inside the transaction, under the device's row lock, and its `twin.updated`
  commits with it. An `if_version` mismatch or a result over the limits changes nothing
  (WriteResult.refused); a patch that changes nothing writes nothing and records no event.
  RegisterDevice (and create_device) create the device's empty twin (version 1); deleting
  the device deletes it.
- Errors reaching the database raise StoreUnavailableError (retryable) and change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from fleetwire.domain.commands import Command, CommandState
from fleetwire.domain.devices import Device, DeviceChanges, DeviceFilter
from fleetwire.domain.errors import FleetwireError
from fleetwire.domain.events import Event, RecordRun
from fleetwire.domain.jobs import Execution, ExecutionState, Job, JobState
from fleetwire.domain.telemetry import Record, Value
from fleetwire.domain.twin import DEFAULT_LIMITS, Section, Twin, TwinLimits


class StoreUnavailableError(Exception):
    """The database cannot be reached or refused the transaction; retry later."""


class DuplicateError(Exception):
    """A unique key (device id, command id) exists already."""


@dataclass(frozen=True, slots=True)
class EventWrite:
    """Record one event (presence, command.updated, registry)."""

    device_id: str
    name: str
    at_ms: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TelemetryWrite:
    """Store records; each becomes one `device.telemetry` event, handed over as ONE
    WriteResult.records (a RecordRun), not in WriteResult.events."""

    device_id: str
    records: Sequence[Record]


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """Set the device status; only a change produces `device.status`."""

    device_id: str
    status: str
    source: str  # "device" or "api"
    at_ms: int


@dataclass(frozen=True, slots=True)
class RegisterDevice:
    """Insert the device and its `device.registered` event.

    created_at 0 means `at_ms`, updated_at 0 means created_at. The event's data is the
    stored device's public() as inserted (its seq the one before the event, as REST showed
    it); WriteResult.device is the stored device with the event's seq.
    """

    device: Device
    at_ms: int


@dataclass(frozen=True, slots=True)
class UpdateDevice:
    """Apply `changes` (never status or seq), set updated_at = at_ms, record `device.updated`.

    The event's data is the updated device's public() (seq the one before the event);
    WriteResult.device is the updated device with the event's seq. Empty changes change
    nothing and produce no event (WriteResult.device is the device as stored).
    """

    device_id: str
    changes: DeviceChanges
    at_ms: int


@dataclass(frozen=True, slots=True)
class DeleteDevice:
    """Delete the device with its history, telemetry and commands.

    WriteResult.events holds the `device.deleted` event (seq = the device's seq + 1, data =
    its public() as it was), for publication; it is not kept. WriteResult.device is the
    device as it was.
    """

    device_id: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class CreateCommand:
    """Insert the command and its first `command.updated` event (its state) in one
    transaction; WriteResult.command is the stored command, `missing` if the device is not."""

    command: Command


@dataclass(frozen=True, slots=True)
class TransitionCommand:
    """Compare-and-set a command to `state` (as `Store.transition_command`) and record its
    `command.updated` in the same transaction; WriteResult.command is None (and no event)
    when the current state does not allow the move, or the command is not `device_id`'s (so a
    device's result needs no read first to prove the command is its own)."""

    device_id: str
    command_id: str
    state: CommandState
    at_ms: int
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CreateJob:
    """Insert the job and every execution (state pending, in rollout order) in one
    transaction. `executions` are (device_id, command_id) pairs; WriteResult.job is the job."""

    job: Job
    executions: Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class DispatchExecution:
    """Compare-and-set one execution out of `pending`. With `command` (its id the
    execution's command_id, its job_id the job): to dispatched, inserting the command and its
    first `command.updated` as CreateCommand does; WriteResult.command is the command. Without
    one: to skipped with `error`. Nothing is written (WriteResult.command None, applied
    False) when the execution is no longer pending (no execution is ever dispatched twice)
    or the job is not running (nothing leaves after a pause or a cancel has committed).
    A command for a device that is gone ends the execution canceled (WriteResult.missing)."""

    job_id: str
    index: int
    at_ms: int
    command: Command | None = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SetJobState:
    """Compare-and-set the job to `state` from one of `from_states` (updated_at = at_ms;
    a final state sets finished_at). Aborted and canceled also end every execution still
    pending `canceled`, in the same transaction. WriteResult.job is the job after the op,
    None when its state did not allow the move."""

    job_id: str
    state: JobState
    from_states: frozenset[JobState]
    at_ms: int


JobOp = CreateJob | DispatchExecution | SetJobState


@dataclass(frozen=True, slots=True)
class PatchTwin:
    """Merge `patch` (RFC 7396, checked by domain.twin.check_patch) into one section of the
    device's twin and record `twin.updated` in the same transaction (module docstring).

    WriteResult.twin is the twin after the op (as stored when nothing changed or it was
    refused), `changed` whether the version moved, `refused` the conflict / limit error."""

    device_id: str
    section: Section
    patch: dict[str, Any]
    at_ms: int
    if_version: int | None = None
    limits: TwinLimits = DEFAULT_LIMITS


WriteOp = (
    EventWrite
    | TelemetryWrite
    | StatusWrite
    | RegisterDevice
    | UpdateDevice
    | DeleteDevice
    | CreateCommand
    | TransitionCommand
    | CreateJob
    | DispatchExecution
    | SetJobState
    | PatchTwin
)
RegistryOp = RegisterDevice | UpdateDevice | DeleteDevice
CommandOp = CreateCommand | TransitionCommand
# The ops of the ingest hot path: each appends to one device's log and nothing else, so a
# group of them needs no registry statement (store) and may overlap other groups (GroupWriter).
LogOp = EventWrite | TelemetryWrite | StatusWrite
LOG_OPS: Final = (EventWrite, TelemetryWrite, StatusWrite)


@dataclass(slots=True)
class WriteResult:
    events: list[Event] = field(default_factory=list)
    records: RecordRun | None = None  # TelemetryWrite: its record events, as one run
    missing: bool = False  # the device does not exist; nothing was written
    changed: bool = False  # StatusWrite: the status differed from the stored one
    duplicate: bool = False  # RegisterDevice: the id exists already; nothing was written
    device: Device | None = None  # registry ops: the device as stored (DeleteDevice: as it was)
    command: Command | None = None  # command ops: the command as stored after the op
    job: Job | None = None  # job ops: the job as stored after the op
    applied: bool = False  # DispatchExecution: the execution moved out of pending
    twin: Twin | None = None  # PatchTwin: the twin after the op
    refused: FleetwireError | None = None  # PatchTwin: conflict or over a limit; nothing changed


@dataclass(frozen=True, slots=True)
class TelemetryPoint:
    key: str
    ts_ms: int
    seq: int
    value: Value


class Store(Protocol):
    @property
    def concurrent_writes(self) -> bool:
        """Several `write` transactions run at once, each on its own connection (PostgreSQL);
        False where writes take turns (SQLite's one writer, memory). The GroupWriter lets
        small command groups overlap only then (events/writer.py)."""

    async def open(self) -> None:
        """Connect and bring the schema up to date (Alembic)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreUnavailableError unless a trivial query succeeds."""

    # -- registry ------------------------------------------------------------------------
    # create/update/delete_device change the registry without an event; the registry ops of
    # `write` (RegisterDevice, UpdateDevice, DeleteDevice) do it with the event, atomically.
    async def create_device(self, device: Device) -> Device:
        """Insert; raise DuplicateError for an existing id. Returns the stored device."""

    async def get_device(self, device_id: str) -> Device | None: ...

    async def list_devices(self, where: DeviceFilter, limit: int, after: str | None = None) -> list[Device]:
        """Devices ordered by id, ids greater than `after`; `where.patterns` are globs."""

    async def update_device(self, device_id: str, changes: DeviceChanges) -> Device | None:
        """Apply the given fields (never status, never seq); None if the device is absent."""

    async def delete_device(self, device_id: str) -> Device | None:
        """Delete with its history, telemetry and commands; returns it as it was."""

    # -- event log -----------------------------------------------------------------------
    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """Apply the group in one transaction, in order; one result per op (module docstring)."""

    async def events(self, device_id: str, after_seq: int, limit: int) -> list[Event]:
        """History with seq > after_seq, ascending, telemetry events included."""

    async def purge(self, telemetry_before_ms: int, history: int) -> None:
        """Telemetry with ts before the cutoff, events beyond `history` per device, and final
        commands completed before the cutoff (pending and sent ones stay)."""

    # -- twin ----------------------------------------------------------------------------
    async def twin(self, device_id: str) -> Twin | None:
        """The device's twin; None if the device does not exist. Changed only by PatchTwin."""

    async def devices_with_delta(self) -> set[str]:
        """Ids of the devices whose twin has a non-empty delta (one query at start)."""

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
        """Newest first by (ts, seq, key); `before` is the last row of the previous page."""

    async def latest_telemetry(self, device_id: str) -> dict[str, TelemetryPoint]: ...

    # -- commands ------------------------------------------------------------------------
    async def create_command(self, command: Command) -> Command: ...

    async def get_command(self, command_id: str) -> Command | None: ...

    async def find_command(self, issuer: str, idempotency_key: str, since_ms: int) -> Command | None:
        """The newest command by this issuer with this key issued at or after since_ms."""

    async def transition_command(
        self,
        command_id: str,
        state: CommandState,
        at_ms: int,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> Command | None:
        """Compare-and-set to `state`; None when the current state does not allow it."""

    async def pending_commands(self, device_id: str, now_ms: int) -> list[Command]:
        """Pending, unexpired commands of a device, oldest first."""

    async def devices_with_pending(self, now_ms: int) -> set[str]:
        """Ids of the devices that have pending, unexpired commands (one query at start)."""

    async def list_commands(
        self, device_id: str, state: CommandState | None, limit: int, after: str | None = None
    ) -> list[Command]:
        """Newest first; `after` is the last command id of the previous page."""

    async def due_commands(self, now_ms: int, limit: int) -> list[Command]:
        """Non-final commands whose expires_at is at or before now."""

    # -- jobs (contract §7) --------------------------------------------------------------
    async def get_job(self, job_id: str) -> Job | None: ...

    async def list_jobs(self, limit: int, before: str | None = None) -> list[Job]:
        """Newest first (by id); `before` is the last job id of the previous page."""

    async def job_counts(self, job_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per job, executions per state: the ExecutionState names, except that a dispatched
        execution whose command is still pending counts as `queued` (the caller adds it to
        `pending`); one whose command is gone counts as `canceled`. Absent states are absent."""

    async def job_executions(
        self, job_id: str, state: ExecutionState | None, limit: int, after: int | None = None
    ) -> list[Execution]:
        """In rollout order; `after` is the last index of the previous page. Executions
        still pending in the job come first among pending ones (`state=pending` includes
        dispatched ones whose command is queued)."""

    async def job_progress(self, job_id: str) -> tuple[int, int]:
        """(executions not yet dispatched, executions in flight: dispatched with their command
        pending or sent): two index counts, cheap enough for every rollout step."""

    async def next_executions(self, job_id: str, limit: int) -> list[Execution]:
        """The executions not yet dispatched (stored state pending), in rollout order."""

    async def take_job_lease(self, job_id: str, node: str, now_ms: int, until_ms: int) -> bool:
        """Compare-and-set: the node holds the lease of a running or paused job until
        `until_ms` if it holds it already or the lease ran out by `now_ms`."""

    async def release_job_lease(self, job_id: str, node: str) -> None:
        """Give the lease up now (if this node holds it), so another node may take it."""

    async def orphan_jobs(self, now_ms: int, limit: int) -> list[str]:
        """Ids of running or paused jobs whose lease ran out by `now_ms`, oldest first."""
