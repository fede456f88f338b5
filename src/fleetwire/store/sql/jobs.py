"""Fleet jobs (contract §7): statements on `jobs` and `job_executions`, in the caller's
transaction. Plain SQL text with named parameters, the same on SQLite and PostgreSQL.

An execution row keeps its own state until it is dispatched (`pending`, `skipped`,
`canceled`); a dispatched one hands its state over to its command (`commands.job_id`), so
a result or a timeout needs no second write: counts are one GROUP BY over the join.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

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
from fleetwire.store.schema import JSON
from fleetwire.store.sql import commands as cmd

_JOB_COLUMNS: Final = (
    "id, state, spec, issuer, claim, total, created_at, updated_at, finished_at, lease_holder, lease_until"
)
_JOB_TYPES: Final = {"spec": JSON, "claim": JSON}
# The public state of an execution (see store.base.Store.job_counts).
_PUBLIC_STATE: Final = (
    "CASE WHEN e.state <> 'dispatched' THEN e.state WHEN c.state IS NULL THEN 'canceled' ELSE c.state END"
)
_COUNT_STATE: Final = (
    "CASE WHEN e.state <> 'dispatched' THEN e.state WHEN c.state IS NULL THEN 'canceled'"
    " WHEN c.state = 'pending' THEN 'queued' ELSE c.state END"
)

_INSERT_JOB: Final = sa.text(
    "INSERT INTO jobs (id, state, spec, issuer, claim, total, created_at, updated_at, finished_at,"
    " lease_holder, lease_until) VALUES (:id, :state, :spec, :issuer, :claim, :total, :created_at,"
    " :updated_at, NULL, :lease_holder, :lease_until)"
).bindparams(sa.bindparam("spec", type_=JSON), sa.bindparam("claim", type_=JSON))
_INSERT_EXECUTION: Final = sa.text(
    "INSERT INTO job_executions (job_id, idx, device_id, command_id, state, error, updated_at)"
    " VALUES (:job_id, :idx, :device_id, :command_id, 'pending', NULL, :updated_at)"
)
_MOVE_EXECUTION: Final = sa.text(
    "UPDATE job_executions SET state = :state, error = :error, updated_at = :at"
    " WHERE job_id = :job_id AND idx = :idx AND state = 'pending'"
    " AND EXISTS (SELECT 1 FROM jobs WHERE id = :job_id AND state = 'running')"
).bindparams(sa.bindparam("error", type_=JSON))
_DEVICE_EXISTS: Final = sa.text("SELECT 1 FROM devices WHERE id = :id")
_SET_STATE: Final = (
    sa.text(
        "UPDATE jobs SET state = :state, updated_at = :at,"
        " finished_at = CASE WHEN :final = 1 THEN :at ELSE finished_at END"
        f" WHERE id = :id AND state IN :from_states RETURNING {_JOB_COLUMNS}"
    )
    .bindparams(sa.bindparam("from_states", expanding=True))
    .columns(**_JOB_TYPES)
)
_CANCEL_PENDING: Final = sa.text(
    "UPDATE job_executions SET state = 'canceled', updated_at = :at WHERE job_id = :id AND state = 'pending'"
)
_GET_JOB: Final = sa.text(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = :id").columns(**_JOB_TYPES)
_LIST_JOBS: Final = sa.text(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT :limit").columns(
    **_JOB_TYPES
)
_LIST_JOBS_BEFORE: Final = sa.text(
    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id < :before ORDER BY id DESC LIMIT :limit"
).columns(**_JOB_TYPES)
_COUNTS: Final = sa.text(
    f"SELECT e.job_id AS job_id, {_COUNT_STATE} AS s, COUNT(*) AS n"
    " FROM job_executions e LEFT JOIN commands c ON c.id = e.command_id"
    f" WHERE e.job_id IN :ids GROUP BY e.job_id, {_COUNT_STATE}"
).bindparams(sa.bindparam("ids", expanding=True))
_EXECUTIONS: Final = (
    f"SELECT e.idx, e.device_id, e.command_id, e.updated_at, e.error AS own_error, {_PUBLIC_STATE} AS s,"
    " c.result AS result, c.error AS error, c.sent_at, c.completed_at"
    " FROM job_executions e LEFT JOIN commands c ON c.id = e.command_id"
    " WHERE e.job_id = :job_id AND e.idx > :after"
)
_EXECUTION_TYPES: Final = {"own_error": JSON, "result": JSON, "error": JSON}
_ALL_EXECUTIONS: Final = sa.text(_EXECUTIONS + " ORDER BY e.idx LIMIT :limit").columns(**_EXECUTION_TYPES)
_EXECUTIONS_IN: Final = sa.text(
    _EXECUTIONS + f" AND {_PUBLIC_STATE} = :state ORDER BY e.idx LIMIT :limit"
).columns(**_EXECUTION_TYPES)
_NEXT: Final = sa.text(
    "SELECT idx, device_id, command_id, updated_at FROM job_executions"
    " WHERE job_id = :job_id AND state = 'pending' ORDER BY idx LIMIT :limit"
)
_PROGRESS: Final = sa.text(
    "SELECT (SELECT COUNT(*) FROM job_executions WHERE job_id = :job_id AND state = 'pending'),"
    " (SELECT COUNT(*) FROM commands WHERE job_id = :job_id AND state IN ('pending', 'sent'))"
)
_TAKE_LEASE: Final = sa.text(
    "UPDATE jobs SET lease_holder = :node, lease_until = :until"
    " WHERE id = :id AND state IN ('running', 'paused') AND (lease_holder = :node OR lease_until <= :now)"
)
_RELEASE_LEASE: Final = sa.text(
    "UPDATE jobs SET lease_holder = NULL, lease_until = 0 WHERE id = :id AND lease_holder = :node"
)
_ORPHANS: Final = sa.text(
    "SELECT id FROM jobs WHERE state IN ('running', 'paused') AND lease_until <= :now"
    " ORDER BY id LIMIT :limit"
)


def _job(row: Any) -> Job:
    m = row._mapping
    return Job(
        id=m["id"],
        state=JobState(m["state"]),
        spec=JobSpec.from_stored(m["spec"]),
        issuer=m["issuer"],
        created_at_ms=m["created_at"],
        updated_at_ms=m["updated_at"],
        total=m["total"],
        finished_at_ms=m["finished_at"],
        claim=None if m["claim"] is None else tuple(m["claim"]),
    )


async def write_op(conn: AsyncConnection, op: JobOp, result: WriteResult) -> EventWrite | None:
    """One job op of a write group; the `command.updated` to number next, if it made one."""
    if type(op) is CreateJob:
        job = op.job
        await conn.execute(
            _INSERT_JOB,
            {
                "id": job.id,
                "state": job.state.value,
                "spec": job.spec.stored(),
                "issuer": job.issuer,
                "claim": None if job.claim is None else list(job.claim),
                "total": job.total,
                "created_at": job.created_at_ms,
                "updated_at": job.updated_at_ms,
                "lease_holder": None,
                "lease_until": 0,
            },
        )
        rows = [
            {"job_id": job.id, "idx": i, "device_id": d, "command_id": c, "updated_at": job.created_at_ms}
            for i, (d, c) in enumerate(op.executions)
        ]
        if rows:
            await conn.execute(_INSERT_EXECUTION, rows)
        result.job = job
        return None
    if type(op) is SetJobState:
        row = (
            await conn.execute(
                _SET_STATE,
                {
                    "id": op.job_id,
                    "state": op.state.value,
                    "at": op.at_ms,
                    "final": 1 if op.state.final else 0,
                    "from_states": sorted(s.value for s in op.from_states),
                },
            )
        ).first()
        if row is None:
            return None
        if op.state in (JobState.ABORTED, JobState.CANCELED):
            await conn.execute(_CANCEL_PENDING, {"id": op.job_id, "at": op.at_ms})
        result.job = _job(row)
        return None
    assert type(op) is DispatchExecution
    command = op.command
    missing = (
        command is not None
        and (await conn.execute(_DEVICE_EXISTS, {"id": command.device_id})).first() is None
    )
    if command is None or missing:
        state, error = STORED_SKIPPED, op.error
        if missing:
            state, error = STORED_CANCELED, {"code": "not_found", "message": "the device was deleted"}
    else:
        state, error = STORED_DISPATCHED, None
    moved = await conn.execute(
        _MOVE_EXECUTION,
        {"state": state, "error": error, "at": op.at_ms, "job_id": op.job_id, "idx": op.index},
    )
    if moved.rowcount != 1:  # not pending any more: never dispatched twice
        return None
    result.applied = True
    result.missing = missing
    if command is None or missing:
        return None
    await cmd.insert(conn, command)
    result.command = command
    return EventWrite(command.device_id, "command.updated", command.issued_at_ms, command.event_data())


async def get(conn: AsyncConnection, job_id: str) -> Job | None:
    row = (await conn.execute(_GET_JOB, {"id": job_id})).first()
    return None if row is None else _job(row)


async def list_jobs(conn: AsyncConnection, limit: int, before: str | None) -> list[Job]:
    if before is None:
        found = await conn.execute(_LIST_JOBS, {"limit": limit})
    else:
        found = await conn.execute(_LIST_JOBS_BEFORE, {"before": before, "limit": limit})
    return [_job(row) for row in found]


async def counts(conn: AsyncConnection, job_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {j: {} for j in job_ids}
    if not job_ids:
        return out
    for job_id, state, n in await conn.execute(_COUNTS, {"ids": list(job_ids)}):
        out[job_id][state] = int(n)
    return out


async def executions(
    conn: AsyncConnection, job_id: str, state: ExecutionState | None, limit: int, after: int | None
) -> list[Execution]:
    params: dict[str, Any] = {"job_id": job_id, "after": -1 if after is None else after, "limit": limit}
    if state is None:
        found = await conn.execute(_ALL_EXECUTIONS, params)
    else:
        found = await conn.execute(_EXECUTIONS_IN, {**params, "state": state.value})
    out = []
    for row in found:
        m = row._mapping
        updated = m["completed_at"] or m["sent_at"] or m["updated_at"]
        out.append(
            Execution(
                job_id=job_id,
                index=m["idx"],
                device_id=m["device_id"],
                command_id=m["command_id"],
                state=ExecutionState(m["s"]),
                updated_at_ms=updated,
                result=m["result"],
                error=m["error"] if m["own_error"] is None else m["own_error"],
            )
        )
    return out


async def next_pending(conn: AsyncConnection, job_id: str, limit: int) -> list[Execution]:
    found = await conn.execute(_NEXT, {"job_id": job_id, "limit": limit})
    return [
        Execution(job_id, idx, device_id, command_id, ExecutionState.PENDING, updated_at)
        for idx, device_id, command_id, updated_at in found
    ]


async def progress(conn: AsyncConnection, job_id: str) -> tuple[int, int]:
    row = (await conn.execute(_PROGRESS, {"job_id": job_id})).one()
    return int(row[0]), int(row[1])


async def take_lease(conn: AsyncConnection, job_id: str, node: str, now_ms: int, until_ms: int) -> bool:
    moved = await conn.execute(_TAKE_LEASE, {"id": job_id, "node": node, "now": now_ms, "until": until_ms})
    return bool(moved.rowcount == 1)


async def release_lease(conn: AsyncConnection, job_id: str, node: str) -> None:
    await conn.execute(_RELEASE_LEASE, {"id": job_id, "node": node})


async def orphans(conn: AsyncConnection, now_ms: int, limit: int) -> list[str]:
    return [row[0] for row in await conn.execute(_ORPHANS, {"now": now_ms, "limit": limit})]
