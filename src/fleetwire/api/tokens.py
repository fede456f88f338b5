"""Token issuing (contract §3): only when this server holds a local signing secret."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from fleetwire.api.deps import PrincipalDep
from fleetwire.api.schemas import TokenCreate
from fleetwire.auth.mint import TokenMinter
from fleetwire.domain.clock import format_ms

router = APIRouter(tags=["tokens"])


@router.post("/tokens", status_code=201)
async def issue_token(body: TokenCreate, principal: PrincipalDep, request: Request) -> dict[str, Any]:
    # The secret the app chose at start-up (None: it verifies external tokens only); the
    # minter checks that the caller is an unrestricted admin before anything else.
    minter = TokenMinter.from_settings(request.app.state.settings, request.app.state.signing_secret)
    token, expires_at_ms = minter.mint(
        sub=body.sub, role=body.role, ttl_s=body.ttl_s, devices=body.devices, requested_by=principal
    )
    return {"token": token, "expires_at": format_ms(expires_at_ms)}
