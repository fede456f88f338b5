"""SessionService: device sessions online and offline, replacement, liveness, reconcile,
heartbeats, last-seen flushes, and closing sessions wherever they are."""

from __future__ import annotations

import orjson
import pytest

from fleetwire.domain.clock import format_ms
from fleetwire.domain.close import Close
from fleetwire.domain.commands import CommandRequest
from fleetwire.presence.base import SessionInfo
from tests.unit.services.fakes import (
    ADMIN,
    LIMIT_S,
    OPERATOR,
    FakeClientSession,
    FakeDeviceSession,
    Node,
    until,
)

pytestmark = pytest.mark.anyio


async def test_device_opened_claims_presence_and_announces(node: Node) -> None:
    """An opened device session is claimed in Presence, `device.connected` (session, node,
    at the connection time) is recorded, and then the session hears `connected()`."""
    await node.register("d1")
    node.clock.advance(0.5)
    session = await node.connect("d1")
    at = session.connected_at_ms
    assert await node.presence.get("d1") == SessionInfo("d1", session.session_id, "n1", at, at)
    assert node.log.of("d1") == [("device.registered", 1), ("device.connected", 2)]
    assert node.log.data("d1", "device.connected") == [
        {"session_id": session.session_id, "node": "n1", "transport": "websocket"}
    ]
    [connected] = [e for e in node.log.events if e.name == "device.connected"]
    assert orjson.loads(connected.payload)["at"] == format_ms(at)
    assert session.connected_calls == 1
    assert node.services.sessions.local.devices["d1"] is session


async def test_a_second_session_replaces_the_first(node: Node) -> None:
    """A newer session of the device closes the older one 4009 (its end reported by the
    successor: one `device.disconnected` reason replaced), and the older session's own end
    records nothing more."""
    await node.register("d1")
    first = await node.connect("d1")
    second = await node.connect("d1")
    assert first.closes == [Close.REPLACED]
    assert node.log.of("d1") == [
        ("device.registered", 1),
        ("device.connected", 2),
        ("device.disconnected", 3),
        ("device.connected", 4),
    ]
    assert node.log.data("d1", "device.disconnected") == [
        {"session_id": first.session_id, "reason": "replaced", "connected_for_s": 0.0}
    ]
    node.services.sessions.device_closed(first, "replaced")  # the endpoint reports the end
    await node.settle()
    assert node.log.count("d1", "device.disconnected") == 1
    current = await node.presence.get("d1")
    assert current is not None
    assert current.session_id == second.session_id
    assert node.services.sessions.local.devices["d1"] is second


async def test_replacing_a_session_presence_lost_still_reports_it(node: Node) -> None:
    """When Presence no longer holds the older local session, the newer one still reports
    it `replaced`."""
    await node.register("d1")
    first = await node.connect("d1")
    assert await node.presence.remove("d1", first.session_id)
    await node.connect("d1")
    assert first.closes == [Close.REPLACED]
    assert node.log.data("d1", "device.disconnected") == [
        {"session_id": first.session_id, "reason": "replaced", "connected_for_s": 0.0}
    ]


async def test_a_session_on_another_node_is_replaced(pair: tuple[Node, Node]) -> None:
    """A session opened on n1 replaces the device's session on n2: n2's session is closed
    4009 through the broker with its report suppressed, n1 reports it `replaced` once."""
    n1, n2 = pair
    await n1.register("d1")
    await n2.seen("d1", "device.registered")
    old = await n2.connect("d1")
    await n1.connect("d1")
    assert old.closes == [Close.REPLACED]
    assert old.session_id in n2.services.sessions.local.suppressed
    n2.services.sessions.device_closed(old, "replaced")
    await n2.settle()
    await n1.settle()
    assert n1.log.data("d1", "device.disconnected") == [
        {"session_id": old.session_id, "reason": "replaced", "connected_for_s": 0.0}
    ]


async def test_device_closed_records_disconnected_with_its_reason(node: Node) -> None:
    """A session's end records `device.disconnected` with the reason and how long it was
    connected, and releases its Presence claim."""
    await node.register("d1")
    session = await node.connect("d1")
    node.clock.advance(2.5)
    node.services.sessions.device_closed(session, "timeout")
    await node.seen("d1", "device.disconnected")
    assert node.log.data("d1", "device.disconnected") == [
        {"session_id": session.session_id, "reason": "timeout", "connected_for_s": 2.5}
    ]
    assert await node.presence.get("d1") is None
    assert node.services.sessions.local.devices == {}
    assert node.services.sessions.local.by_id == {}


