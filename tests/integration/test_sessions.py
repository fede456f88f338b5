"""Real-time sessions over real sockets (issue 3, contract §2): handshake, presence, status,
subscriptions, token lifecycle, limits, resume."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import time
from collections.abc import Callable

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.clock import ManualClock
from tests.integration.harness import TIMEOUT, Node, Session

pytestmark = pytest.mark.anyio


async def refused(node: Node, path: str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    """Open a raw upgrade request and return the HTTP status and JSON body of the refusal."""
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    )
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", node.port), TIMEOUT)
    writer.write(head.encode())
    raw = await asyncio.wait_for(reader.read(65536), TIMEOUT)
    writer.close()
    await asyncio.wait_for(writer.wait_closed(), TIMEOUT)
    status_line, _, rest = raw.partition(b"\r\n")
    body = rest.split(b"\r\n\r\n", 1)[1]
    return int(status_line.split()[1]), json.loads(body)


async def test_handshake_refusals_before_upgrade(node: Node) -> None:
    """Every refusal is an HTTP response with the contract's status and a JSON error body."""
    await node.register("d1")
    await node.register("d2")
    async with node.rest() as rest:
        assert (await rest.patch("/devices/d2", json={"disabled": True})).status_code == 200
    bearer = lambda token: {"Authorization": f"Bearer {token}"}  # noqa: E731
    cases = [
        ("/ws/device", {}, 401),
        ("/ws/device", bearer("garbage"), 401),
        ("/ws/device", bearer(node.token("d1", "device", ttl_s=10, now=time.time() - 60)), 401),
        ("/ws/device", bearer(node.token("d1", "viewer")), 403),
        ("/ws/device", bearer(node.token("nope", "device")), 403),
        ("/ws/device", bearer(node.token("d2", "device")), 403),
        ("/ws/client", bearer(node.token("d1", "device")), 403),
        ("/ws/client", {**bearer(node.token("a", "viewer")), "Origin": "https://evil.example"}, 403),
    ]
    for path, headers, status in cases:
        got, body = await refused(node, path, headers)
        assert (got, path, headers) == (status, path, headers)
        assert set(body) == {"error", "message"}
        assert body["error"] == {401: "unauthorized", 403: "forbidden"}[status]


async def test_browser_style_token_in_query_and_allowed_origin(make_node: Callable[..., Node]) -> None:
    """Browsers pass `access_token` in the query and an Origin that must be listed exactly."""
    node = make_node(allowed_origins="https://app.example.com")
    await node.register("d1")
    token = node.token("app", "viewer")
    from websockets.asyncio.client import connect

    url = f"{node.ws_url}/ws/client?access_token={token}"
    async with connect(url, origin="https://app.example.com") as ws:  # type: ignore[arg-type]
        welcome = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert welcome["type"] == "welcome"
        assert welcome["role"] == "viewer"
    for origin in ("https://app.example.com.evil.io", "null", "https://app.example.com:8443"):
        with pytest.raises(InvalidStatus) as info:
            await asyncio.wait_for(connect(url, origin=origin), TIMEOUT)  # type: ignore[arg-type]
        assert info.value.response.status_code == 403


