"""Telemetry over REST: the same rules as the WebSocket messages (contract §3)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from fleetwire.api.deps import (
    PrincipalDep,
    ServicesDep,
    SettingsDep,
    decode_cursor,
    encode_cursor,
    require_device_access,
)
from fleetwire.auth.principal import Role
from fleetwire.domain import telemetry
from fleetwire.domain.clock import format_ms, parse_rfc3339
from fleetwire.domain.errors import invalid

router = APIRouter(tags=["telemetry"])
_BIGINT = 2**63 - 1  # times and seqs are BIGINT in the store


@router.post("/devices/{device_id}/telemetry")
async def post_telemetry(
    device_id: str,
    services: ServicesDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    body: Annotated[
        dict[str, Any],
        Body(
            openapi_examples={
                "single": {"value": {"ts": "2026-11-25T18:00:00Z", "data": {"temp": 21.5}}},
                "batch": {"value": {"records": [{"data": {"temp": 21.5}}, {"data": {"temp": 21.6}}]}},
            }
        ),
    ],
) -> dict[str, Any]:
    """`{ts?, data}` like `telemetry`, or `{records: [...]}` like `telemetry_batch`; a
    WebSocket message copied verbatim (with its `type` and `id`) is accepted too."""
    require_device_access(principal, device_id, Role.ADMIN, device_itself=True)
    body = _without_envelope(body)
    device = await services.ingest.device(device_id)
    skew = int(settings.max_clock_skew_s * 1000)
    now = services.clock.now_ms()
    if "records" in body:
        if body.keys() - {"records"}:
            raise invalid(
                "unknown field(s)", [{"loc": [k], "msg": "unknown field"} for k in body.keys() - {"records"}]
            )
        records = telemetry.parse_batch(body["records"], now, skew)
        batch = True
    else:
        records = telemetry.parse_single(body, now, skew, frozenset())  # REST has no envelope
        batch = False
    accepted = await services.ingest.telemetry(device, records, batch=batch)
    return {"accepted": accepted}


def _without_envelope(body: dict[str, Any]) -> dict[str, Any]:
    """Drop a WebSocket envelope whose `type` matches the body's shape (issue 13.19)."""
    if "type" not in body and "id" not in body:
        return body
    kind = body.get("type")
    expected = "telemetry_batch" if "records" in body else "telemetry"
    problems = []
    if "type" in body and kind != expected:
        problems.append({"loc": ["type"], "msg": f"must be {expected!r} for this body"})
    request_id = body.get("id")
    if request_id is not None and not (
        (type(request_id) is str and len(request_id) <= 64) or type(request_id) is int
    ):
        problems.append({"loc": ["id"], "msg": "must be a string of up to 64 chars or an integer"})
    if problems:
        raise invalid("invalid envelope", problems)
    return {k: v for k, v in body.items() if k not in ("type", "id")}


def _time(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        ms = int(value) if value.lstrip("-").isdecimal() else parse_rfc3339(value)
        if not -_BIGINT <= ms <= _BIGINT:
            raise ValueError(value)
    except ValueError as exc:
        raise invalid(
            f"`{name}` must be RFC 3339 or epoch milliseconds", [{"loc": ["query", name], "msg": "bad time"}]
        ) from exc
    return ms


@router.get("/devices/{device_id}/telemetry")
async def get_telemetry(
    device_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    key: str | None = None,
    from_: Annotated[str | None, Query(alias="from")] = None,
    to: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Stored points, newest first; `from`/`to` are inclusive bounds."""
    require_device_access(principal, device_id, device_itself=True)
    before = decode_cursor(cursor)
    if before is not None:
        if not (
            isinstance(before, list)
            and len(before) == 3
            and all(type(n) is int and -_BIGINT <= n <= _BIGINT for n in before[:2])
            and isinstance(before[2], str)
        ):
            raise invalid("bad cursor")
        before = (before[0], before[1], before[2])
    points = await services.ingest.points(
        device_id, key=key, from_ms=_time(from_, "from"), to_ms=_time(to, "to"), limit=limit, before=before
    )
    items = [{"key": p.key, "ts": format_ms(p.ts_ms), "seq": p.seq, "value": p.value} for p in points]
    last = points[-1] if points else None
    next_cursor = encode_cursor([last.ts_ms, last.seq, last.key]) if last and len(points) == limit else None
    return {"items": items, "next_cursor": next_cursor}


@router.get("/devices/{device_id}/telemetry/latest")
async def latest_telemetry(device_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    require_device_access(principal, device_id, device_itself=True)
    latest = await services.ingest.latest(device_id)
    return {
        "device_id": device_id,
        "values": {
            k: {"value": p.value, "ts": format_ms(p.ts_ms), "seq": p.seq} for k, p in sorted(latest.items())
        },
    }
