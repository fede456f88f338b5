"""What a new user meets first (issue 17): the dashboard served at `/` on the API's origin,
the page's own origin accepted on `/ws/client`, CORS on `/api/v1` for the allowed origins,
handshake refusals and session closes in the log, and the overview the dashboard reads."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.integration.harness import TIMEOUT, Node

pytestmark = pytest.mark.anyio


async def test_dashboard_served_at_the_root_with_a_same_origin_policy(node: Node) -> None:
    """`/` is the page with a CSP that keeps it to its own origin; its assets are under
    /web; an unknown API path is still a problem+json 404."""
    async with httpx.AsyncClient(base_url=node.http_url, timeout=TIMEOUT) as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="/web/app.js"' in page.text
        script = await http.get("/web/app.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]
        style = await http.get("/web/app.css")
        assert style.status_code == 200
        missing = await http.get("/api/v1/nothing-here")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert (await http.get("/web/../settings.py")).status_code == 404


async def test_the_pages_own_origin_may_open_a_client_session(node: Node) -> None:
    """With no allowed origins configured, a browser on the server's own origin (Origin
    matches Host) is accepted, while another port or host on the same machine is refused."""
    url = f"{node.ws_url}/ws/client?access_token={node.token('app', 'viewer')}"
    async with connect(url, origin=f"http://127.0.0.1:{node.port}") as ws:  # type: ignore[arg-type]
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "welcome"
    for origin in (f"http://127.0.0.1:{node.port + 1}", f"http://localhost:{node.port}", "null"):
        with pytest.raises(InvalidStatus) as info:
            await asyncio.wait_for(connect(url, origin=origin), TIMEOUT)  # type: ignore[arg-type]
        assert info.value.response.status_code == 403


async def test_cors_on_the_api_for_allowed_origins_only(make_node: Callable[..., Node]) -> None:
    """A preflight from an allowed origin is answered with the origin, the methods and
    `Authorization`; the actual request carries Access-Control-Allow-Origin. Another origin
    gets no CORS header at all (its preflight fails), and paths outside /api/v1 have none."""
    node = make_node(allowed_origins="https://app.example.com")
    await node.register("d1")
    preflight = {"Access-Control-Request-Method": "PATCH", "Access-Control-Request-Headers": "authorization"}
    bearer = {"Authorization": f"Bearer {node.token('app', 'viewer')}"}
    async with httpx.AsyncClient(base_url=node.http_url, timeout=TIMEOUT) as http:
        ok = await http.options("/api/v1/devices/d1", headers={"Origin": "https://app.example.com", **preflight})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "PATCH" in ok.headers["access-control-allow-methods"]
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        got = await http.get("/api/v1/devices/d1", headers={"Origin": "https://app.example.com", **bearer})
        assert got.status_code == 200
        assert got.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "www-authenticate" in got.headers["access-control-expose-headers"].lower()
        evil = await http.options("/api/v1/devices/d1", headers={"Origin": "https://evil.example", **preflight})
        assert evil.status_code == 400
        assert "access-control-allow-origin" not in evil.headers
        evil_get = await http.get("/api/v1/devices/d1", headers={"Origin": "https://evil.example", **bearer})
        assert evil_get.status_code == 200
        assert "access-control-allow-origin" not in evil_get.headers
        health = await http.get("/healthz", headers={"Origin": "https://app.example.com"})
        assert "access-control-allow-origin" not in health.headers


async def test_no_cors_without_allowed_origins(node: Node) -> None:
    """The default (no browser origins listed) answers no preflight: 405 as before."""
    async with httpx.AsyncClient(base_url=node.http_url, timeout=TIMEOUT) as http:
        response = await http.options(
            "/api/v1/devices",
            headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"},
        )
    assert response.status_code == 405
    assert "access-control-allow-origin" not in response.headers


async def test_refusals_and_closes_are_logged_without_tokens(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused handshake logs path, Origin, peer, status and reason at INFO; a session
    close logs its code, reason and principal; no token appears in any record."""
    await node.register("d1")
    caplog.set_level(logging.INFO, logger="fleetwire.realtime")
    viewer = node.token("app", "viewer")
    expired = node.token("app", "viewer", ttl_s=10, now=1_000_000)
    with pytest.raises(InvalidStatus):
        await asyncio.wait_for(
            connect(f"{node.ws_url}/ws/client?access_token={viewer}", origin="https://evil.example"),  # type: ignore[arg-type]
            TIMEOUT,
        )
    with pytest.raises(InvalidStatus):
        await asyncio.wait_for(connect(f"{node.ws_url}/ws/client?access_token={expired}"), TIMEOUT)
    device = await node.device("d1")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1"]})
    await device.close()
    await client.event("device.disconnected")  # the device's close has been handled
    await client.close()
    sentinel = await node.client(sub="sentinel")  # opened after the close: its log line is later
    await sentinel.close()
    for _ in range(100):  # the server logs the sentinel's close on its own thread
        if any("sentinel" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("fleetwire.realtime")]
    assert any(
        line.startswith("handshake refused: /ws/client https://evil.example from 127.0.0.1:")
        and line.endswith(": 403 Origin not allowed")
        for line in lines
    ), lines
    assert any(line.startswith("handshake refused: /ws/client (no Origin)") and ": 401 " in line for line in lines)
    assert any("closed: device d1, code 1000, reason closed" in line for line in lines), lines
    assert any("closed: viewer app, code 1000, reason closed" in line for line in lines), lines
    text = "\n".join(lines)
    for token in (viewer, expired):
        for part in token.split("."):
            assert part not in text


