"""Several `fleetwire serve` processes on one PostgreSQL database and one Redis behave as one
service (issue 6, contract §5). Real processes, real servers; no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetwire.auth.jwt import mint_token
from tests.integration.harness import SECRET, TIMEOUT, Session
from tests.services import RedisServer, free_port, stop_process

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]
HEARTBEAT_S = 1.0


class ProcessNode:
    """`python -m fleetwire serve` as its own process."""

    def __init__(self, name: str, tmp: Path, database_url: str, broker_url: str) -> None:
        self.name = name
        self.port = free_port()
        self.log = tmp / f"{name}.log"
        env = {
            **os.environ,
            "FLEETWIRE_PORT": str(self.port),
            "FLEETWIRE_DATA_DIR": str(tmp / name),
            "FLEETWIRE_DATABASE_URL": database_url,
            "FLEETWIRE_BROKER_URL": broker_url,
            "FLEETWIRE_JWT_SECRET": SECRET,
            "FLEETWIRE_NODE_ID": name,
            "FLEETWIRE_HEARTBEAT_S": str(HEARTBEAT_S),
            "FLEETWIRE_LOG_LEVEL": "warning",
        }
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fleetwire", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.sessions: list[Session] = []

    async def ready(self) -> ProcessNode:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        async with httpx.AsyncClient(timeout=1) as http:
            while loop.time() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
                try:
                    if (await http.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready in 30 s: {self.log.read_text()[-2000:]}")

    def token(self, sub: str, role: str) -> str:
        return mint_token(secret=SECRET, sub=sub, role=role, ttl_s=3600)[0]

    def rest(self, role: str = "admin") -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}/api/v1",
            headers={"Authorization": f"Bearer {self.token('tester', role)}"},
            timeout=TIMEOUT,
        )

    async def device(self, device_id: str) -> Session:
        session = await Session.open(f"ws://127.0.0.1:{self.port}/ws/device", self.token(device_id, "device"))
        self.sessions.append(session)
        return session

    async def client(self, role: str = "operator") -> Session:
        session = await Session.open(f"ws://127.0.0.1:{self.port}/ws/client", self.token("app", role))
        self.sessions.append(session)
        return session

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
async def cluster(tmp_path: Path, postgres_url: str, redis_url: str) -> AsyncIterator[Callable[..., Any]]:
    nodes: list[ProcessNode] = []

    async def start(*names: str, broker_url: str | None = None) -> list[ProcessNode]:
        fresh = [ProcessNode(n, tmp_path, postgres_url, broker_url or redis_url) for n in names]
        nodes.extend(fresh)
        return list(await asyncio.gather(*(n.ready() for n in fresh)))

    yield start
    for node in nodes:
        for session in node.sessions:
            session.ws.transport.abort()
    await asyncio.get_running_loop().run_in_executor(None, lambda: [n.stop() for n in nodes])


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


async def test_events_commands_and_registry_cross_nodes(cluster: Callable[..., Any]) -> None:
    """A device on A, a client on B: presence, status and telemetry events arrive; a command
    from B reaches the device on A and its result comes back; B's registry lists the session."""
    a, b = await cluster("a", "b")
    async with a.rest() as rest:
        assert (await rest.post("/devices", json={"id": "d1"})).status_code == 201
    client = await b.client()
    await client.request(
        {"type": "subscribe", "devices": ["d1"], "events": ["presence", "status", "telemetry"]}
    )
    device = await a.device("d1")
    connected = await client.event("device.connected")
    assert connected["data"]["node"] == "a"
    await device.request({"type": "status", "status": "online"})
    await device.request({"type": "telemetry", "data": {"t": 1}})
    assert (await client.event("device.status"))["data"]["status"] == "online"
    assert (await client.event("device.telemetry"))["data"]["values"] == {"t": 1}
    async with b.rest("viewer") as rest:
        listing = (await rest.get("/connections")).json()
        assert [(c["device_id"], c["node"]) for c in listing["items"]] == [("d1", "a")]
    ack = await client.request({"type": "command", "device_id": "d1", "name": "blink"})
    assert ack["state"] == "sent"
    command = await device.next_of("command")
    await device.request({"type": "command_result", "command_id": command["command_id"], "ok": True})
    result = await client.next_of("command_result")
    assert (result["command_id"], result["state"]) == (ack["command_id"], "succeeded")


