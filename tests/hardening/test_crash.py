"""A `fleetwire serve` process stopped during ingest (issue 7, contract §2.2): SIGTERM closes
every peer with 1001; SIGTERM or SIGKILL, every acked record is present after a restart (read
back over REST), no refused record was stored, nothing is stored twice."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.hardening.helpers import TIMEOUT, Ingest, ServeProcess, stored_values
from tests.integration.harness import Node

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DEVICES = [f"d{i}" for i in range(4)]
ACKED_BEFORE_STOP = 300


async def start_ingest(server: ServeProcess) -> tuple[list[Ingest], list[asyncio.Task[None]]]:
    """Register the devices and start pipelined telemetry from each; return once at least
    ACKED_BEFORE_STOP records were acked in all (every 7th record is invalid and refused)."""
    async with server.rest() as rest:
        for device_id in DEVICES:
            assert (await rest.post("/devices", json={"id": device_id})).status_code == 201
    progress = asyncio.Event()
    ingests = [Ingest(await server.device(d), range(1, 1_000_000), progress=progress) for d in DEVICES]
    tasks = [asyncio.ensure_future(ingest.run()) for ingest in ingests]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while sum(len(i.acked) for i in ingests) < ACKED_BEFORE_STOP:
        progress.clear()
        await asyncio.wait_for(progress.wait(), max(deadline - loop.time(), 0.001))
    return ingests, tasks


async def check_after_restart(data_dir: Path, env: dict[str, str], ingests: list[Ingest]) -> None:
    """Restart on the same database — in this process (the same create_app and server as
    `fleetwire serve`, without a second interpreter start-up) — and read everything back."""
    database_url = env.get("FLEETWIRE_DATABASE_URL")
    node = Node(data_dir, **({"database_url": database_url} if database_url else {}))
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.run_in_executor(None, node.start), 30)
    try:
        await _check(node, ingests)
    finally:
        await asyncio.wait_for(loop.run_in_executor(None, node.stop), 40)


async def _check(node: Node, ingests: list[Ingest]) -> None:
    async with node.rest("viewer") as rest:
        for device_id, ingest in zip(DEVICES, ingests, strict=True):
            stored = await stored_values(rest, device_id)
            assert len(stored) == len(set(stored)), f"{device_id}: a record stored twice"
            assert ingest.acked <= set(stored), f"{device_id}: acked records lost"
            assert not ingest.refused & set(stored), f"{device_id}: refused records stored"
            assert set(stored) <= ingest.sent
            assert ingest.refused  # the invalid records were refused, as a control
            assert all(ingest.is_bad(n) for n in ingest.refused)


async def test_sigterm_during_ingest(tmp_path: Path) -> None:
    """SIGTERM while 4 devices pipeline telemetry and a client is subscribed: every device and
    the client receive close 1001 `server_shutdown`; the process exits cleanly (no traceback);
    after a restart on the same data directory every acked record is stored exactly once and
    no refused one is."""
    server = ServeProcess(tmp_path, "term", FLEETWIRE_RATE_LIMIT="1000000/s")
    await server.ready()
    client = await server.client()
    await client.request({"type": "subscribe", "devices": ["*"], "events": ["status"]})
    ingests, tasks = await start_ingest(server)
    server.signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert [(i.close_code, i.close_reason) for i in ingests] == [(1001, "server_shutdown")] * len(DEVICES)
    assert await client.closed(timeout=TIMEOUT) == (1001, "server_shutdown")
    assert await server.wait_exit() in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM when done
    assert "Traceback" not in server.logs()
    await check_after_restart(tmp_path / "term", {}, ingests)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """FLEETWIRE_DATABASE_URL: unset (SQLite in the data directory) or a fresh PostgreSQL database."""
    if request.param == "postgresql":
        return {"FLEETWIRE_DATABASE_URL": request.getfixturevalue("postgres_url")}
    return {}


async def test_sigkill_during_ingest(tmp_path: Path, database_env: dict[str, str]) -> None:
    """SIGKILL while 4 devices pipeline telemetry (SQLite file or PostgreSQL): the sessions
    drop without a close frame; after a restart on the same database every acked record is
    stored exactly once, no refused record was stored, nothing unknown was stored."""
    env = {"FLEETWIRE_RATE_LIMIT": "1000000/s", **database_env}
    server = ServeProcess(tmp_path, "kill", **env)
    try:
        await server.ready()
        ingests, tasks = await start_ingest(server)
        server.signal(signal.SIGKILL)
        assert await server.wait_exit() == -signal.SIGKILL
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert [i.close_code for i in ingests] == [None] * len(DEVICES)
    finally:
        server.stop()
    await check_after_restart(tmp_path / "kill", env, ingests)
