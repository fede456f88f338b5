"""The device twin over REST (contract §6): parse, call TwinService (which authorizes), shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from fleetwire.api.deps import PrincipalDep, ServicesDep
from fleetwire.api.schemas import DesiredPatch, ReportedPatch, TwinPublic

router = APIRouter(tags=["twin"])


@router.get("/devices/{device_id}/twin", response_model=TwinPublic)
async def get_twin(device_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    """The twin: viewers within their claim, and the device itself."""
    return (await services.twin.get(principal, device_id)).public()


@router.patch("/devices/{device_id}/twin", response_model=TwinPublic)
async def patch_desired(
    device_id: str, body: DesiredPatch, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Merge-patch `desired` (operator); `if_version` other than the current one → 409."""
    twin = await services.twin.update_desired(principal, device_id, body.desired, body.if_version)
    return twin.public()


@router.patch("/devices/{device_id}/twin/reported", response_model=TwinPublic)
async def patch_reported(
    device_id: str, body: ReportedPatch, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Merge-patch `reported` (the device itself, or an admin)."""
    twin = await services.twin.report(principal, device_id, body.reported, body.if_version)
    return twin.public()
