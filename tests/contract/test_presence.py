"""The Presence contract (fleetwire.presence.base), one suite over memory:// and redis://.

Every test gets a factory of per-node presence objects on one backend: for memory every
node shares one MemoryPresence (the registry of one process), for Redis each node has its
own RedisPresence on one flushed database. Node loss exists only with Redis; memory's
claim_lost always returns [].
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from fleetwire.presence import make_presence
from fleetwire.presence.base import Presence, PresenceUnavailableError, SessionInfo
from fleetwire.presence.memory import MemoryPresence
from fleetwire.presence.redis import RedisPresence
from tests.contract.test_broker import RedisServer

BOUND = 10.0  # seconds any single wait in this module may take


class Nodes:
    """Presence objects of several nodes on one backend; `close` closes each once."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind = kind
        self.url = url
        self.shared = MemoryPresence() if kind == "memory" else None
        self.opened: list[Presence] = []

    async def node(self, node_id: str, claim_batch: int = 500) -> Presence:
        presence: Presence
        if self.shared is not None:
            presence = self.shared
        else:
            assert self.url is not None
            presence = RedisPresence(self.url, node_id, claim_batch=claim_batch)
        if presence not in self.opened:
            with anyio.fail_after(BOUND):
                await presence.start()
            self.opened.append(presence)
        return presence

    async def close(self) -> None:
        with anyio.fail_after(BOUND):
            for presence in self.opened:
                await presence.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[Nodes]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    created = Nodes(request.param, url)
    try:
        yield created
    finally:
        await created.close()


def session(device_id: str, session_id: str, node: str = "n1", at: int = 1_700_000_000_000) -> SessionInfo:
    return SessionInfo(device_id, session_id, node, at, at)


@pytest.mark.anyio
async def test_add_returns_the_previous_session(nodes: Nodes) -> None:
    """add makes a session current and returns the one it replaced (None for the first)."""
    p = await nodes.node("n1")
    first = session("d1", "s1", at=1_700_000_000_001)
    second = session("d1", "s2", at=1_700_000_000_002)
    with anyio.fail_after(BOUND):
        assert await p.add(first) is None
        assert await p.add(second) == first
        assert await p.get("d1") == second
        assert await p.get("nobody") is None
        assert await p.count() == 1


@pytest.mark.anyio
async def test_replacement_across_nodes(nodes: Nodes) -> None:
    """A session added on node B replaces node A's, which every node then sees; A's late
    goodbye does not remove B's session."""
    a = await nodes.node("A")
    b = await nodes.node("B")
    on_a = session("d1", "sa", node="A")
    on_b = session("d1", "sb", node="B", at=1_700_000_000_500)
    with anyio.fail_after(BOUND):
        assert await a.add(on_a) is None
        assert await b.add(on_b) == on_a
        assert await a.get("d1") == on_b
        assert await a.remove("d1", "sa") is False
        assert await b.get("d1") == on_b
        assert await a.count() == 1
        assert await b.remove("d1", "sb") is True
        assert await a.get("d1") is None


@pytest.mark.anyio
async def test_racing_adds_get_distinct_predecessors(nodes: Nodes) -> None:
    """Concurrent adds for one device from three nodes each get a distinct predecessor:
    exactly one gets None and the predecessors plus the final session are every session."""
    presences = [await nodes.node(n) for n in ("n1", "n2", "n3")]
    sessions = [session("d1", f"s{i:02d}", node=f"n{i % 3 + 1}") for i in range(30)]
    with anyio.fail_after(BOUND):
        previous = await asyncio.gather(*(presences[i % 3].add(s) for i, s in enumerate(sessions)))
        final = await presences[0].get("d1")
    assert previous.count(None) == 1
    assert final is not None
    replaced = [p for p in previous if p is not None]
    assert sorted([final, *replaced], key=lambda s: s.session_id) == sessions
    assert len({p.session_id for p in replaced}) == 29


@pytest.mark.anyio
async def test_remove_only_if_current(nodes: Nodes) -> None:
    """remove deletes a session only while it is current and says whether it did."""
    p = await nodes.node("n1")
    with anyio.fail_after(BOUND):
        assert await p.remove("d1", "s1") is False
        await p.add(session("d1", "s1"))
        assert await p.remove("d1", "other") is False
        assert await p.get("d1") == session("d1", "s1")
        assert await p.remove("d1", "s1") is True
        assert await p.remove("d1", "s1") is False
        assert await p.get("d1") is None
        assert await p.count() == 0
        assert await p.list_sessions(10) == []
        assert await p.connected_ids() == frozenset()