async def test_replacement_across_nodes_and_seq(cluster: Callable[..., Any]) -> None:
    """Connecting on B closes A's session with 4009; events stay in replaced order, and seq
    rises by one per event whichever node wrote it."""
    a, b = await cluster("a", "b")
    async with a.rest() as rest:
        await rest.post("/devices", json={"id": "d1"})
    client = await a.client()
    await client.request({"type": "subscribe", "devices": ["d1"], "events": ["presence", "status"]})
    first = await a.device("d1")
    await client.event("device.connected")
    second = await b.device("d1")
    assert await first.closed() == (4009, "replaced")
    gone = await client.event("device.disconnected")
    back = await client.event("device.connected")
    assert gone["data"]["reason"] == "replaced"
    assert back["data"]["node"] == "b"
    assert back["seq"] == gone["seq"] + 1
    seqs = [back["seq"]]
    for i in range(6):
        node = a if i % 2 else b
        async with node.rest("operator") as rest:
            assert (await rest.patch("/devices/d1", json={"status": f"s{i}"})).status_code == 200
        seqs.append((await client.event("device.status"))["seq"])
    assert seqs == list(range(seqs[0], seqs[0] + 7))
    assert second.welcome["device_id"] == "d1"


async def test_sigkill_node_lost_exactly_once(cluster: Callable[..., Any]) -> None:
    """A node killed with SIGKILL has its sessions declared disconnected (node_lost) by the
    survivors within 3 × heartbeat_s, exactly once."""
    a, b, c = await cluster("a", "b", "c")
    async with b.rest() as rest:
        await rest.post("/devices", json={"id": "d1"})
    watchers = [await b.client("viewer"), await c.client("viewer")]
    for watcher in watchers:
        await watcher.request({"type": "subscribe", "devices": ["d1"]})
    await a.device("d1")
    for watcher in watchers:
        await watcher.event("device.connected")
    killed_at = time.monotonic()
    a.kill()
    for watcher in watchers:
        lost = await watcher.event("device.disconnected", timeout=3 * HEARTBEAT_S + 2)
        assert lost["data"]["reason"] == "node_lost"
    assert time.monotonic() - killed_at <= 3 * HEARTBEAT_S + 1
    for watcher in watchers:
        with pytest.raises(TimeoutError):
            await watcher.event("device.disconnected", timeout=2 * HEARTBEAT_S)
    async with b.rest("viewer") as rest:
        assert (await rest.get("/connections")).json()["items"] == []


async def test_redis_restart_recovers(cluster: Callable[..., Any], private_redis: RedisServer) -> None:
    """Redis restarts mid-test: /readyz reports it, nodes keep local sessions, and after it
    returns events flow across nodes again and the registry shows the live session."""
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    a, b = await cluster("a", "b", broker_url=url)
    async with a.rest() as rest:
        await rest.post("/devices", json={"id": "d1"})
    device = await a.device("d1")
    private_redis.stop()
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        ready = await http.get(f"http://127.0.0.1:{a.port}/readyz")
        assert ready.status_code == 503
    private_redis.start()
    client = await b.client()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:  # wait for both nodes to reconnect and reconcile
        async with b.rest("viewer") as rest:
            items = (await rest.get("/connections")).json()["items"]
        if [i["device_id"] for i in items] == ["d1"]:
            break
        assert loop.time() < deadline, "the device session did not come back in the registry"
        await asyncio.sleep(0.2)
    await client.request({"type": "subscribe", "devices": ["d1"], "events": ["status"]})
    for attempt in range(30):
        await device.request({"type": "status", "status": f"s{attempt}"})
        try:
            event = await client.event("device.status", timeout=0.5)
            break
        except TimeoutError:
            continue
    assert event["data"]["source"] == "device"


