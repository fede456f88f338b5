"""The device registry, connection registry and event history (contract §3)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from fleetwire.api.deps import (
    NodeDep,
    PrincipalDep,
    decode_cursor,
    encode_cursor,
    require,
    require_device_access,
)
from fleetwire.api.schemas import DeviceCreate, DeviceUpdate
from fleetwire.auth.principal import Role
from fleetwire.domain.clock import now_ms
from fleetwire.domain.devices import Device, DeviceFilter
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.events import Event
from fleetwire.domain.telemetry import check_schema_async
from fleetwire.realtime.codes import Close
from fleetwire.store.base import DuplicateError, EventWrite

router = APIRouter(tags=["devices"])
Limit = Annotated[int, Query(ge=1, le=1000)]


async def _device(node: NodeDep, device_id: str) -> Device:
    device = await node.store.get_device(device_id)
    if device is None:
        raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
    return device


async def _with_connection(node: NodeDep, device: Device) -> dict[str, Any]:
    body = device.public()
    body["connection"] = await connection_block(node, device.id)
    return body


async def connection_block(node: NodeDep, device_id: str) -> dict[str, Any]:
    session = await node.presence.get(device_id)
    if session is None:
        return {
            "connected": False,
            "session_id": None,
            "connected_at": None,
            "last_seen_at": None,
            "node": None,
        }
    block = session.public()
    del block["device_id"]
    return block


@router.post("/devices", status_code=201)
async def register_device(body: DeviceCreate, node: NodeDep, principal: PrincipalDep) -> dict[str, Any]:
    require_device_access(principal, body.id, Role.ADMIN)
    if body.telemetry_schema is not None:
        await check_schema_async(body.telemetry_schema)
    now = now_ms()
    device = Device(
        id=body.id,
        name=body.name,
        type=body.type,
        tags=tuple(body.tags),
        metadata=body.metadata,
        telemetry_schema=body.telemetry_schema,
        created_at_ms=now,
        updated_at_ms=now,
    )
    try:
        device = await node.store.create_device(device)
    except DuplicateError as exc:
        raise FleetwireError(ErrorCode.CONFLICT, f"device {body.id!r} exists already") from exc
    result = await node.writer.submit(EventWrite(device.id, "device.registered", now, device.public()))
    if result.events:
        device = _with_seq(device, result.events[-1].seq)
    return await _with_connection(node, device)


@router.get("/devices")
async def list_devices(
    node: NodeDep,
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
    live = await node.presence.connected_ids() if connected is not None else None
    where = DeviceFilter(
        status=status,
        tag=tag,
        type=type,
        only_ids=live if connected else None,
        exclude_ids=live if connected is False else None,
        patterns=principal.device_patterns,
    )
    devices = await node.store.list_devices(where, limit, after)
    sessions = await node.presence.get_many([d.id for d in devices])
    items = []
    for device in devices:
        body = device.public()
        session = sessions.get(device.id)
        body["connection"] = (
            {k: v for k, v in session.public().items() if k != "device_id"}
            if session
            else {
                "connected": False,
                "session_id": None,
                "connected_at": None,
                "last_seen_at": None,
                "node": None,
            }
        )
        items.append(body)
    next_cursor = encode_cursor(devices[-1].id) if len(devices) == limit else None
    return {"items": items, "next_cursor": next_cursor}


@router.get("/devices/{device_id}")
async def get_device(device_id: str, node: NodeDep, principal: PrincipalDep) -> dict[str, Any]:
    require_device_access(principal, device_id)
    return await _with_connection(node, await _device(node, device_id))


@router.patch("/devices/{device_id}")
async def update_device(
    device_id: str, body: DeviceUpdate, node: NodeDep, principal: PrincipalDep
) -> dict[str, Any]:
    given = body.model_fields_set
    require_device_access(principal, device_id, Role.OPERATOR if given <= {"status"} else Role.ADMIN)
    await _device(node, device_id)
    if body.telemetry_schema is not None:
        await check_schema_async(body.telemetry_schema)
    changes = {k: getattr(body, k) for k in given if k != "status"}
    if "tags" in changes:
        changes["tags"] = tuple(changes["tags"] or ())
    if "metadata" in changes:  # null clears it, as for tags (the column is NOT NULL)
        changes["metadata"] = changes["metadata"] or {}
    if "status" in given and body.status is None:
        raise FleetwireError(ErrorCode.INVALID_MESSAGE, "status cannot be cleared")
    device: Device | None = None
    if changes:
        device = await node.store.update_device(device_id, changes)
        if device is None:
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
    if body.status is not None:
        await node.change_status(device_id, body.status, "api")
    device = await _device(node, device_id)
    if changes:
        result = await node.writer.submit(EventWrite(device_id, "device.updated", now_ms(), device.public()))
        if result.events:
            device = _with_seq(device, result.events[-1].seq)
    if changes.get("disabled"):
        await node.close_device(device_id, Close.FORBIDDEN)
    return await _with_connection(node, device)


@router.delete("/devices/{device_id}", status_code=204)
async def delete_device(device_id: str, node: NodeDep, principal: PrincipalDep) -> Response:
    require_device_access(principal, device_id, Role.ADMIN)
    device = await node.store.delete_device(device_id)
    if device is None:
        raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
    # The history went with the device, so this last event is published but not kept.
    node.publisher.submit([Event(device_id, device.seq + 1, "device.deleted", now_ms(), device.public())])
    await node.close_device(device_id, Close.FORBIDDEN)
    return Response(status_code=204)


@router.get("/devices/{device_id}/connection")
async def get_connection(device_id: str, node: NodeDep, principal: PrincipalDep) -> dict[str, Any]:
    require_device_access(principal, device_id)
    await _device(node, device_id)
    return await connection_block(node, device_id)


@router.get("/connections")
async def list_connections(
    node: NodeDep, principal: PrincipalDep, limit: Limit = 100, cursor: str | None = None
) -> dict[str, Any]:
    """Live device sessions on every node, ordered by device id."""
    require(principal, Role.VIEWER)
    after = decode_cursor(cursor)
    items: list[dict[str, Any]] = []
    last: str | None = after
    while len(items) < limit:
        page = await node.presence.list_sessions(limit, last)
        items.extend(s.public() for s in page if principal.may_see(s.device_id))
        if len(page) < limit:
            last = None
            break
        last = page[-1].device_id
    items = items[:limit]
    next_cursor = encode_cursor(items[-1]["device_id"]) if len(items) == limit else None
    return {"items": items, "next_cursor": next_cursor, "count": await node.presence.count()}


@router.get("/devices/{device_id}/events")
async def device_events(
    device_id: str,
    node: NodeDep,
    principal: PrincipalDep,
    since: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Limit = 100,
) -> dict[str, Any]:
    """The event history after seq `since`, oldest first; page on with `since` = next_since."""
    require_device_access(principal, device_id)
    await _device(node, device_id)
    events = await node.store.events(device_id, since, limit)
    return {
        "items": [e.public() for e in events],
        "next_since": events[-1].seq if events else since,
    }


def _with_seq(device: Device, seq: int) -> Device:
    from dataclasses import replace

    return replace(device, seq=seq)