async def test_presence_events_registry_and_snapshot(node: Node) -> None:
    """Connect and disconnect produce events with session, node, reason and duration; the
    connection registry and the subscribe snapshot show the live session."""
    await node.register("d1", "d2")
    client = await node.client()
    ack = await client.request({"type": "subscribe", "devices": ["d1"]})
    assert ack["type"] == "ack"
    assert ack["snapshot"] == [
        {
            "device_id": "d1",
            "connected": False,
            "connected_at": None,
            "last_seen_at": None,
            "status": None,
            "status_at": None,
            "seq": 1,
        }
    ]
    device = await node.device("d1")
    assert set(device.welcome) == {
        "type",
        "device_id",
        "session_id",
        "server_time",
        "token_expires_at",
        "heartbeat_s",
    }
    connected = await client.event("device.connected")
    assert connected["device_id"] == "d1"
    assert connected["seq"] == 2
    assert connected["data"] == {
        "session_id": device.welcome["session_id"],
        "node": node.settings.node_id,
        "transport": "websocket",
    }
    async with node.rest("viewer") as rest:
        listing = (await rest.get("/connections")).json()
        assert [c["device_id"] for c in listing["items"]] == ["d1"]
        block = (await rest.get("/devices/d1/connection")).json()
        assert block["connected"] is True
        assert block["session_id"] == device.welcome["session_id"]
        assert (await rest.get("/devices/d2/connection")).json()["connected"] is False
    await device.close()
    gone = await client.event("device.disconnected")
    assert gone["seq"] == 3
    assert gone["data"]["reason"] == "closed"
    assert gone["data"]["session_id"] == device.welcome["session_id"]
    assert gone["data"]["connected_for_s"] >= 0
    async with node.rest("viewer") as rest:
        assert (await rest.get("/connections")).json()["items"] == []


async def test_replacement_closes_old_with_4009_and_orders_events(node: Node) -> None:
    """A second connection of a device wins: the first gets 4009, and subscribers see
    disconnected(replaced) before connected."""
    await node.register("d1")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1"]})
    first = await node.device("d1")
    await client.event("device.connected")
    second = await node.device("d1")
    assert await first.closed() == (4009, "replaced")
    gone = await client.event("device.disconnected")
    back = await client.event("device.connected")
    assert gone["data"]["reason"] == "replaced"
    assert gone["data"]["session_id"] == first.welcome["session_id"]
    assert back["data"]["session_id"] == second.welcome["session_id"]
    assert back["seq"] == gone["seq"] + 1
    async with node.rest("viewer") as rest:
        block = (await rest.get("/devices/d1/connection")).json()
        assert block["session_id"] == second.welcome["session_id"]


async def test_status_changes_publish_only_on_change(node: Node) -> None:
    """Device and API status changes publish device.status with source; a repeat does not."""
    await node.register("d1")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1"], "events": ["status"]})
    device = await node.device("d1")
    assert (await device.request({"type": "status", "status": "online"}))["changed"] is True
    assert (await device.request({"type": "status", "status": "online"}))["changed"] is False
    event = await client.event("device.status")
    assert event["data"] == {"status": "online", "previous_status": None, "source": "device"}
    async with node.rest("operator") as rest:
        response = await rest.patch("/devices/d1", json={"status": "maintenance"})
        assert response.status_code == 200
        assert response.json()["status"] == "maintenance"
    event = await client.event("device.status")
    assert event["data"] == {"status": "maintenance", "previous_status": "online", "source": "api"}
    assert event["seq"] > 1
    # Nothing else arrives for the repeated status.
    with pytest.raises(TimeoutError):
        await client.event("device.status", timeout=0.3)


async def test_subscriptions_patterns_claims_and_once_delivery(node: Node) -> None:
    """Patterns cover later registrations; the `devices` claim narrows patterns and refuses
    explicit ids; overlapping subscriptions deliver an event once."""
    await node.register("site-a.1", "site-b.1")
    client = await node.client(devices=["site-a.*"])
    denied = await client.request({"type": "subscribe", "devices": ["site-b.1"]})
    assert (denied["type"], denied["code"]) == ("error", "forbidden")
    missing = await client.request({"type": "subscribe", "devices": ["site-a.404"]})
    assert missing["code"] == "not_found"
    first = await client.request({"type": "subscribe", "devices": ["*"], "events": ["presence"]})
    assert [s["device_id"] for s in first["snapshot"]] == ["site-a.1"]
    second = await client.request({"type": "subscribe", "devices": ["site-a.1"], "events": ["presence"]})
    assert second["subscription_id"] != first["subscription_id"]
    await node.register("site-a.2", "site-b.2")
    for device_id in ("site-b.2", "site-a.2", "site-a.1"):
        session = await node.device(device_id)
        await session.close()
    seen: dict[str, list[str]] = {}
    for _ in range(4):
        event = await client.recv()
        seen.setdefault(event["device_id"], []).append(event["event"])
    # Order holds per device; devices interleave freely.
    assert seen == {
        "site-a.2": ["device.connected", "device.disconnected"],
        "site-a.1": ["device.connected", "device.disconnected"],
    }
    with pytest.raises(TimeoutError):  # nothing of site-b, and nothing twice
        await client.recv(timeout=0.3)
    assert (await client.request({"type": "unsubscribe", "subscription_id": "nope"}))["code"] == "not_found"
    assert (await client.request({"type": "unsubscribe", "subscription_id": first["subscription_id"]}))[
        "type"
    ] == "ack"