async def test_an_immediate_close_is_reported_after_connected(node: Node) -> None:
    """A session that ends before its claim was recorded: `device.connected` still comes
    before its `device.disconnected`."""
    await node.register("d1")
    device = await node.services.registry.get("d1")
    session = FakeDeviceSession(device, node.clock.now_ms())
    node.services.sessions.device_opened(session)
    node.services.sessions.device_closed(session, "closed")
    await node.seen("d1", "device.disconnected")
    assert [name for name, _ in node.log.of("d1")] == [
        "device.registered",
        "device.connected",
        "device.disconnected",
    ]


async def test_the_end_of_a_session_no_longer_current_records_nothing(node: Node) -> None:
    """When Presence holds another session of the device, a session's end records nothing
    (whoever took over reports it)."""
    await node.register("d1")
    session = await node.connect("d1")
    await node.presence.add(SessionInfo("d1", "elsewhere", "n2", 1, 1))
    node.services.sessions.device_closed(session, "closed")
    await node.settle()
    assert node.log.count("d1", "device.disconnected") == 0
    assert (await node.presence.get("d1")) == SessionInfo("d1", "elsewhere", "n2", 1, 1)


async def test_presence_outage_while_going_online_leaves_the_session_to_reconcile(node: Node) -> None:
    """When Presence fails during the claim, the session stays open and unannounced (no
    close: a Redis blip must not drop every device); `reconcile`, once Presence is back,
    claims it and records `device.connected`."""
    await node.register("d1")
    device = await node.services.registry.get("d1")
    session = FakeDeviceSession(device, node.clock.now_ms())
    node.presence.add_down = True
    node.services.sessions.device_opened(session)
    await node.settle()
    assert (session.closes, session.connected_calls) == ([], 0)
    node.presence.add_down = False
    await node.services.sessions.reconcile()
    assert session.connected_calls == 1
    assert [name for name, _ in node.log.of("d1")] == ["device.registered", "device.connected"]


async def test_store_outage_while_announcing_closes_1001_and_releases_presence(node: Node) -> None:
    """When the store fails while recording `device.connected`, the session is closed 1001;
    its end releases the Presence claim and records nothing."""
    await node.register("d1")
    device = await node.services.registry.get("d1")
    session = FakeDeviceSession(device, node.clock.now_ms())
    node.store.down = True
    node.services.sessions.device_opened(session)
    await until(lambda: session.closes == [Close.SERVER_SHUTDOWN])
    assert await node.presence.get("d1") is not None
    node.store.down = False
    node.services.sessions.device_closed(session, "server_shutdown")
    await node.settle()
    assert await node.presence.get("d1") is None
    assert session.connected_calls == 0
    assert node.log.of("d1") == [("device.registered", 1)]


async def test_client_sessions_open_and_close(node: Node) -> None:
    """A client session is known by id while open and forgotten (with any suppression) when
    it closes."""
    client = FakeClientSession(ADMIN, node.clock.now_ms())
    sessions = node.services.sessions
    sessions.opened(client)
    assert sessions.local.get(client.session_id) is client
    assert len(sessions.local) == 1
    sessions.local.suppressed.add(client.session_id)
    sessions.closed(client)
    assert sessions.local.get(client.session_id) is None
    assert sessions.local.suppressed == set()


async def test_heartbeat_pings_every_session_with_the_time(node: Node) -> None:
    """Every heartbeat_s (20 s on the clock), each local session, device or client, gets
    heartbeat(now)."""
    await node.register("d1")
    device_session = await node.connect("d1")
    client = FakeClientSession(ADMIN, node.clock.now_ms())
    node.services.sessions.opened(client)
    node.clock.advance(19.9)
    await node.services.tasks.drain(LIMIT_S)
    assert device_session.heartbeats == []
    node.clock.advance(0.1)
    await until(lambda: bool(client.heartbeats))
    now = node.clock.now_ms()
    assert (device_session.heartbeats, client.heartbeats) == ([now], [now])


