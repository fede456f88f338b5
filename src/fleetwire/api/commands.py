"""Commands over REST (contract §3); `?wait=true` blocks until a final state or the timeout."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from fleetwire.api.deps import PrincipalDep, ServicesDep, decode_cursor, encode_cursor, require_device_access
from fleetwire.api.schemas import CommandCreate
from fleetwire.auth.principal import Role
from fleetwire.domain import commands
from fleetwire.domain.commands import CommandState
from fleetwire.domain.errors import invalid

router = APIRouter(tags=["commands"])


@router.post("/devices/{device_id}/commands", status_code=201)
async def send_command(
    device_id: str,
    body: CommandCreate,
    services: ServicesDep,
    principal: PrincipalDep,
    response: Response,
    wait: bool = False,
) -> dict[str, Any]:
    require_device_access(principal, device_id, Role.OPERATOR)
    request = commands.parse_request({"device_id": device_id, **body.model_dump()}, frozenset())
    command = await services.commands.issue(principal, request)
    if wait and not command.state.final:
        remaining = (command.expires_at_ms - command.issued_at_ms) / 1000 + 1.0
        command = await services.commands.wait(command.id, remaining) or command
    response.headers["Location"] = f"/api/v1/commands/{command.id}"
    return command.public()


@router.get("/commands/{command_id}")
async def get_command(command_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    command = await services.commands.get(command_id)
    require_device_access(principal, command.device_id)
    return command.public()


@router.get("/devices/{device_id}/commands")
async def list_commands(
    device_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    state: CommandState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    require_device_access(principal, device_id)
    await services.registry.get(device_id)
    after = decode_cursor(cursor)
    if after is not None and not isinstance(after, str):
        raise invalid("bad cursor")
    found = await services.commands.list_for_device(device_id, state, limit, after)
    next_cursor = encode_cursor(found[-1].id) if len(found) == limit else None
    return {"items": [c.public() for c in found], "next_cursor": next_cursor}