async def test_bad_messages_keep_the_connection_open(node: Node) -> None:
    """Invalid JSON, unknown types and binary frames get errors; the session goes on."""
    await node.register("d1")
    device = await node.device("d1")
    await device.ws.send("{oops")
    assert (await device.recv())["code"] == "invalid_json"
    assert (await device.request({"type": "dance"}))["code"] == "unknown_type"
    assert (await device.request({"type": "subscribe", "devices": ["*"]}))["code"] == "forbidden"
    await device.ws.send(b"\x00\x01")
    assert (await device.recv())["code"] == "invalid_message"
    assert (await device.request({"type": "status", "status": "ok"}))["type"] == "ack"


async def test_token_expiry_warns_then_closes_4001(make_node: Callable[..., Node]) -> None:
    """token_expiring comes token_warning_s before exp; at exp the session closes with 4001
    and subscribers see reason token_expired."""
    node = make_node(token_warning_s=1.0, clock=ManualClock())
    await node.register("d1")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1"]})
    device = await node.device("d1", token=node.token("d1", "device", ttl_s=2))
    await client.event("device.connected")
    node.advance(3.0)  # past the warning and the expiry, in that order
    warning = await device.next_of("token_expiring")
    assert warning["expires_at"] == device.welcome["token_expires_at"]
    assert await device.closed() == (4001, "token_expired")
    gone = await client.event("device.disconnected")
    assert gone["data"]["reason"] == "token_expired"


async def test_auth_refresh_extends_the_session(make_node: Callable[..., Node]) -> None:
    """An in-band `auth` with a fresh token for the same sub and role keeps the session; a
    token for another role is refused and the old expiry stands."""
    node = make_node(token_warning_s=1.0, clock=ManualClock())
    await node.register("d1")
    device = await node.device("d1", token=node.token("d1", "device", ttl_s=2))
    wrong = await device.request({"type": "auth", "token": node.token("d1", "viewer")})
    assert wrong["code"] == "forbidden"
    bad = await device.request({"type": "auth", "token": "garbage"})
    assert bad["code"] == "unauthorized"
    ok = await device.request({"type": "auth", "token": node.token("d1", "device", ttl_s=60)})
    assert ok["type"] == "ack"
    assert ok["token_expires_at"] > device.welcome["token_expires_at"]
    node.advance(2.5)  # past the first token's expiry: the session must still be open
    assert (await device.request({"type": "status", "status": "alive"}))["type"] == "ack"


async def test_deleting_a_connected_device_reports_its_disconnect_first(node: Node) -> None:
    """Issue 13.9: subscribers see `device.disconnected` (reason forbidden) and then
    `device.deleted`; the device's session closes 4003; nothing else is reported for it."""
    await node.register("d1", "d2")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1", "d2"], "events": ["presence", "registry"]})
    device = await node.device("d1")
    await client.event("device.connected")
    async with node.rest() as rest:
        assert (await rest.delete("/devices/d1")).status_code == 204
        assert (await rest.patch("/devices/d2", json={"name": "sentinel"})).status_code == 200
    assert await device.closed() == (4003, "forbidden")
    names = []
    while not names or not names[-1].startswith("device.updated"):  # the sentinel comes last
        message = await client.next_of("event")
        names.append(f"{message['event']}:{message['device_id']}:{message['data'].get('reason', '')}")
    assert names == ["device.disconnected:d1:forbidden", "device.deleted:d1:", "device.updated:d2:"]