async def test_liveness_declares_a_lapsed_nodes_sessions_lost(node: Node) -> None:
    """A session of a node whose liveness lapsed is claimed by this node's liveness step
    (every heartbeat_s / 2) and reported `node_lost`; Presence forgets it."""
    await node.register("d1")
    start = node.clock.now_ms()
    await node.presence.heartbeat("n9", 5)  # n9's lease ends in 5 s
    await node.presence.add(SessionInfo("d1", "lost-1", "n9", start - 3_000, start))
    node.clock.advance(10)
    await node.seen("d1", "device.disconnected")
    assert node.log.data("d1", "device.disconnected") == [
        {"session_id": "lost-1", "reason": "node_lost", "connected_for_s": 13.0}
    ]
    assert await node.presence.get("d1") is None


async def test_a_stopped_node_is_declared_lost_by_its_peer(pair: tuple[Node, Node]) -> None:
    """Two nodes share Presence: when n2 stops heartbeating, n1 declares n2's session
    `node_lost` within 2.5 × heartbeat_s (50 s)."""
    n1, n2 = pair
    await n1.register("d1")
    await n2.seen("d1", "device.registered")
    session = await n2.connect("d1")
    n2.services.tasks.stop()  # n2 is gone: no more liveness
    for _ in range(5):
        n1.clock.advance(10)
        await n1.services.tasks.drain(LIMIT_S)
    await n1.seen("d1", "device.disconnected")
    data = n1.log.data("d1", "device.disconnected")
    assert [(d["session_id"], d["reason"]) for d in data] == [(session.session_id, "node_lost")]


async def test_reconcile_puts_back_a_session_presence_lost(node: Node) -> None:
    """After Presence lost a live local session, reconcile claims it again, announces it
    again (`device.connected`, `connected()`) and delivers commands queued meanwhile."""
    await node.register("d1")
    session = await node.connect("d1")
    assert await node.presence.remove("d1", session.session_id)
    request = CommandRequest("d1", "reboot", {}, 30, True, None)
    command = await node.services.commands.issue(OPERATOR, request)
    await node.services.sessions.reconcile()
    info = await node.presence.get("d1")
    assert info is not None
    assert (info.session_id, info.node) == (session.session_id, "n1")
    await node.seen("d1", "device.connected", 2)
    await node.settle()  # the command's `pending` event also triggers a delivery: only one happens
    assert session.connected_calls == 2
    assert [m["command_id"] for m in session.messages() if m["type"] == "command"] == [command.id]


async def test_reconcile_closes_a_session_another_node_took(node: Node) -> None:
    """When Presence shows another session of a local device, reconcile closes the local
    one 4009 with its report suppressed (the newer session's node reported it)."""
    await node.register("d1")
    session = await node.connect("d1")
    await node.presence.add(SessionInfo("d1", "newer", "n2", 1, 1))
    await node.services.sessions.reconcile()
    assert session.closes == [Close.REPLACED]
    assert session.session_id in node.services.sessions.local.suppressed


async def test_reconcile_removes_ghosts_of_this_node(node: Node) -> None:
    """Sessions Presence holds for this node that are not live here (they ended during an
    outage) are removed and reported `closed`, on every page of Presence; other nodes'
    sessions are left alone."""
    await node.register("d1")
    await node.register("zz-ghost")
    for index in range(500):
        await node.presence.add(SessionInfo(f"a{index:03d}", f"o{index}", "n9", 1, 1))
    at = node.clock.now_ms() - 4_000
    await node.presence.add(SessionInfo("d1", "g1", "n1", at, at))
    await node.presence.add(SessionInfo("zz-ghost", "g2", "n1", at, at))
    await node.services.sessions.reconcile()
    assert await node.presence.get("d1") is None
    assert await node.presence.get("zz-ghost") is None
    assert await node.presence.count() == 500
    await node.seen("zz-ghost", "device.disconnected")
    assert node.log.data("d1", "device.disconnected") == [
        {"session_id": "g1", "reason": "closed", "connected_for_s": 4.0}
    ]


