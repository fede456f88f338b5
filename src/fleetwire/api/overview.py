"""What the dashboard's health strip, rate charts and presence panel read (issue 17).

`GET /api/v1/overview` (viewer): the node (version, id, uptime, sessions here) and the
fleet's activity per minute from `FleetActivity` (cluster-wide, since this node started).
Fleet counts per device (registered, connected, disabled, never seen, stale) are not here:
the dashboard derives them from the device list and its `subscribe ["*"]` snapshot, which it
holds anyway.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from fleetwire.api.deps import PrincipalDep, ServicesDep, require
from fleetwire.auth.principal import Role
from fleetwire.domain.clock import format_ms

router = APIRouter(tags=["overview"])


class ActivityMinute(BaseModel):
    at: str
    connects: int
    disconnects: int
    telemetry: int
    commands_issued: int
    commands_succeeded: int
    commands_failed: int
    commands_timed_out: int


class FlappingDevice(BaseModel):
    device_id: str
    disconnects: int
    last_at: str


class Activity(BaseModel):
    since: str
    window_minutes: int
    minutes: list[ActivityMinute]
    disconnect_reasons: dict[str, int]
    flapping: list[FlappingDevice]
    flapping_threshold: int
    nodes: list[str]


class Overview(BaseModel):
    version: str
    node_id: str
    started_at: str
    uptime_s: float
    sessions_here: int
    activity: Activity


@router.get("/overview")
async def overview(
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    minutes: Annotated[int | None, Query(ge=1, le=1440)] = None,
) -> Overview:
    """Counts are of the whole fleet: a `devices` claim does not narrow them (they name no
    device but the flapping ones, which are filtered by the claim)."""
    require(principal, Role.VIEWER)
    started_ms: int = request.app.state.started_ms
    now_ms = services.clock.now_ms()
    activity = Activity.model_validate(services.activity.summary(minutes))
    activity.flapping = [row for row in activity.flapping if principal.may_see(row.device_id)]
    return Overview(
        version=request.app.version,
        node_id=services.node_id,
        started_at=format_ms(started_ms),
        uptime_s=max(0.0, (now_ms - started_ms) / 1000),
        sessions_here=len(services.sessions.local),
        activity=activity,
    )
