"""Rows of the schema's tables as domain objects, and domain objects as column values."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import CursorResult, Row

from fleetwire.domain.commands import Command, CommandState
from fleetwire.domain.devices import Device

AnyRow = Row[*tuple[Any, ...]]


def device(row: AnyRow) -> Device:
    m = row._mapping
    return Device(
        id=m["id"],
        name=m["name"],
        type=m["type"],
        tags=tuple(m["tags"] or ()),
        metadata=m["metadata"] or {},
        status=m["status"],
        status_at_ms=m["status_at"],
        disabled=bool(m["disabled"]),
        telemetry_schema=m["telemetry_schema"],
        created_at_ms=m["created_at"],
        updated_at_ms=m["updated_at"],
        seq=m["seq"],
    )


def device_values(device: Device) -> dict[str, Any]:
    """The `devices` columns of a device (the inverse of `device`)."""
    return {
        "id": device.id,
        "name": device.name,
        "type": device.type,
        "tags": list(device.tags),
        "metadata": device.metadata,
        "status": device.status,
        "status_at": device.status_at_ms,
        "disabled": device.disabled,
        "telemetry_schema": device.telemetry_schema,
        "created_at": device.created_at_ms,
        "updated_at": device.updated_at_ms,
        "seq": device.seq,
    }


def command(row: AnyRow) -> Command:
    m = row._mapping
    return Command(
        id=m["id"],
        device_id=m["device_id"],
        name=m["name"],
        params=m["params"],
        state=CommandState(m["state"]),
        issued_at_ms=m["issued_at"],
        expires_at_ms=m["expires_at"],
        issuer=m["issuer"],
        issuer_node=m["issuer_node"],
        issuer_session=m["issuer_session"],
        idempotency_key=m["idempotency_key"],
        sent_at_ms=m["sent_at"],
        completed_at_ms=m["completed_at"],
        result=m["result"],
        error=m["error"],
        timeout_s=m["timeout_s"],
        extra=m["extra"] or {},
        job_id=m["job_id"],
    )


def command_values(command: Command) -> dict[str, Any]:
    """The `commands` columns of a command (the inverse of `command`)."""
    return {
        "id": command.id,
        "device_id": command.device_id,
        "name": command.name,
        "params": command.params,
        "state": command.state.value,
        "issued_at": command.issued_at_ms,
        "sent_at": command.sent_at_ms,
        "completed_at": command.completed_at_ms,
        "expires_at": command.expires_at_ms,
        "timeout_s": command.timeout_s,
        "issuer": command.issuer,
        "issuer_node": command.issuer_node,
        "issuer_session": command.issuer_session,
        "idempotency_key": command.idempotency_key,
        "result": command.result,
        "error": command.error,
        "extra": command.extra,
        "job_id": command.job_id,
    }


def pairs(result: CursorResult[*tuple[Any, ...]]) -> dict[Any, Any]:
    return {row[0]: row[1] for row in result}