async def test_start_reconciles_ghosts_a_previous_process_left(node: Node) -> None:
    """A node starting with this node id removes the sessions a previous process left."""
    from tests.unit.services.fakes import make_node, running

    await node.register("d1")
    await node.presence.add(SessionInfo("d1", "old", "n7", 1, 1))
    restarted = make_node(node_id="n7", presence=node.presence, store=node.store, broker=node.broker)
    async with running(restarted):
        assert await node.presence.get("d1") is None
        await node.seen("d1", "device.disconnected")
    assert [d["reason"] for d in node.log.data("d1", "device.disconnected")] == ["closed"]


async def test_flush_presence_touches_sessions_heard_from(node: Node) -> None:
    """flush_presence records last_seen for sessions heard from since the previous flush,
    in one call, and nothing when nobody was heard from."""
    await node.register("d1")
    await node.register("d2")
    heard = await node.connect("d1")
    await node.connect("d2")
    node.clock.advance(3)
    await node.services.tasks.drain(LIMIT_S)  # the periodic flush: nobody heard from yet
    assert node.presence.touches == []
    heard.seen_ms = node.clock.now_ms() - 500
    await node.services.sessions.flush_presence()
    now = node.clock.now_ms()
    assert node.presence.touches == [([("d1", heard.session_id)], now)]
    info = await node.presence.get("d1")
    assert info is not None
    assert info.last_seen_at_ms == now
    await node.services.sessions.flush_presence()
    assert len(node.presence.touches) == 1


async def test_close_all_closes_every_local_session(node: Node) -> None:
    """close_all closes device and client sessions alike with the given code."""
    await node.register("d1")
    device_session = await node.connect("d1")
    client = FakeClientSession(ADMIN, node.clock.now_ms())
    node.services.sessions.opened(client)
    node.services.sessions.close_all(Close.SERVER_SHUTDOWN)
    assert (device_session.closes, client.closes) == ([Close.SERVER_SHUTDOWN], [Close.SERVER_SHUTDOWN])


async def test_end_device_without_a_session_does_nothing(node: Node) -> None:
    """end_device of an offline device records nothing."""
    await node.register("d1")
    await node.services.sessions.end_device("d1", Close.FORBIDDEN, "forbidden")
    await node.settle()
    assert node.log.of("d1") == [("device.registered", 1)]


async def test_end_device_on_another_node(pair: tuple[Node, Node]) -> None:
    """end_device records `device.disconnected` before it returns and closes the session on
    its node with that node's report suppressed."""
    n1, n2 = pair
    await n1.register("d1")
    await n2.seen("d1", "device.registered")
    session = await n2.connect("d1")
    await n1.services.sessions.end_device("d1", Close.FORBIDDEN, "forbidden")
    assert session.closes == [Close.FORBIDDEN]
    assert session.session_id in n2.services.sessions.local.suppressed
    await n1.seen("d1", "device.disconnected")
    assert [d["reason"] for d in n1.log.data("d1", "device.disconnected")] == ["forbidden"]


async def test_device_updated_refreshes_the_sessions_device(node: Node) -> None:
    """A `device.updated` event gives the local session the device's new record."""
    await node.register("d1", name="old")
    session = await node.connect("d1")
    await node.services.registry.update("d1", {"name": "new", "telemetry_schema": {"type": "object"}}, None)
    await until(lambda: session.device.name == "new")
    assert session.device.telemetry_schema == {"type": "object"}
    assert session.device.seq == 2  # as the event's data shows it (the seq before the event)


async def test_a_repeated_end_report_records_nothing_more(node: Node) -> None:
    """A second end report for the same session (the transport reporting twice) records no
    second `device.disconnected`."""
    await node.register("d1")
    session = await node.connect("d1")
    node.services.sessions.device_closed(session, "closed")
    node.services.sessions.device_closed(session, "closed")
    await node.settle()
    assert node.log.count("d1", "device.disconnected") == 1


async def test_reconcile_leaves_a_healthy_session_alone(node: Node) -> None:
    """A local session Presence still holds is neither re-announced nor closed by reconcile."""
    await node.register("d1")
    session = await node.connect("d1")
    await node.services.sessions.reconcile()
    await node.settle()
    assert (session.closes, session.connected_calls) == ([], 1)
    assert node.log.count("d1", "device.connected") == 1