async def test_disable_and_delete_close_with_4003(node: Node) -> None:
    """Disabling or deleting a connected device closes its session with 4003."""
    await node.register("d1", "d2")
    one = await node.device("d1")
    two = await node.device("d2")
    async with node.rest() as rest:
        assert (await rest.patch("/devices/d1", json={"disabled": True})).status_code == 200
        assert (await rest.delete("/devices/d2")).status_code == 204
    assert await one.closed() == (4003, "forbidden")
    assert await two.closed() == (4003, "forbidden")


async def test_message_size_limit_closes_1009(make_node: Callable[..., Node]) -> None:
    """A message over FLEETWIRE_MAX_MESSAGE_BYTES closes the session with 1009."""
    node = make_node(max_message_bytes=4096)
    await node.register("d1")
    device = await node.device("d1")
    await device.send({"type": "status", "status": "x", "pad": "y" * 5000})
    code, _ = await device.closed()
    assert code == 1009


async def test_rate_limit_then_4029_others_unaffected(make_node: Callable[..., Node]) -> None:
    """With time standing still, a burst of 20 (20/s) is accepted, the next 5 get
    rate_limited, and the 5th refusal closes 4029 — after every accepted request got its
    ack (issue 13.11). Another device is unaffected."""
    node = make_node(rate_limit="20/s", rate_limit_close_after=5, clock=ManualClock())
    await node.register("d1", "d2")
    flood = await node.device("d1")
    calm = await node.device("d2")
    with contextlib.suppress(ConnectionClosed):  # the server may close before all are out
        for n in range(25):
            await flood.send({"type": "status", "status": "x", "id": n})
    replies = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            replies.append(await flood.recv())
    assert sorted(r["id"] for r in replies if r["type"] == "ack") == list(range(20))
    assert [r["code"] for r in replies if r["type"] == "error"] == ["rate_limited"] * 5
    assert flood.ws.protocol.close_rcvd is not None
    assert flood.ws.protocol.close_rcvd.code == 4029
    assert (await calm.request({"type": "status", "status": "fine"}))["type"] == "ack"


async def test_connection_limit_answers_503(make_node: Callable[..., Node]) -> None:
    """Past FLEETWIRE_MAX_CONNECTIONS, handshakes get 503."""
    node = make_node(max_connections=2)
    await node.register("d1", "d2", "d3")
    await node.device("d1")
    await node.device("d2")
    status, body = await refused(
        node, "/ws/device", {"Authorization": f"Bearer {node.token('d3', 'device')}"}
    )
    assert status == 503
    assert body["error"] == "unavailable"


async def test_resume_replays_missed_events_before_live_ones(node: Node) -> None:
    """subscribe with resume replays events after last_seq in order, then live ones."""
    await node.register("d1")
    device = await node.device("d1")
    for status in ("a", "b", "c"):
        await device.request({"type": "status", "status": status})
    client = await node.client()
    ack = await client.request(
        {"type": "subscribe", "devices": ["d1"], "events": ["status"], "resume": {"d1": 3}}
    )
    assert ack["recovered"] == {"d1": True}
    replayed = [await client.recv() for _ in range(2)]
    assert [(e["seq"], e["data"]["status"]) for e in replayed] == [(4, "b"), (5, "c")]
    await device.request({"type": "status", "status": "d"})
    live = await client.event("device.status")
    assert (live["seq"], live["data"]["status"]) == (6, "d")
    async with node.rest("viewer") as rest:
        history = (await rest.get("/devices/d1/events", params={"since": 3})).json()
        assert [e["seq"] for e in history["items"]] == [4, 5, 6]


