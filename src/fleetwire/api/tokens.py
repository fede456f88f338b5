"""Token issuing (contract §3): only when this server holds a local signing secret."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from fleetwire.api.deps import PrincipalDep, require
from fleetwire.api.schemas import TokenCreate
from fleetwire.auth.jwt import mint_token
from fleetwire.auth.principal import Role
from fleetwire.domain.clock import format_ms
from fleetwire.domain.errors import ErrorCode, FleetwireError

router = APIRouter(tags=["tokens"])


@router.post("/tokens", status_code=201)
async def issue_token(body: TokenCreate, principal: PrincipalDep, request: Request) -> dict[str, Any]:
    require(principal, Role.ADMIN)
    if principal.device_patterns is not None:
        # A token could carry a wider claim than its minter's: only unrestricted admins mint.
        raise FleetwireError(
            ErrorCode.FORBIDDEN, "an admin restricted by a `devices` claim cannot mint tokens"
        )
    secret: str | None = request.app.state.signing_secret
    if secret is None:
        raise FleetwireError(ErrorCode.CONFLICT, "this server verifies external tokens and signs none")
    settings = request.app.state.settings
    algorithm = next((a for a in settings.algorithms if a.startswith("HS")), "HS256")
    token, expires_at_ms = mint_token(
        secret=secret,
        algorithm=algorithm,
        sub=body.sub,
        role=body.role,
        ttl_s=body.ttl_s,
        devices=body.devices,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )
    return {"token": token, "expires_at": format_ms(expires_at_ms)}