async def test_command_lifecycle_is_stored_in_order_across_nodes(cluster: Callable[..., Any]) -> None:
    """Issue 13.12a: the issuer on B, the device on A answering at once: for every command
    the history holds `sent` before `succeeded` (seq order), also when both are recorded by
    different nodes within a millisecond of each other."""
    a, b = await cluster("a", "b")
    async with a.rest() as rest:
        assert (await rest.post("/devices", json={"id": "d1"})).status_code == 201
    device = await a.device("d1")
    client = await b.client()
    ids = []
    for _ in range(40):
        await client.send({"type": "command", "device_id": "d1", "name": "blink", "id": "c"})
        command = await device.next_of("command")
        await device.send({"type": "command_result", "command_id": command["command_id"], "ok": True})
        ids.append(command["command_id"])
    for _ in ids:  # every result has reached the issuer: both events are committed
        await client.next_of("command_result")
    async with b.rest("viewer") as rest:
        events = (await rest.get("/devices/d1/events", params={"limit": 1000})).json()["items"]
    states: dict[str, list[str]] = {}
    for event in events:
        if event["event"] == "command.updated":
            states.setdefault(event["data"]["command_id"], []).append(event["data"]["state"])
    assert [states[i] for i in ids] == [["sent", "succeeded"]] * len(ids)


async def test_simultaneous_connects_to_two_nodes_keep_each_session_in_order(
    cluster: Callable[..., Any],
) -> None:
    """Issue 13.12b: one device connects to A and B at the same moment, 15 times, and
    closes both. In the event stream (seq order) every announced session has its
    `device.connected` before its one `device.disconnected`."""
    a, b = await cluster("a", "b")
    async with a.rest() as rest:
        assert (await rest.post("/devices", json={"id": "d1"})).status_code == 201
    watcher = await a.client("viewer")
    await watcher.request({"type": "subscribe", "devices": ["d1"], "events": ["presence"]})
    token = a.token("d1", "device")
    welcomed: set[str] = set()
    for _ in range(15):
        opened = await asyncio.gather(
            *(Session.open(f"ws://127.0.0.1:{n.port}/ws/device", token) for n in (a, b)),
            return_exceptions=True,
        )
        for session in opened:
            if isinstance(session, Session):
                welcomed.add(session.welcome["session_id"])
                with contextlib.suppress(Exception):
                    await session.ws.close()
    order: dict[str, list[str]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while any(len(order.get(s, ())) < 2 for s in welcomed):  # every welcomed session ended
        assert loop.time() < deadline, (welcomed, order)
        event = await watcher.next_of("event")
        order.setdefault(event["data"]["session_id"], []).append(event["event"])
    assert len(welcomed) >= 15
    assert order.keys() == welcomed
    assert all(names == ["device.connected", "device.disconnected"] for names in order.values()), order


async def test_twin_desired_on_one_node_reaches_the_device_on_another(cluster: Callable[..., Any]) -> None:
    """Issue 14: desired written on A (REST) reaches the device connected to B as
    `twin_delta`; its report on B reaches a client on A as `twin.updated` and empties the
    delta; both nodes serve the same twin with one version sequence."""
    a, b = await cluster("a", "b")
    async with a.rest() as rest:
        assert (await rest.post("/devices", json={"id": "d1"})).status_code == 201
    watcher = await a.client("viewer")
    await watcher.request({"type": "subscribe", "devices": ["d1"], "events": ["twin"]})
    device = await b.device("d1")
    async with a.rest("operator") as rest:
        response = await rest.patch("/devices/d1/twin", json={"desired": {"fw": "3.1", "led": {"on": True}}})
        assert response.status_code == 200
    delta = await device.next_of("twin_delta")
    assert delta == {"type": "twin_delta", "version": 2, "delta": {"fw": "3.1", "led": {"on": True}}}
    ack = await device.request({"type": "twin_report", "reported": {"fw": "3.1", "led": {"on": True}}})
    assert ack["version"] == 3
    assert (await device.next_of("twin_delta")) == {"type": "twin_delta", "version": 3, "delta": {}}
    first = await watcher.event("twin.updated")
    second = await watcher.event("twin.updated")
    assert [first["data"]["version"], second["data"]["version"]] == [2, 3]
    assert second["seq"] == first["seq"] + 1
    assert second["data"]["delta"] == {}
    async with b.rest("viewer") as rest:
        twin = (await rest.get("/devices/d1/twin")).json()
    assert (twin["version"], twin["delta"], twin["reported"]) == (3, {}, {"fw": "3.1", "led": {"on": True}})
