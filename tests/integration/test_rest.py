"""The REST registry (issue 2, contract §3) through the real server: every status code,
filters, pagination, roles and claims, tokens, health and metrics."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.harness import TIMEOUT, Node

pytestmark = pytest.mark.anyio


def problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["status"], body["code"]) == (status, code)


async def test_register_get_patch_delete(node: Node) -> None:
    """The registry's life cycle with the contract's status codes."""
    async with node.rest() as admin:
        created = await admin.post(
            "/devices",
            json={"id": "d-1", "name": "one", "type": "thermo", "tags": ["lab"], "metadata": {"floor": 2}},
        )
        assert created.status_code == 201
        body = created.json()
        assert (body["id"], body["name"], body["type"], body["tags"], body["metadata"]) == (
            "d-1",
            "one",
            "thermo",
            ["lab"],
            {"floor": 2},
        )
        assert body["connection"]["connected"] is False
        assert body["disabled"] is False
        problem(await admin.post("/devices", json={"id": "d-1"}), 409, "conflict")
        problem(await admin.post("/devices", json={"id": "-bad"}), 422, "invalid_message")
        problem(await admin.post("/devices", json={"id": "x", "bogus": 1}), 422, "invalid_message")
        problem(
            await admin.post("/devices", json={"id": "y", "telemetry_schema": {"type": 5}}),
            422,
            "invalid_message",
        )
        problem(await admin.get("/devices/nope"), 404, "not_found")
        patched = await admin.patch(
            "/devices/d-1", json={"name": "uno", "tags": ["lab", "eu"], "status": "online"}
        )
        assert patched.status_code == 200
        assert (patched.json()["name"], patched.json()["tags"], patched.json()["status"]) == (
            "uno",
            ["lab", "eu"],
            "online",
        )
        problem(await admin.patch("/devices/d-1", json={"status": "Not Valid"}), 422, "invalid_message")
        problem(await admin.patch("/devices/nope", json={"name": "x"}), 404, "not_found")
        assert (await admin.delete("/devices/d-1")).status_code == 204
        problem(await admin.delete("/devices/d-1"), 404, "not_found")
        problem(await admin.get("/devices/d-1"), 404, "not_found")


async def test_roles_and_tokens(node: Node) -> None:
    """401 without a valid token (with a Bearer challenge), 403 for a role too weak."""
    await node.register("d1")
    async with httpx.AsyncClient(base_url=f"{node.http_url}/api/v1", timeout=TIMEOUT) as anonymous:
        response = await anonymous.get("/devices")
        problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        bad = await anonymous.get("/devices", headers={"Authorization": "Bearer not.a.jwt"})
        problem(bad, 401, "unauthorized")
    async with node.rest("viewer") as viewer:
        assert (await viewer.get("/devices/d1")).status_code == 200
        problem(await viewer.post("/devices", json={"id": "d2"}), 403, "forbidden")
        problem(await viewer.patch("/devices/d1", json={"status": "x"}), 403, "forbidden")
        problem(
            await viewer.post("/tokens", json={"sub": "a", "role": "admin", "ttl_s": 60}), 403, "forbidden"
        )
    async with node.rest("operator") as operator:
        assert (await operator.patch("/devices/d1", json={"status": "maint"})).status_code == 200
        problem(await operator.patch("/devices/d1", json={"name": "x"}), 403, "forbidden")
        problem(await operator.delete("/devices/d1"), 403, "forbidden")
    async with node.rest("device", sub="d1") as device:
        problem(await device.get("/devices/d1"), 403, "forbidden")
        problem(await device.get("/devices"), 403, "forbidden")
    async with node.rest() as admin:
        minted = await admin.post("/tokens", json={"sub": "d1", "role": "device", "ttl_s": 60})
        assert minted.status_code == 201
        assert minted.json()["expires_at"].endswith("Z")
        problem(
            await admin.post("/tokens", json={"sub": "a", "role": "root", "ttl_s": 60}),
            422,
            "invalid_message",
        )
    async with node.rest("admin", devices=["d*"]) as narrow_admin:
        escalate = await narrow_admin.post("/tokens", json={"sub": "x", "role": "admin", "ttl_s": 60})
        problem(escalate, 403, "forbidden")
        problem(await narrow_admin.post("/devices", json={"id": "other"}), 403, "forbidden")
        assert (await narrow_admin.post("/devices", json={"id": "d9"})).status_code == 201
    session = await node.device("d1", token=minted.json()["token"])
    assert session.welcome["device_id"] == "d1"


async def test_filters_claims_and_pagination(node: Node) -> None:
    """Filters by status, tag, type and connected; claims narrow lists; pages chain."""
    async with node.rest() as admin:
        for i in range(25):
            body = {
                "id": f"site-{'a' if i % 2 else 'b'}.{i:02d}",
                "type": "t1" if i < 10 else "t2",
                "tags": ["even"] if i % 2 == 0 else [],
            }
            assert (await admin.post("/devices", json=body)).status_code == 201
        await admin.patch("/devices/site-a.01", json={"status": "online"})
        ids: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, object] = {"limit": 10}
            if cursor:
                params["cursor"] = cursor
            page = (await admin.get("/devices", params=params)).json()
            ids.extend(d["id"] for d in page["items"])
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert ids == sorted(ids)
        assert len(ids) == len(set(ids)) == 25
        assert pages == 3
        assert [
            d["id"] for d in (await admin.get("/devices", params={"status": "online"})).json()["items"]
        ] == ["site-a.01"]
        assert len((await admin.get("/devices", params={"tag": "even"})).json()["items"]) == 13
        assert len((await admin.get("/devices", params={"type": "t1"})).json()["items"]) == 10
        problem(await admin.get("/devices", params={"cursor": "!!"}), 422, "invalid_message")
        problem(await admin.get("/devices", params={"limit": 0}), 422, "invalid_message")
    await node.device("site-b.00")
    async with node.rest() as admin:
        live = (await admin.get("/devices", params={"connected": "true"})).json()["items"]
        assert [d["id"] for d in live] == ["site-b.00"]
        assert live[0]["connection"]["connected"] is True
        offline = (await admin.get("/devices", params={"connected": "false", "limit": 100})).json()["items"]
        assert len(offline) == 24
    async with node.rest("viewer", devices=["site-a.*"]) as narrow:
        seen = (await narrow.get("/devices", params={"limit": 100})).json()["items"]
        assert {d["id"][:6] for d in seen} == {"site-a"}
        problem(await narrow.get("/devices/site-b.00"), 403, "forbidden")
        assert (await narrow.get("/connections")).json()["items"] == []


async def test_health_readiness_metrics_openapi(node: Node) -> None:
    """healthz and readyz answer without a token; metrics is Prometheus text; OpenAPI lists the API."""
    async with httpx.AsyncClient(base_url=node.http_url, timeout=TIMEOUT) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"store": "ok", "broker": "ok", "presence": "ok"}
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert "fleetwire_connections 0.0" in metrics.text
        paths = (await http.get("/openapi.json")).json()["paths"]
        assert {
            "/api/v1/devices",
            "/api/v1/devices/{device_id}",
            "/api/v1/connections",
            "/api/v1/tokens",
        } <= set(paths)