@pytest.mark.anyio
async def test_touch_updates_only_current_sessions(nodes: Nodes) -> None:
    """touch sets last_seen of current (device, session) pairs only, in bulk, and never
    creates a session; connected_at stays as it was."""
    p = await nodes.node("n1")
    t0, t1 = 1_700_000_000_000, 1_700_000_123_456
    devices = [f"d{i:04d}" for i in range(1200)]  # more than one Redis touch chunk
    with anyio.fail_after(BOUND):
        for d in devices:
            await p.add(session(d, f"s-{d}", at=t0))
        await p.add(session("d0001", "newer", at=t0))  # d0001's touch below is stale
        pairs = [(d, f"s-{d}") for d in devices] + [("ghost", "s-ghost")]
        await p.touch(pairs, t1)
        await p.touch([], t1)
        after = await p.get_many(devices)
        assert await p.get("ghost") is None
        assert await p.count() == 1200
    assert after["d0001"] == SessionInfo("d0001", "newer", "n1", t0, t0)
    for d in devices:
        if d != "d0001":
            assert after[d] == SessionInfo(d, f"s-{d}", "n1", t0, t1)


@pytest.mark.anyio
async def test_get_many_returns_present_devices_only(nodes: Nodes) -> None:
    """get_many maps each requested device that has a session to it, skipping the others."""
    p = await nodes.node("n1")
    with anyio.fail_after(BOUND):
        for d in ("d1", "d2", "d3"):
            await p.add(session(d, f"s-{d}"))
        assert await p.get_many(["d3", "nope", "d1"]) == {
            "d3": session("d3", "s-d3"),
            "d1": session("d1", "s-d1"),
        }
        assert await p.get_many([]) == {}
        assert await p.get_many(["nope"]) == {}


@pytest.mark.anyio
async def test_list_sessions_pages_in_device_id_order(nodes: Nodes) -> None:
    """list_sessions returns sessions ordered by device id, `limit` at a time, after `after`."""
    a = await nodes.node("A")
    b = await nodes.node("B")
    ids = [f"dev-{i:02d}" for i in range(25)]
    with anyio.fail_after(BOUND):
        for i, d in enumerate(reversed(ids)):
            await (a if i % 2 else b).add(session(d, f"s-{d}", node="A" if i % 2 else "B"))
        pages, after = [], None
        while True:
            page = await a.list_sessions(10, after)
            if not page:
                break
            pages.append([s.device_id for s in page])
            after = page[-1].device_id
        assert pages == [ids[0:10], ids[10:20], ids[20:25]]
        assert [s.device_id for s in await b.list_sessions(3, "dev-10x")] == ids[11:14]
        assert [s.device_id for s in await b.list_sessions(2, "a")] == ids[0:2]
        assert await b.list_sessions(5, "dev-24") == []
        assert await b.list_sessions(0) == []
        whole = await a.list_sessions(100)
    assert [s.device_id for s in whole] == ids
    assert whole[3] == await a.get(ids[3])


@pytest.mark.anyio
async def test_count_and_connected_ids(nodes: Nodes) -> None:
    """count and connected_ids cover every node's current sessions."""
    a = await nodes.node("A")
    b = await nodes.node("B")
    with anyio.fail_after(BOUND):
        assert await a.count() == 0
        await a.add(session("d1", "s1", node="A"))
        await b.add(session("d2", "s2", node="B"))
        await b.add(session("d1", "s3", node="B"))
        assert await a.count() == 2
        assert await a.connected_ids() == frozenset({"d1", "d2"})
        await a.remove("d2", "s2")
        assert await b.count() == 1
        assert await b.connected_ids() == frozenset({"d1"})


@pytest.mark.anyio
async def test_claim_lost_without_lost_nodes_returns_nothing(nodes: Nodes) -> None:
    """With every node heartbeating (and always with memory) claim_lost returns []."""
    a = await nodes.node("A")
    b = await nodes.node("B")
    with anyio.fail_after(BOUND):
        await a.heartbeat("A", 30)
        await b.heartbeat("B", 30)
        await a.add(session("d1", "s1", node="A"))
        await b.add(session("d2", "s2", node="B"))
        assert await a.claim_lost("A") == []
        assert await b.claim_lost("B") == []
        assert await a.count() == 2
        await a.ping()


@pytest.mark.anyio
async def test_make_presence_picks_the_backend_by_url() -> None:
    """memory:// gives a MemoryPresence, redis:// a RedisPresence, anything else ValueError."""
    assert type(make_presence("memory://", "n1")) is MemoryPresence
    presence = make_presence("redis://127.0.0.1:6379/4", "n1")
    try:
        assert type(presence) is RedisPresence
    finally:
        with anyio.fail_after(BOUND):
            await presence.close()
    with pytest.raises(ValueError, match="unsupported presence URL scheme"):
        make_presence("etcd://x", "n1")


