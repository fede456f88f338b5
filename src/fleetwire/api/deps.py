"""Request dependencies: the services, the caller's principal and role checks."""

from __future__ import annotations

import base64
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleetwire.auth.principal import AuthError, Principal, Role
from fleetwire.domain.errors import ErrorCode, FleetwireError, invalid
from fleetwire.services.container import Services
from fleetwire.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="A fleetwire JWT (contract §1)")


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_principal(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise FleetwireError(ErrorCode.UNAUTHORIZED, "a bearer token is required")
    try:
        principal = await services.auth.verify(credentials.credentials)
    except AuthError as exc:
        raise FleetwireError(ErrorCode.UNAUTHORIZED, str(exc) or "token refused") from exc
    if principal.role is Role.DEVICE:
        # A disabled or deleted device keeps a valid token; it opens nothing (issue 13.7).
        await services.registry.require_active(principal.sub)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(principal: Principal, role: Role) -> None:
    if not principal.at_least(role):
        raise FleetwireError(ErrorCode.FORBIDDEN, f"this needs the {role.value} role")


def require_device_access(
    principal: Principal, device_id: str, role: Role = Role.VIEWER, *, device_itself: bool = False
) -> None:
    """Clients by role and `devices` claim; a device token only where `device_itself` allows
    it (its own telemetry, contract §1) and only for itself."""
    if principal.role is Role.DEVICE:
        if not device_itself or device_id != principal.sub:
            raise FleetwireError(ErrorCode.FORBIDDEN, "a device token may only use its own telemetry")
        return
    require(principal, role)
    if not principal.may_see(device_id):
        raise FleetwireError(ErrorCode.FORBIDDEN, "device outside your `devices` claim")


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> Any:
    if cursor is None:
        return None
    try:
        return orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise invalid("bad cursor", [{"loc": ["query", "cursor"], "msg": "not a cursor"}]) from exc
