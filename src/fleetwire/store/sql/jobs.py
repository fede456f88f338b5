"""Fleet jobs (contract §7): statements on `jobs` and `job_executions`, in the caller's
transaction. Plain SQL text with `?` parameters (driver.Tx), the same on SQLite and
PostgreSQL: JSON goes in as orjson text and comes out as text.

An execution row keeps its own state until it is dispatched (`pending`, `skipped`,
`canceled`); a dispatched one hands its state over to its command (`commands.job_id`), so
a result or a timeout needs no second write: counts are one GROUP BY over the join.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import orjson

from fleetwire.domain.jobs import (
    STORED_CANCELED,
    STORED_DISPATCHED,
    STORED_SKIPPED,
    Execution,
    ExecutionState,
    Job,
    JobSpec,
    JobState,
)
from fleetwire.store.base import CreateJob, DispatchExecution, EventWrite, JobOp, SetJobState, WriteResult
from fleetwire.store.sql import commands as cmd
from fleetwire.store.sql.dialect import Dialect
from fleetwire.store.sql.driver import Row, Tx
from fleetwire.store.sql.engine import dumps
from fleetwire.store.sql.rows import json_or_none

_JOB_COLUMNS: Final = (
    "id, state, spec, issuer, claim, total, created_at, updated_at, finished_at, lease_holder, lease_until"
)
# The public state of an execution (see store.base.Store.job_counts).
_PUBLIC_STATE: Final = (
    "CASE WHEN e.state <> 'dispatched' THEN e.state WHEN c.state IS NULL THEN 'canceled' ELSE c.state END"
)
_COUNT_STATE: Final = (
    "CASE WHEN e.state <> 'dispatched' THEN e.state WHEN c.state IS NULL THEN 'canceled'"
    " WHEN c.state = 'pending' THEN 'queued' ELSE c.state END"
)

_INSERT_JOB: Final = f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, 0)"
_INSERT_EXECUTION: Final = (
    "INSERT INTO job_executions (job_id, idx, device_id, command_id, state, error, updated_at)"
    " VALUES (?, ?, ?, ?, 'pending', NULL, ?)"
)
# RETURNING: the driver API has no rowcount; no row back = not pending (or the job not running).
_MOVE_EXECUTION: Final = (
    "UPDATE job_executions SET state = ?, error = ?, updated_at = ?"
    " WHERE job_id = ? AND idx = ? AND state = 'pending'"
    " AND EXISTS (SELECT 1 FROM jobs WHERE id = ? AND state = 'running') RETURNING idx"
)
_DEVICE_EXISTS: Final = "SELECT 1 FROM devices WHERE id = ?"
_CANCEL_PENDING: Final = (
    "UPDATE job_executions SET state = 'canceled', updated_at = ? WHERE job_id = ? AND state = 'pending'"
)
_GET_JOB: Final = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?"
_LIST_JOBS: Final = f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?"
_LIST_JOBS_BEFORE: Final = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id < ? ORDER BY id DESC LIMIT ?"
_EXECUTIONS: Final = (
    f"SELECT e.idx, e.device_id, e.command_id, e.updated_at, e.error, {_PUBLIC_STATE},"
    " c.result, c.error, c.sent_at, c.completed_at"
    " FROM job_executions e LEFT JOIN commands c ON c.id = e.command_id"
    " WHERE e.job_id = ? AND e.idx > ?"
)
_ALL_EXECUTIONS: Final = _EXECUTIONS + " ORDER BY e.idx LIMIT ?"
_EXECUTIONS_IN: Final = _EXECUTIONS + f" AND {_PUBLIC_STATE} = ? ORDER BY e.idx LIMIT ?"
_NEXT: Final = (
    "SELECT idx, device_id, command_id, updated_at FROM job_executions"
    " WHERE job_id = ? AND state = 'pending' ORDER BY idx LIMIT ?"
)
_PROGRESS: Final = (
    "SELECT (SELECT COUNT(*) FROM job_executions WHERE job_id = ? AND state = 'pending'),"
    " (SELECT COUNT(*) FROM commands WHERE job_id = ? AND state IN ('pending', 'sent'))"
)
_TAKE_LEASE: Final = (
    "UPDATE jobs SET lease_holder = ?, lease_until = ?"
    " WHERE id = ? AND state IN ('running', 'paused') AND (lease_holder = ? OR lease_until <= ?)"
    " RETURNING id"
)
_RELEASE_LEASE: Final = (
    "UPDATE jobs SET lease_holder = NULL, lease_until = 0 WHERE id = ? AND lease_holder = ?"
)
_ORPHANS: Final = (
    "SELECT id FROM jobs WHERE state IN ('running', 'paused') AND lease_until <= ? ORDER BY id LIMIT ?"
)


def _job(row: Row) -> Job:
    """A row of `_JOB_COLUMNS`."""
    claim = row[4]
    return Job(
        id=row[0],
        state=JobState(row[1]),
        spec=JobSpec.from_stored(orjson.loads(row[2])),
        issuer=row[3],
        created_at_ms=row[6],
        updated_at_ms=row[7],
        total=row[5],
        finished_at_ms=row[8],
        claim=None if claim is None else tuple(orjson.loads(claim)),
    )


async def write_op(tx: Tx, op: JobOp, result: WriteResult) -> EventWrite | None:
    """One job op of a write group; the `command.updated` to number next, if it made one."""
    if type(op) is CreateJob:
        job = op.job
        await tx.execute(
            _INSERT_JOB,
            job.id,
            job.state.value,
            dumps(job.spec.stored()),
            job.issuer,
            None if job.claim is None else dumps(list(job.claim)),
            job.total,
            job.created_at_ms,
            job.updated_at_ms,
        )
        if op.executions:
            await tx.executemany(
                _INSERT_EXECUTION,
                [(job.id, i, d, c, job.created_at_ms) for i, (d, c) in enumerate(op.executions)],
            )
        result.job = job
        return None
    if type(op) is SetJobState:
        froms = sorted(s.value for s in op.from_states)
        row = await tx.fetchrow(
            "UPDATE jobs SET state = ?, updated_at = ?, finished_at = COALESCE(?, finished_at)"
            f" WHERE id = ? AND state IN ({','.join('?' * len(froms))}) RETURNING {_JOB_COLUMNS}",
            op.state.value,
            op.at_ms,
            op.at_ms if op.state.final else None,
            op.job_id,
            *froms,
        )
        if row is None:
            return None
        if op.state in (JobState.ABORTED, JobState.CANCELED):
            await tx.execute(_CANCEL_PENDING, op.at_ms, op.job_id)
        result.job = _job(row)
        return None
    assert type(op) is DispatchExecution
    command = op.command
    missing = command is not None and await tx.fetchrow(_DEVICE_EXISTS, command.device_id) is None
    if command is None or missing:
        state, error = STORED_SKIPPED, op.error
        if missing:
            state, error = STORED_CANCELED, {"code": "not_found", "message": "the device was deleted"}
    else:
        state, error = STORED_DISPATCHED, None
    moved = await tx.fetchrow(
        _MOVE_EXECUTION,
        state,
        None if error is None else dumps(error),
        op.at_ms,
        op.job_id,
        op.index,
        op.job_id,
    )
    if moved is None:  # not pending any more: never dispatched twice
        return None
    result.applied = True
    result.missing = missing
    if command is None or missing:
        return None
    await cmd.insert(tx, command)
    result.command = command
    return EventWrite(command.device_id, "command.updated", command.issued_at_ms, command.event_data())


async def get(tx: Tx, job_id: str) -> Job | None:
    row = await tx.fetchrow(_GET_JOB, job_id)
    return None if row is None else _job(row)


async def list_jobs(tx: Tx, limit: int, before: str | None) -> list[Job]:
    if before is None:
        found = await tx.fetch(_LIST_JOBS, limit)
    else:
        found = await tx.fetch(_LIST_JOBS_BEFORE, before, limit)
    return [_job(row) for row in found]


async def counts(tx: Tx, dialect: Dialect, job_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {j: {} for j in job_ids}
    if not job_ids:
        return out
    found = await tx.fetch(
        f"SELECT e.job_id, {_COUNT_STATE}, COUNT(*)"
        " FROM job_executions e LEFT JOIN commands c ON c.id = e.command_id"
        f" WHERE {dialect.ids_in('e.job_id')} GROUP BY e.job_id, {_COUNT_STATE}",
        dialect.ids_param(job_ids),
    )
    for job_id, state, n in found:
        out[job_id][state] = int(n)
    return out


async def executions(
    tx: Tx, job_id: str, state: ExecutionState | None, limit: int, after: int | None
) -> list[Execution]:
    after_idx = -1 if after is None else after
    if state is None:
        found = await tx.fetch(_ALL_EXECUTIONS, job_id, after_idx, limit)
    else:
        found = await tx.fetch(_EXECUTIONS_IN, job_id, after_idx, state.value, limit)
    # row: idx, device_id, command_id, updated_at, own error, public state, command result,
    # command error, sent_at, completed_at (the columns of _EXECUTIONS)
    return [
        Execution(
            job_id=job_id,
            index=row[0],
            device_id=row[1],
            command_id=row[2],
            state=ExecutionState(row[5]),
            updated_at_ms=row[9] or row[8] or row[3],
            result=json_or_none(row[6]),
            error=json_or_none(row[7] if row[4] is None else row[4]),
        )
        for row in found
    ]


async def next_pending(tx: Tx, job_id: str, limit: int) -> list[Execution]:
    found = await tx.fetch(_NEXT, job_id, limit)
    return [
        Execution(job_id, idx, device_id, command_id, ExecutionState.PENDING, updated_at)
        for idx, device_id, command_id, updated_at in found
    ]


async def progress(tx: Tx, job_id: str) -> tuple[int, int]:
    """(pending executions, dispatched ones whose command is not final): one statement."""
    row = await tx.fetchrow(_PROGRESS, job_id, job_id)
    assert row is not None  # a SELECT of two scalar subqueries always has its one row
    return int(row[0]), int(row[1])


async def take_lease(tx: Tx, job_id: str, node: str, now_ms: int, until_ms: int) -> bool:
    return await tx.fetchrow(_TAKE_LEASE, node, until_ms, job_id, node, now_ms) is not None


async def release_lease(tx: Tx, job_id: str, node: str) -> None:
    await tx.execute(_RELEASE_LEASE, job_id, node)


async def orphans(tx: Tx, now_ms: int, limit: int) -> list[str]:
    return [row[0] for row in await tx.fetch(_ORPHANS, now_ms, limit)]