# -- Redis only ---------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.anyio
async def test_redis_claim_lost_exactly_once_with_racing_claimants(redis_url: str) -> None:
    """The sessions of a node whose heartbeat lapsed go to exactly one of three racing
    claimants; sessions moved off it, live nodes' sessions and the claimant's own are kept."""
    nodes = Nodes("redis", redis_url)
    try:
        dead = await nodes.node("dead", claim_batch=3)
        live = await nodes.node("live", claim_batch=3)
        claimants = [await nodes.node(f"c{i}", claim_batch=3) for i in range(3)]
        lost = [session(f"d{i:02d}", f"s{i:02d}", node="dead") for i in range(40)]
        moved = session("d00", "moved", node="live")
        kept_live = session("l1", "sl", node="live")
        with anyio.fail_after(BOUND):
            await live.heartbeat("live", 30)
            for c, name in zip(claimants, ("c0", "c1", "c2"), strict=True):
                await c.heartbeat(name, 30)
            for s in lost:
                await dead.add(s)
            await live.add(moved)  # d00 moved to a live node: not lost
            await live.add(kept_live)
            assert await dead.remove("d01", "s01") is True  # gone before the loss
            await dead.heartbeat("dead", 0.05)
        expected = lost[2:]
        assert isinstance(dead, RedisPresence)
        with anyio.fail_after(BOUND):
            await poll_until(lambda: lapsed(dead, "dead"))
            results = await asyncio.gather(
                *(c.claim_lost(f"c{i}") for i, c in enumerate(claimants)), dead.claim_lost("dead")
            )
        assert results[3] == []  # a node never claims itself
        claimed = [s for r in results for s in r]
        assert len(claimed) == len(expected)
        assert sorted(claimed, key=lambda s: s.device_id) == expected
        with anyio.fail_after(BOUND):
            assert await live.get_many([s.device_id for s in expected]) == {}
            assert await live.get("d00") == moved
            assert await live.count() == 2
            assert await live.connected_ids() == frozenset({"d00", "l1"})
            assert [s.device_id for s in await live.list_sessions(10)] == ["d00", "l1"]
            again = await asyncio.gather(*(c.claim_lost(f"c{i}") for i, c in enumerate(claimants)))
        assert again == [[], [], []]
    finally:
        await nodes.close()


@pytest.mark.redis
@pytest.mark.anyio
async def test_redis_heartbeat_again_prevents_a_claim(redis_url: str) -> None:
    """A node that heartbeats again before anyone claims it keeps its sessions."""
    nodes = Nodes("redis", redis_url)
    try:
        slow = await nodes.node("slow")
        other = await nodes.node("other")
        assert isinstance(slow, RedisPresence)
        with anyio.fail_after(BOUND):
            await slow.add(session("d1", "s1", node="slow"))
            await slow.heartbeat("slow", 0.05)
            await poll_until(lambda: lapsed(slow, "slow"))
            await slow.heartbeat("slow", 30)
            assert await slow.node_alive("slow") is True
            assert await other.claim_lost("other") == []
            assert await other.get("d1") == session("d1", "s1", node="slow")
    finally:
        await nodes.close()


async def lapsed(presence: RedisPresence, node: str) -> bool:
    return not await presence.node_alive(node)


async def poll_until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll a condition nothing signals (a heartbeat key's TTL running out), bounded."""
    with anyio.fail_after(BOUND):
        while True:
            if await check():
                return
            await asyncio.sleep(0.01)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port  # nothing listens once the socket is closed


@pytest.mark.anyio
async def test_redis_unreachable_raises_presence_unavailable() -> None:
    """Every operation against an unreachable Redis raises PresenceUnavailableError quickly."""
    presence = RedisPresence(
        f"redis://127.0.0.1:{_closed_port()}/0", "n1", socket_timeout=0.5, connect_timeout=0.5
    )
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: presence.add(session("d1", "s1")),
        lambda: presence.remove("d1", "s1"),
        lambda: presence.touch([("d1", "s1")], 1),
        lambda: presence.get("d1"),
        lambda: presence.get_many(["d1"]),
        lambda: presence.list_sessions(10),
        lambda: presence.count(),
        lambda: presence.connected_ids(),
        lambda: presence.heartbeat("n1", 1),
        lambda: presence.claim_lost("n1"),
        lambda: presence.ping(),
    ]
    try:
        for call in calls:
            with anyio.fail_after(3.0), pytest.raises(PresenceUnavailableError):
                await call()
    finally:
        with anyio.fail_after(BOUND):
            await presence.close()


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    """A private redis-server (see test_broker.RedisServer) that the test may kill."""
    server = RedisServer()
    try:
        yield server
    finally:
        await server.kill()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_redis_restart_raises_then_recovers(private_redis: RedisServer) -> None:
    """While Redis is down operations raise PresenceUnavailableError; after a restart (an
    empty server, no persistence) the very first call succeeds on fresh connections."""
    await private_redis.start()
    presence = RedisPresence(private_redis.url, "n1", socket_timeout=0.5, connect_timeout=0.5)
    try:
        with anyio.fail_after(BOUND):
            assert await presence.add(session("d1", "s1")) is None
            assert await presence.count() == 1
        await private_redis.kill()
        with anyio.fail_after(3.0):
            with pytest.raises(PresenceUnavailableError):
                await presence.get("d1")
            with pytest.raises(PresenceUnavailableError):
                await presence.add(session("d1", "s2"))
        await private_redis.start()
        with anyio.fail_after(BOUND):
            assert await presence.get("d1") is None
            assert await presence.add(session("d1", "s3")) is None
            assert await presence.remove("d1", "s3") is True
            await presence.ping()
    finally:
        with anyio.fail_after(BOUND):
            await presence.close()