async def test_slow_consumer_is_closed_4008_others_get_everything(make_node: Callable[..., Node]) -> None:
    """A subscriber that stops reading is closed with 4008; another gets every event in order."""
    # A long grace period: the slow peer reads again only after the fast one got everything.
    node = make_node(send_queue=50, rate_limit="100000/s", close_grace_s=30)
    await node.register("d1")
    slow = await node.client(max_size=None)
    fast = await node.client()
    for session in (slow, fast):
        await session.request({"type": "subscribe", "devices": ["d1"], "events": ["telemetry"]})
    slow.ws.transport.pause_reading()  # type: ignore[attr-defined]
    device = await node.device("d1")
    big = "x" * 1000
    reader = asyncio.create_task(_collect(fast, "device.telemetry", 8000))
    # Enough to overflow the kernel's socket buffers on loopback (several MB) and the queue.
    for batch in range(80):
        ack = await device.request(
            {
                "type": "telemetry_batch",
                "records": [{"data": {"i": batch * 100 + i, "p": big, "q": big}} for i in range(100)],
            }
        )
        assert ack["accepted"] == 100
    seqs = await asyncio.wait_for(reader, 30)
    assert seqs == list(range(seqs[0], seqs[0] + 8000))
    slow.ws.transport.resume_reading()  # type: ignore[attr-defined]
    code, _ = await slow.closed(timeout=10)
    assert code == 4008


async def _collect(session: Session, name: str, count: int) -> list[int]:
    return [(await session.event(name))["seq"] for _ in range(count)]


async def test_graceful_shutdown_sends_1001(make_node: Callable[..., Node]) -> None:
    """Stopping the server closes every session with 1001 server_shutdown."""
    node = make_node()
    await node.register("d1")
    device = await node.device("d1")
    client = await node.client()
    stopper = asyncio.get_running_loop().run_in_executor(None, node.stop)
    assert await device.closed(timeout=10) == (1001, "server_shutdown")
    assert (await client.closed(timeout=10))[0] == 1001
    await asyncio.wait_for(stopper, 30)


async def test_heartbeat_drops_a_silent_peer(make_node: Callable[..., Node]) -> None:
    """A peer that stops answering pings is dropped with reason timeout."""
    node = make_node(heartbeat_s=20, clock=ManualClock())
    await node.register("d1")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1"]})
    silent = await node.device("d1", ping_interval=None)
    await client.event("device.connected")
    silent.ws.transport.pause_reading()  # type: ignore[attr-defined]  # pings go unanswered
    node.advance(20)  # the first ping
    # Two round trips: the client has read the ping (and answered it) before the first
    # ack, and the server has read that pong before the second.
    for _ in range(2):
        await client.request({"type": "unsubscribe", "subscription_id": "none"})
    node.advance(20)  # the silent device never answered: dropped; the client did: kept
    gone = await client.event("device.disconnected")
    assert gone["data"]["reason"] == "timeout"
    assert (await client.request({"type": "unsubscribe", "subscription_id": "none"}))["code"] == "not_found"


async def test_rest_without_token_is_401_with_challenge(node: Node) -> None:
    """REST refuses a missing token with 401, WWW-Authenticate and a problem document."""
    async with httpx.AsyncClient(base_url=node.http_url, timeout=TIMEOUT) as http:
        response = await http.get("/api/v1/connections")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "unauthorized"


__all__ = ["Session"]


async def test_peer_close_code_never_chooses_the_reason(node: Node) -> None:
    """A device closing with 1001 (as browsers do) or 4009 is reported as `closed`."""
    await node.register("d1")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1"]})
    for code in (1001, 4009):
        device = await node.device("d1")
        await client.event("device.connected")
        await asyncio.wait_for(device.ws.close(code), TIMEOUT)
        gone = await client.event("device.disconnected")
        assert gone["data"]["reason"] == "closed"