async def test_overview_counts_what_the_fleet_did(node: Node) -> None:
    """A connect, two records, a status change and a disconnect show in the current minute;
    the disconnect reason is counted; the node and its version are named."""
    await node.register("d1")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1"], "events": ["presence", "telemetry"]})
    device = await node.device("d1")
    await device.request({"type": "telemetry_batch", "records": [{"data": {"t": 1}}, {"data": {"t": 2}}]})
    await client.event("device.telemetry")
    await client.event("device.telemetry")
    await device.close()
    await client.event("device.disconnected")
    async with node.rest("viewer") as rest:
        body = (await rest.get("/overview", params={"minutes": 2})).json()
        assert (await rest.get("/overview", params={"minutes": 0})).status_code == 422
    async with node.rest("device", sub="d1") as rest:
        assert (await rest.get("/overview")).status_code == 403
    assert body["node_id"] == node.settings.node_id
    assert body["version"]
    assert body["uptime_s"] >= 0
    activity = body["activity"]
    assert len(activity["minutes"]) == 2
    now = activity["minutes"][-1]
    assert (now["connects"], now["disconnects"], now["telemetry"]) == (1, 1, 2)
    assert activity["disconnect_reasons"] == {"closed": 1}
    assert activity["nodes"] == [node.settings.node_id]
    assert activity["flapping"] == []


async def test_fleetwire_open_prints_a_signed_in_url(
    node: Node, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fleetwire open --no-browser` checks the server answers, then prints the dashboard URL
    with a fresh token in the fragment (never sent to a server) that the API accepts, with
    the role and lifetime asked for."""
    from fleetwire.auth.jwt import build_verifier
    from fleetwire.cli import main
    from fleetwire.settings import Settings
    from tests.integration.harness import SECRET

    monkeypatch.setenv("FLEETWIRE_JWT_SECRET", SECRET)
    loop = asyncio.get_running_loop()
    argv = ["open", "--url", node.http_url, "--no-browser", "--role", "operator", "--ttl", "600"]
    assert await asyncio.wait_for(loop.run_in_executor(None, main, argv), TIMEOUT) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "open this URL in a browser (it signs you in as dashboard, operator, for 600 s):"
    prefix = f"{node.http_url}/#token="
    assert lines[1].startswith(prefix)
    token = lines[1][len(prefix) :]
    principal = build_verifier(Settings(jwt_secret=SECRET)).verify(token)
    assert (principal.sub, principal.role.value) == ("dashboard", "operator")
    async with httpx.AsyncClient(base_url=node.http_url, timeout=TIMEOUT) as http:
        response = await http.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
