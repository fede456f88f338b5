"""No token is ever written to a log (contract §2, issue 7): a real `fleetwire serve` process
with INFO logs and access logs, grepped after accepted and refused handshakes and REST calls."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from fleetwire.auth.jwt import mint_token
from tests.hardening.helpers import SECRET, TIMEOUT, ServeProcess, Session, handshake, token

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_no_token_in_the_logs(tmp_path: Path) -> None:
    """With FLEETWIRE_LOG_LEVEL=info (access log on), tokens travel in `access_token` (also
    percent-encoded as `access%5Ftoken`, and in upper case), in `Authorization` and in an
    in-band `auth`, for accepted (101/200/201) and refused (401/403) requests. After a clean
    SIGTERM exit, no token, token payload or token signature occurs in stdout or stderr, while
    the access log does show the redacted requests (`access_token=[REDACTED]`, 101 and 401)."""
    server = ServeProcess(tmp_path, "logs", FLEETWIRE_LOG_LEVEL="info")
    await server.ready()
    admin = token("tester", "admin")
    device = token("d1", "device")
    bad = mint_token(secret="not-the-server-secret-but-32-bytes!!", sub="x", role="admin", ttl_s=600)[0]
    expired = mint_token(secret=SECRET, sub="d1", role="device", ttl_s=60, now=time.time() - 3600)[0]
    secrets = {"admin": admin, "device": device, "bad": bad, "expired": expired}
    try:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT) as http:
            auth = {"Authorization": f"Bearer {admin}"}
            assert (await http.post("/api/v1/devices", json={"id": "d1"}, headers=auth)).status_code == 201
            assert (await http.get("/api/v1/devices/d1", headers=auth)).status_code == 200
            assert (await http.get(f"/api/v1/devices?access_token={admin}")).status_code == 401
            assert (await http.get(f"/api/v1/devices?x=1&access_token={bad}&y=2")).status_code == 401
            assert (await http.get(f"/api/v1/devices?access%5Ftoken={admin}")).status_code == 401
            bad_auth = {"Authorization": f"Bearer {bad}"}
            assert (await http.get("/api/v1/devices", headers=bad_auth)).status_code == 401
        ws = server.ws_url
        assert await handshake(f"{ws}/ws/device", device, query=True) == 101
        assert await handshake(f"{ws}/ws/client", admin) == 101
        assert await handshake(f"{ws}/ws/client", bad, query=True) == 401
        assert await handshake(f"{ws}/ws/device", expired, query=True) == 401
        assert await handshake(f"{ws}/ws/device", admin, query=True) == 403
        assert await handshake(f"{ws}/ws/device?ACCESS_TOKEN={device}") == 401
        assert await handshake(f"{ws}/ws/device?access%5Ftoken={device}") == 101
        session = await Session.open(f"{ws}/ws/device?access_token={device}", device)
        ack = await session.request({"type": "telemetry", "data": {"t": 1}})
        assert ack["type"] == "ack"
        refused = await session.request({"type": "auth", "token": bad})
        assert refused["code"] == "unauthorized"
        assert bad not in json.dumps(refused)
        await session.close()
    finally:
        server.signal(signal.SIGTERM)
        # uvicorn re-raises the captured SIGTERM once its graceful shutdown is complete.
        assert await server.wait_exit() in (0, -signal.SIGTERM)
    logs = server.logs()
    assert "Application shutdown complete" in logs
    assert "Traceback" not in logs
    for name, value in secrets.items():
        _, payload, signature = value.split(".")
        for part in (value, payload, signature):
            assert part not in logs, f"{name} token material in the logs"
    assert 'GET /ws/device?access_token=[REDACTED] HTTP/1.1" 101' in logs
    assert 'GET /ws/client?access_token=[REDACTED] HTTP/1.1" 401' in logs
    assert 'GET /api/v1/devices?access_token=[REDACTED] HTTP/1.1" 401' in logs
    assert 'GET /api/v1/devices?x=1&access_token=[REDACTED]&y=2 HTTP/1.1" 401' in logs


async def test_startup_says_what_a_user_needs_and_no_alembic_chatter(tmp_path: Path) -> None:
    """At INFO, `fleetwire serve` prints one line each for version and node, the dashboard
    URL, the API docs URL, the database, the broker and where the secret lives; Alembic's
    plugin and context lines are gone; the secret itself is not printed."""
    server = ServeProcess(tmp_path, "start", FLEETWIRE_LOG_LEVEL="info", FLEETWIRE_JWT_SECRET="")
    await server.ready()
    server.signal(signal.SIGTERM)
    assert await server.wait_exit() in (0, -signal.SIGTERM)
    logs = server.logs()
    base = f"http://127.0.0.1:{server.port}"
    data = (tmp_path / "start").resolve()
    for line in (
        "fleetwire: fleetwire 0.1.0, node start",
        f"fleetwire: dashboard: {base}/  (sign in: `fleetwire open`)",
        f"fleetwire: API docs:  {base}/docs",
        f"fleetwire: database:  sqlite:///{data}/fleetwire.db",
        "fleetwire: broker:    memory://",
        f"fleetwire: secret:    {data}/jwt_secret (HMAC, mode 0600)",
    ):
        assert sum(1 for entry in logs.splitlines() if entry.endswith(line)) == 1, (line, logs)
    assert "alembic" not in logs
    secret = (data / "jwt_secret").read_text().strip()
    assert secret not in logs
