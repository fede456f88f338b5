"""REST request bodies (responses are the domain objects' `public()` shapes)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleetwire.domain.devices import DEVICE_ID, STATUS
from fleetwire.domain.jsonvalue import unstorable


def _storable(value: Any) -> Any:
    if value is not None and (why := unstorable(value)) is not None:
        raise ValueError(why)
    return value


def _text(value: str | None) -> str | None:
    if value is not None and "\x00" in value:  # PostgreSQL text cannot hold it
        raise ValueError("must not contain U+0000 (NUL)")
    return value


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=DEVICE_ID.pattern)
    name: str | None = Field(default=None, max_length=256)
    type: str | None = Field(default=None, max_length=128)
    tags: list[str] = Field(default_factory=list, max_length=64)
    metadata: dict[str, Any] = Field(default_factory=dict)
    telemetry_schema: dict[str, Any] | None = None

    _check_json = field_validator("metadata", "telemetry_schema")(_storable)
    _check_text = field_validator("name", "type")(_text)


class DeviceUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=256)
    type: str | None = Field(default=None, max_length=128)
    status: str | None = Field(default=None, pattern=STATUS.pattern)
    tags: list[str] | None = Field(default=None, max_length=64)
    metadata: dict[str, Any] | None = None
    telemetry_schema: dict[str, Any] | None = None
    disabled: bool | None = None

    _check_json = field_validator("metadata", "telemetry_schema")(_storable)
    _check_text = field_validator("name", "type")(_text)


class CommandCreate(BaseModel):
    """Same fields as the WebSocket `command` (contract §2.3); the device comes from the path.
    Strict like the WebSocket: "30" is not an integer and "true" is not a boolean."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    timeout_s: int = 30
    queue: bool = False
    idempotency_key: str | None = None


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sub: str = Field(min_length=1, max_length=128)
    role: str = Field(pattern="^(device|viewer|operator|admin)$")
    ttl_s: int = Field(ge=1, le=366 * 86400)
    devices: list[str] | None = Field(default=None, max_length=256)


class DesiredPatch(BaseModel):
    """`PATCH /devices/{id}/twin` (contract §6); the patch's content is checked by TwinService."""

    model_config = ConfigDict(extra="forbid")

    desired: dict[str, Any]
    if_version: int | None = Field(default=None, ge=0, le=2**63 - 1, strict=True)


class ReportedPatch(BaseModel):
    """`PATCH /devices/{id}/twin/reported` (contract §6)."""

    model_config = ConfigDict(extra="forbid")

    reported: dict[str, Any]
    if_version: int | None = Field(default=None, ge=0, le=2**63 - 1, strict=True)


class TwinMetadata(BaseModel):
    desired: dict[str, Any]
    reported: dict[str, Any]


class TwinPublic(BaseModel):
    """A device twin (contract §6)."""

    device_id: str
    desired: dict[str, Any]
    reported: dict[str, Any]
    delta: dict[str, Any]
    version: int
    metadata: TwinMetadata