async def test_resume_replays_at_most_max_replay_events(make_node: Callable[..., Node]) -> None:
    """Issue 13.5: with FLEETWIRE_MAX_REPLAY=4, d1's 3 missed events are replayed, d2's 3 do
    not fit in the 1 left: d2 replays nothing and is `recovered: false`; live events follow."""
    node = make_node(max_replay=4)
    await node.register("d1", "d2")
    for device_id in ("d1", "d2"):
        device = await node.device(device_id)
        for status in ("a", "b", "c"):
            await device.request({"type": "status", "status": status})
    client = await node.client()
    ack = await client.request(
        {
            "type": "subscribe",
            "devices": ["d1", "d2"],
            "events": ["status"],
            "resume": {"d1": 1, "d2": 1},  # seq 1 is device.connected: 3 status events missed
        }
    )
    assert ack["recovered"] == {"d1": True, "d2": False}
    await device.request({"type": "status", "status": "live"})  # d2's sentinel
    received = []
    while not received or received[-1] != ("d2", "live"):
        event = await client.next_of("event")
        received.append((event["device_id"], event["data"]["status"]))
    assert received == [("d1", "a"), ("d1", "b"), ("d1", "c"), ("d2", "live")]


async def test_a_long_token_is_warned_and_closed_on_time_without_a_timer_until_near(
    make_node: Callable[..., Node],
) -> None:
    """A one-hour token arms no timer at connect (the heartbeat ticks look again): an hour
    of the clock later the device still got `token_expiring`, then 4001, on time."""
    node = make_node(heartbeat_s=20, token_warning_s=60, clock=ManualClock())
    await node.register("d1")
    device = await node.device("d1", token=node.token("d1", "device", ttl_s=3600))
    assert node.call(lambda: node.app.state.services.sessions.local.devices["d1"]._timer) is None
    for _ in range(179):  # 20 s steps to 3,580 s: each ping is answered before the next tick
        node.advance(20)
        await device.request({"type": "status", "status": "alive"})
    warning = await device.next_of("token_expiring")
    assert warning["expires_at"] == device.welcome["token_expires_at"]
    node.advance(20)
    assert await device.closed() == (4001, "token_expired")


def _server_garbage() -> list[str]:
    """Types of the server's objects the cycle collector would have to free."""
    gc.collect()
    return sorted(
        type(o).__qualname__
        for o in gc.garbage
        if type(o).__module__.split(".")[0] in ("fleetwire", "uvicorn", "httptools")
    )


async def test_a_handshake_leaves_no_reference_cycle(node: Node) -> None:
    """A serving process collects cycles rarely (cli.tune_serving_process), so the
    connection path must free what it drops by reference counting alone: the HTTP protocol
    object a WebSocket upgrade leaves behind is not kept alive by a cycle."""
    await node.register(*(f"gc-{i}" for i in range(5)))
    await node.device("gc-0")  # anything first-use (caches, imports) is made
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds stays in gc.garbage, uncollected
    try:
        for i in range(1, 5):
            session = await node.device(f"gc-{i}")
            assert (await session.request({"type": "status", "id": i, "status": "ok"}))["type"] == "ack"
        assert _server_garbage() == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_an_open_session_keeps_no_finished_task(node: Node) -> None:
    """What a connection holds for its life is its idle memory (issue 12: ≤ 12 KB): the
    handshake's task and the task that announced the device are dropped once done."""
    await node.register(*(f"idle-{i}" for i in range(3)))
    for i in range(3):
        session = await node.device(f"idle-{i}")
        assert (await session.request({"type": "status", "id": 1, "status": "ok"}))["type"] == "ack"
    gc.collect()
    kept = sorted(
        task.get_coro().__qualname__
        for task in gc.get_objects()
        if isinstance(task, asyncio.Task) and task.done()
    )
    assert [name for name in kept if "handshake" in name or "online" in name] == []
