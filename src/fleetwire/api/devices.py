"""The device registry, connection registry and event history (contract §3)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from fleetwire.api.deps import (
    PrincipalDep,
    ServicesDep,
    decode_cursor,
    encode_cursor,
    require,
    require_device_access,
)
from fleetwire.api.schemas import DeviceCreate, DeviceUpdate
from fleetwire.auth.principal import Role
from fleetwire.domain.devices import Device, DeviceFilter
from fleetwire.domain.errors import ErrorCode, FleetwireError

router = APIRouter(tags=["devices"])
Limit = Annotated[int, Query(ge=1, le=1000)]


async def _with_connection(services: ServicesDep, device: Device) -> dict[str, Any]:
    body = device.public()
    body["connection"] = await services.registry.connection(device.id)
    return body


@router.post("/devices", status_code=201)
async def register_device(
    body: DeviceCreate, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    require_device_access(principal, body.id, Role.ADMIN)
    device = Device(
        id=body.id,
        name=body.name,
        type=body.type,
        tags=tuple(body.tags),
        metadata=body.metadata,
        telemetry_schema=body.telemetry_schema,
    )
    return await _with_connection(services, await services.registry.register(device))


@router.get("/devices")
async def list_devices(
    services: ServicesDep,
    principal: PrincipalDep,
    status: str | None = None,
    connected: bool | None = None,
    tag: str | None = None,
    type: str | None = None,
    limit: Limit = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    require(principal, Role.VIEWER)
    after = decode_cursor(cursor)
    if after is not None and not isinstance(after, str):
        raise FleetwireError(ErrorCode.INVALID_MESSAGE, "bad cursor")
    live = await services.registry.connected_ids() if connected is not None else None
    where = DeviceFilter(
        status=status,
        tag=tag,
        type=type,
        only_ids=live if connected else None,
        exclude_ids=live if connected is False else None,
        patterns=principal.device_patterns,
    )
    devices = await services.registry.list_devices(where, limit, after)
    blocks = await services.registry.connections([d.id for d in devices])
    items = [{**device.public(), "connection": blocks[device.id]} for device in devices]
    next_cursor = encode_cursor(devices[-1].id) if len(devices) == limit else None
    return {"items": items, "next_cursor": next_cursor}


@router.get("/devices/{device_id}")
async def get_device(device_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    require_device_access(principal, device_id)
    return await _with_connection(services, await services.registry.get(device_id))


@router.patch("/devices/{device_id}")
async def update_device(
    device_id: str, body: DeviceUpdate, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    given = body.model_fields_set
    require_device_access(principal, device_id, Role.OPERATOR if given <= {"status"} else Role.ADMIN)
    changes = {k: getattr(body, k) for k in given if k != "status"}
    if "tags" in changes:
        changes["tags"] = tuple(changes["tags"] or ())
    if "metadata" in changes:  # null clears it, as for tags (the column is NOT NULL)
        changes["metadata"] = changes["metadata"] or {}
    if "status" in given and body.status is None:
        raise FleetwireError(ErrorCode.INVALID_MESSAGE, "status cannot be cleared")
    device = await services.registry.update(device_id, changes, body.status)
    return await _with_connection(services, device)


@router.delete("/devices/{device_id}", status_code=204)
async def delete_device(device_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    require_device_access(principal, device_id, Role.ADMIN)
    await services.registry.delete(device_id)
    return Response(status_code=204)


@router.get("/devices/{device_id}/connection")
async def get_connection(device_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    require_device_access(principal, device_id)
    await services.registry.get(device_id)
    return await services.registry.connection(device_id)


@router.get("/connections")
async def list_connections(
    services: ServicesDep, principal: PrincipalDep, limit: Limit = 100, cursor: str | None = None
) -> dict[str, Any]:
    """Live device sessions on every node, ordered by device id."""
    require(principal, Role.VIEWER)
    after = decode_cursor(cursor)
    if after is not None and not isinstance(after, str):
        raise FleetwireError(ErrorCode.INVALID_MESSAGE, "bad cursor")
    items: list[dict[str, Any]] = []
    last: str | None = after
    while len(items) < limit:
        page = await services.registry.sessions(limit, last)
        items.extend(s.public() for s in page if principal.may_see(s.device_id))
        if len(page) < limit:
            last = None
            break
        last = page[-1].device_id
    items = items[:limit]
    next_cursor = encode_cursor(items[-1]["device_id"]) if len(items) == limit else None
    return {
        "items": items,
        "next_cursor": next_cursor,
        "count": await services.registry.session_count(principal),
    }


@router.get("/devices/{device_id}/events")
async def device_events(
    device_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    since: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Limit = 100,
) -> dict[str, Any]:
    """The event history after seq `since`, oldest first; page on with `since` = next_since."""
    require_device_access(principal, device_id)
    events = await services.registry.events(device_id, since, limit)
    return {
        "items": [e.public() for e in events],
        "next_since": events[-1].seq if events else since,
    }
