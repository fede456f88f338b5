"""Rows of the schema's tables as domain objects, and domain objects as column values.

Rows are tuples by position (driver.Row): every query selects `DEVICE_COLUMNS` or
`COMMAND_COLUMNS` in this order. JSON columns travel as text both ways on both drivers.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from fleetwire.domain.commands import Command, CommandState
from fleetwire.domain.devices import Device
from fleetwire.store.sql.driver import Row
from fleetwire.store.sql.engine import dumps

DEVICE_FIELDS: Final = (
    "id",
    "name",
    "type",
    "tags",
    "metadata",
    "status",
    "status_at",
    "disabled",
    "telemetry_schema",
    "created_at",
    "updated_at",
    "seq",
)
DEVICE_COLUMNS: Final = ", ".join(DEVICE_FIELDS)
COMMAND_FIELDS: Final = (
    "id",
    "device_id",
    "name",
    "params",
    "state",
    "issued_at",
    "sent_at",
    "completed_at",
    "expires_at",
    "timeout_s",
    "issuer",
    "issuer_node",
    "issuer_session",
    "idempotency_key",
    "result",
    "error",
    "extra",
)
COMMAND_COLUMNS: Final = ", ".join(COMMAND_FIELDS)
_loads: Final = orjson.loads


def json_or_none(text: str | None) -> Any:
    return None if text is None else _loads(text)


def device(row: Row) -> Device:
    schema = row[8]
    return Device(
        id=row[0],
        name=row[1],
        type=row[2],
        tags=tuple(_loads(row[3]) or ()),
        metadata=_loads(row[4]) or {},
        status=row[5],
        status_at_ms=row[6],
        disabled=bool(row[7]),
        telemetry_schema=None if schema is None else _loads(schema),
        created_at_ms=row[9],
        updated_at_ms=row[10],
        seq=row[11],
    )


def device_values(device: Device) -> tuple[Any, ...]:
    """The `devices` columns of a device in DEVICE_FIELDS order (the inverse of `device`)."""
    schema = device.telemetry_schema
    return (
        device.id,
        device.name,
        device.type,
        dumps(list(device.tags)),
        dumps(device.metadata),
        device.status,
        device.status_at_ms,
        bool(device.disabled),
        None if schema is None else dumps(schema),
        device.created_at_ms,
        device.updated_at_ms,
        device.seq,
    )


def command(row: Row) -> Command:
    return Command(
        id=row[0],
        device_id=row[1],
        name=row[2],
        params=_loads(row[3]),
        state=CommandState(row[4]),
        issued_at_ms=row[5],
        sent_at_ms=row[6],
        completed_at_ms=row[7],
        expires_at_ms=row[8],
        timeout_s=row[9],
        issuer=row[10],
        issuer_node=row[11],
        issuer_session=row[12],
        idempotency_key=row[13],
        result=json_or_none(row[14]),
        error=json_or_none(row[15]),
        extra=_loads(row[16]) or {},
    )


def command_values(command: Command) -> tuple[Any, ...]:
    """The `commands` columns of a command in COMMAND_FIELDS order (the inverse of `command`)."""
    return (
        command.id,
        command.device_id,
        command.name,
        dumps(command.params),
        command.state.value,
        command.issued_at_ms,
        command.sent_at_ms,
        command.completed_at_ms,
        command.expires_at_ms,
        command.timeout_s,
        command.issuer,
        command.issuer_node,
        command.issuer_session,
        command.idempotency_key,
        None if command.result is None else dumps(command.result),
        None if command.error is None else dumps(command.error),
        dumps(command.extra),
    )
