"""Fleet jobs over REST (contract §7): create, list, show, executions, pause/resume/cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response
from pydantic import BaseModel

from fleetwire.api.deps import PrincipalDep, ServicesDep, decode_cursor, encode_cursor, require
from fleetwire.auth.principal import Role
from fleetwire.domain.errors import invalid
from fleetwire.domain.jobs import Counts, ExecutionState, Job, parse_job

router = APIRouter(tags=["jobs"])


class JobCounts(BaseModel):
    total: int
    pending: int
    sent: int
    succeeded: int
    failed: int
    timed_out: int
    expired: int
    skipped: int
    canceled: int


class JobCommand(BaseModel):
    name: str
    params: dict[str, Any]
    timeout_s: int


class JobTarget(BaseModel):
    devices: list[str] | None = None
    tags: list[str]


class JobRollout(BaseModel):
    max_concurrent: int | None
    max_per_minute: int | None


class JobAbort(BaseModel):
    failure_pct: float
    min_executed: int


class JobPublic(BaseModel):
    job_id: str
    state: str
    command: JobCommand
    target: JobTarget
    queue: bool
    rollout: JobRollout
    abort: JobAbort | None
    deadline_s: int
    issuer: str
    created_at: str
    updated_at: str
    finished_at: str | None
    counts: JobCounts


class JobPage(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None


class ExecutionPublic(BaseModel):
    device_id: str
    command_id: str
    state: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    updated_at: str


class ExecutionPage(BaseModel):
    items: list[ExecutionPublic]
    next_cursor: str | None


def _shown(job: Job, counts: Counts) -> dict[str, Any]:
    return job.public(counts)


def _cursor(cursor: str | None, kind: type) -> Any:
    value = decode_cursor(cursor)
    if value is not None and type(value) is not kind:
        raise invalid("bad cursor", [{"loc": ["query", "cursor"], "msg": "not a cursor"}])
    return value


@router.post("/jobs", status_code=201, response_model=JobPublic)
async def create_job(
    body: Annotated[Any, Body()], services: ServicesDep, principal: PrincipalDep, response: Response
) -> dict[str, Any]:
    require(principal, Role.OPERATOR)
    spec = parse_job(body)
    job, counts = await services.jobs.create(principal, spec)
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    return _shown(job, counts)


@router.get("/jobs", response_model=JobPage)
async def list_jobs(
    services: ServicesDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    require(principal, Role.VIEWER)
    found, before = await services.jobs.list_jobs(principal, limit, _cursor(cursor, str))
    return {
        "items": [_shown(job, counts) for job, counts in found],
        "next_cursor": None if before is None else encode_cursor(before),
    }


@router.get("/jobs/{job_id}", response_model=JobPublic)
async def get_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    require(principal, Role.VIEWER)
    return _shown(*await services.jobs.get(principal, job_id))


@router.get("/jobs/{job_id}/executions", response_model=ExecutionPage)
async def list_executions(
    job_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    state: ExecutionState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    require(principal, Role.VIEWER)
    found = await services.jobs.executions(principal, job_id, state, limit, _cursor(cursor, int))
    next_cursor = encode_cursor(found[-1].index) if len(found) == limit else None
    return {"items": [e.public() for e in found], "next_cursor": next_cursor}


@router.post("/jobs/{job_id}/pause", response_model=JobPublic)
async def pause_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    require(principal, Role.OPERATOR)
    return _shown(*await services.jobs.pause(principal, job_id))


@router.post("/jobs/{job_id}/resume", response_model=JobPublic)
async def resume_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    require(principal, Role.OPERATOR)
    return _shown(*await services.jobs.resume(principal, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic)
async def cancel_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    require(principal, Role.OPERATOR)
    return _shown(*await services.jobs.cancel(principal, job_id))
