"""Dependency outages on a single node (issue 7): the database (through a TCP proxy the test
cuts) and the Redis broker (a private redis-server the test stops). No false ack, retryable
errors, honest /readyz, recovery without duplicates."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hardening.helpers import RedisServer, TcpProxy, handshake, stored_values
from tests.integration.harness import TIMEOUT, Node, Session

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg_proxy(postgres_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy in front of the test's PostgreSQL database, and the database URL through it."""
    proxy = TcpProxy("127.0.0.1", 5432).start()
    head, _, name = postgres_url.rpartition("/")
    user = head.split("//", 1)[1].split("@", 1)[0]
    try:
        yield proxy, f"postgresql://{user}@127.0.0.1:{proxy.port}/{name}"
    finally:
        proxy.close()


@pytest.fixture
def proxied_node(pg_proxy: tuple[TcpProxy, str], make_node: Callable[..., Node]) -> tuple[TcpProxy, Node]:
    proxy, url = pg_proxy
    return proxy, make_node(database_url=url)


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, server.start), 20)
    yield server
    server.stop()


async def readyz(node: Node) -> tuple[int, dict[str, Any], httpx.Headers]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        response = await http.get(f"{node.http_url}/readyz")
    return response.status_code, response.json(), response.headers


async def until_acked(device: Session, message: dict[str, Any], attempts: int = 50) -> dict[str, Any]:
    """What a device does after `unavailable`: retry (with a short backoff) until acked."""
    for _ in range(attempts):
        reply = await device.request(message)
        if reply["type"] == "ack":
            return reply
        assert reply["code"] == "unavailable", reply
        await asyncio.sleep(0.1)  # the device's retry backoff
    raise AssertionError(f"not acked after {attempts} attempts: {message}")


@pytest.mark.postgres
async def test_database_outage_no_false_ack_and_recovery_without_duplicates(
    proxied_node: tuple[TcpProxy, Node],
) -> None:
    """PostgreSQL behind a proxy that is cut (connections dropped, new ones refused):
    telemetry, batches and status get error `unavailable` (never an ack); /readyz is 503 with
    Retry-After and `store` unavailable; REST reads and writes are 503 problem documents with
    Retry-After; a new device handshake is refused 503 before the upgrade; the open session
    stays open. When the proxy is restored the device retries until acked, /readyz is 200
    again, and every record — acked before, retried after — is stored exactly once."""
    proxy, node = proxied_node
    assert proxy.accepted >= 1  # the node reaches its database only through the proxy
    await node.register("d1", "d2")
    device = await node.device("d1")
    for n in range(1, 4):
        assert (await device.request({"type": "telemetry", "data": {"n": n}}))["accepted"] == 1
    proxy.cut()
    single = {"type": "telemetry", "data": {"n": 4}}
    batch = {"type": "telemetry_batch", "records": [{"data": {"n": 5}}, {"data": {"n": 6}}]}
    for message in (single, batch, {"type": "status", "status": "down"}):
        reply = await device.request(message)
        assert (reply["type"], reply["code"]) == ("error", "unavailable"), reply
        # No SQL, driver or library text reaches the client (issue 13.15).
        assert reply["message"] in (
            "storage unavailable, retry later",
            "a backing service is unavailable; retry later",
        )
    status, body, headers = await readyz(node)
    assert (status, body["status"], headers["retry-after"]) == (503, "unavailable", "5")
    assert body["checks"]["store"].startswith("unavailable")
    async with node.rest() as rest:
        for response in (
            await rest.get("/devices"),
            await rest.get("/devices/d1/telemetry"),
            await rest.post("/devices/d1/telemetry", json={"data": {"n": 99}}),
        ):
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "5"
            assert response.json()["code"] == "unavailable"
    assert await handshake(f"{node.ws_url}/ws/device", node.token("d2", "device")) == 503
    proxy.restore()
    assert (await until_acked(device, single))["accepted"] == 1
    assert (await until_acked(device, batch))["accepted"] == 2
    assert (await device.request({"type": "telemetry", "data": {"n": 7}}))["accepted"] == 1
    assert (await readyz(node))[0] == 200
    async with node.rest("viewer") as rest:
        assert await stored_values(rest, "d1") == [1, 2, 3, 4, 5, 6, 7]
    assert (await node.device("d2")).welcome["device_id"] == "d2"


@pytest.mark.redis
async def test_broker_outage_on_a_single_node(
    make_node: Callable[..., Node], private_redis: RedisServer
) -> None:
    """One node on a private Redis (FLEETWIRE_BROKER_URL) that is stopped: the local device
    session stays open and keeps getting acks for telemetry and status (stored: REST reads
    them back), /readyz is 503 naming the broker and presence, REST that needs presence (the
    device list) is 503 with Retry-After; when Redis returns, /readyz is 200 again and a
    subscriber receives live events again."""
    node = make_node(broker_url=private_redis.url, heartbeat_s=1.0)
    await node.register("d1")
    device = await node.device("d1")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1"], "events": ["status", "telemetry"]})
    assert (await device.request({"type": "status", "status": "before"}))["changed"] is True
    await client.event("device.status", status="before")
    private_redis.stop()
    for n in range(1, 6):
        assert (await device.request({"type": "telemetry", "data": {"n": n}}))["accepted"] == 1
    assert (await device.request({"type": "status", "status": "during"}))["changed"] is True
    status, body, _ = await readyz(node)
    assert (status, body["checks"]["store"]) == (503, "ok")
    assert body["checks"]["broker"].startswith("unavailable")
    assert body["checks"]["presence"].startswith("unavailable")
    async with node.rest("viewer") as rest:
        assert await stored_values(rest, "d1") == [1, 2, 3, 4, 5]
        assert (await rest.get("/devices/d1/events")).json()["items"][-1]["data"]["status"] == "during"
        listing = await rest.get("/devices")  # needs presence for the connection blocks
        assert (listing.status_code, listing.headers["retry-after"]) == (503, "5")
        assert listing.json()["code"] == "unavailable"
    await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, private_redis.start), 20)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while (await readyz(node))[0] != 200:  # the node reconnects with a capped backoff
        assert loop.time() < deadline, "the node did not become ready again"
        await asyncio.sleep(0.1)
    for attempt in range(50):  # the subscriber connection may resubscribe a little later
        await device.request({"type": "status", "status": f"after-{attempt}"})
        try:
            event = await client.event("device.status", timeout=0.3, status=f"after-{attempt}")
            break
        except TimeoutError:
            continue
    else:
        raise AssertionError("no live event after Redis came back")
    assert event["data"]["source"] == "device"
    assert (await device.request({"type": "telemetry", "data": {"n": 6}}))["accepted"] == 1


async def test_a_device_connecting_during_a_database_stall_is_closed_not_half_connected(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    """Issue 13.8: when `device.connected` cannot be recorded (the database is held locked
    by another connection past the busy timeout), the session is closed 1001 so the device
    reconnects; subscribers see no disconnect of a session they never saw connect. Once the
    lock is gone, a reconnect is announced as usual."""
    database = tmp_path / "stalled.db"
    node = make_node(database_url=f"sqlite:///{database}?busy_timeout=200")
    await node.register("d1")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1"]})
    lock = sqlite3.connect(database, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        stalled = await node.device("d1")
        assert await stalled.closed() == (1001, "server_shutdown")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    device = await node.device("d1")
    connected = await client.next_of("event")
    assert (connected["event"], connected["data"]["session_id"]) == (
        "device.connected",
        device.welcome["session_id"],
    )
