"""The Broker contract (fleetwire.broker.base), one suite over memory:// and redis://.

Every node-level test runs against both backends: for memory the nodes share one
MemoryBroker object (how several nodes live in one process), for Redis each node is its own
RedisBroker on one URL. Redis-only tests cover what memory cannot have: database isolation,
the wire format, an outage of a real (second, private) redis-server, and start while down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
import orjson
import pytest

from fleetwire.broker import make_broker
from fleetwire.broker.base import Broker, BrokerUnavailableError, EncodedEvent, Publishable, Published
from fleetwire.broker.memory import MemoryBroker
from fleetwire.broker.redis import RedisBroker, decode_batch, encode_batch
from fleetwire.domain.events import RecordRun
from fleetwire.domain.telemetry import Record
from tests.conftest import missing

BOUND = 10.0  # seconds any single wait in this module may take


class Recorder:
    """A node's handlers: records what arrives and lets a test wait for it (bounded)."""

    def __init__(self) -> None:
        self.events: list[Published] = []
        self.batches: list[list[Published]] = []
        self.messages: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def on_events(self, batch: Sequence[Publishable]) -> None:
        """A run of record events is kept as its events (a node's own may arrive as the run)."""
        events = [e for item in batch for e in (item.events() if isinstance(item, RecordRun) else [item])]
        self.batches.append(events)
        self.events.extend(events)
        self._changed.set()

    def on_message(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool], within_s: float = BOUND) -> None:
        with anyio.fail_after(within_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def has_event(self, device_id: str) -> bool:
        return any(e.device_id == device_id for e in self.events)

    def has_events(self, count: int) -> bool:
        return len(self.events) >= count

    def has_message(self, marker: str) -> bool:
        return any(m.get("marker") == marker for m in self.messages)


class Cluster:
    """Nodes started on one backend; `close` closes every broker once."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind = kind
        self.url = url
        self.shared = MemoryBroker() if kind == "memory" else None
        self.brokers: list[Broker] = []

    def new_broker(self) -> Broker:
        if self.shared is not None:
            return self.shared
        assert self.url is not None
        return RedisBroker(self.url)

    async def node(self, node_id: str) -> tuple[Broker, Recorder]:
        broker = self.new_broker()
        recorder = Recorder()
        with anyio.fail_after(BOUND):
            await broker.start(node_id, recorder.on_events, recorder.on_message)
        if broker not in self.brokers:
            self.brokers.append(broker)
        return broker, recorder

    async def close(self) -> None:
        with anyio.fail_after(BOUND):
            for broker in self.brokers:
                await broker.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    nodes = Cluster(request.param, url)
    try:
        yield nodes
    finally:
        await nodes.close()


def make_events(prefix: str, count: int, start: int = 0) -> list[Published]:
    """Distinct events whose payloads are real event frames with awkward characters."""
    return [
        EncodedEvent(
            f"{prefix}-{i % 7}",
            i,
            ("device.connected", "device.status", "device.telemetry", "command.updated", "device.updated")[
                i % 5
            ],
            ("presence", "status", "telemetry", "command", "registry")[i % 5],
            orjson.dumps(
                {"type": "event", "event": "device.status", "seq": i, "data": {"s": 'ü "q" \\n\x00'}}
            ),
        )
        for i in range(start, start + count)
    ]


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# -- both backends --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_publish_reaches_every_node_exactly_once(cluster: Cluster) -> None:
    """A batch reaches on_events of every started node, the publisher included, once."""
    a, rec_a = await cluster.node("a")
    _, rec_b = await cluster.node("b")
    batch = make_events(unique("d"), 3)
    marker = EncodedEvent(unique("marker"), 0, "device.status", "status", b"{}")
    with anyio.fail_after(BOUND):
        await a.publish(batch)
        await a.publish([marker])
    for rec in (rec_a, rec_b):
        await rec.wait_until(functools.partial(rec.has_event, marker.device_id))
        # The marker was published after the batch by the same node, so any duplicate of the
        # batch would have arrived before it.
        assert rec.batches == [batch, [marker]]
        assert rec.messages == []
        # What every hub listener reads: the payload's `data`, decoded once per event.
        assert [e.data for e in rec.batches[0]] == [{"s": 'ü "q" \\n\x00'}] * 3
        assert rec.batches[0][0].data is rec.batches[0][0].data


@pytest.mark.anyio
async def test_a_run_of_records_reaches_every_node_as_its_events(cluster: Cluster) -> None:
    """A RecordRun (a telemetry write's events, not yet made) is published like the events it
    stands for: every node gets them, in order, with the payload an Event would have."""
    a, rec_a = await cluster.node("a")
    _, rec_b = await cluster.node("b")
    device = unique("d")
    run = RecordRun(
        device, 4, [Record(1_700_000_000_000, {"t": 1.5}), Record(1_700_000_000_001, {"on": True})]
    )
    marker = EncodedEvent(unique("marker"), 0, "device.status", "status", b"{}")
    with anyio.fail_after(BOUND):
        await a.publish([run])
        await a.publish([marker])
    for rec in (rec_a, rec_b):
        await rec.wait_until(functools.partial(rec.has_event, marker.device_id))
        got = [e for e in rec.events if e.device_id == device]
        assert [(e.seq, e.name, e.event_class) for e in got] == [
            (5, "device.telemetry", "telemetry"),
            (6, "device.telemetry", "telemetry"),
        ]
        assert [orjson.loads(e.payload) for e in got] == [e.public() for e in run.events()]


@pytest.mark.anyio
async def test_order_preserved_for_one_publisher(cluster: Cluster) -> None:
    """1000 events in batches of varied sizes arrive at every node in publish order."""
    _, rec_a = await cluster.node("a")
    b, rec_b = await cluster.node("b")
    events = make_events(unique("d"), 1000)
    sizes = [1, 9, 40, 150, 300, 500]
    assert sum(sizes) == len(events)
    batches, offset = [], 0
    for size in sizes:
        batches.append(events[offset : offset + size])
        offset += size
    with anyio.fail_after(BOUND):
        for batch in batches:
            await b.publish(batch)
    for rec in (rec_a, rec_b):
        await rec.wait_until(functools.partial(rec.has_events, 1000))
        assert rec.batches == batches
        assert [e.payload for e in rec.events] == [e.payload for e in events]


@pytest.mark.anyio
async def test_concurrent_publishes_keep_call_order(cluster: Cluster) -> None:
    """Publishes started concurrently by one node arrive in the order they were called."""
    a, _ = await cluster.node("a")
    _, rec_b = await cluster.node("b")
    events = make_events(unique("d"), 200)
    with anyio.fail_after(BOUND):
        await asyncio.gather(*(a.publish([e]) for e in events))
    await rec_b.wait_until(lambda: len(rec_b.events) >= 200)
    assert rec_b.events == events


@pytest.mark.anyio
async def test_send_reaches_only_the_addressed_node(cluster: Cluster) -> None:
    """send(node, msg) hands the dict to on_message of that node and of no other."""
    a, rec_a = await cluster.node("a")
    _, rec_b = await cluster.node("b")
    _, rec_c = await cluster.node("c")
    message = {"type": "deliver", "command_id": "c-1", "params": {"x": [1, 2.5, None, "é"]}}
    with anyio.fail_after(BOUND):
        await a.send("b", message)
    await rec_b.wait_until(lambda: len(rec_b.messages) >= 1)
    marker_a, marker_c = unique("m"), unique("m")
    with anyio.fail_after(BOUND):
        await a.send("a", {"marker": marker_a})
        await a.send("c", {"marker": marker_c})
    await rec_a.wait_until(lambda: rec_a.has_message(marker_a))
    await rec_c.wait_until(lambda: rec_c.has_message(marker_c))
    assert rec_b.messages == [message]
    assert rec_a.messages == [{"marker": marker_a}]
    assert rec_c.messages == [{"marker": marker_c}]
    assert rec_a.events == rec_b.events == rec_c.events == []


@pytest.mark.anyio
async def test_send_to_absent_node_is_dropped(cluster: Cluster) -> None:
    """A message to a node that is not running is dropped without error or side effect."""
    a, rec_a = await cluster.node("a")
    _, rec_b = await cluster.node("b")
    with anyio.fail_after(BOUND):
        await a.send("ghost", {"marker": "lost"})
        await a.send("b", {"marker": "kept"})
    await rec_b.wait_until(lambda: rec_b.has_message("kept"))
    assert rec_b.messages == [{"marker": "kept"}]
    assert rec_a.messages == []


@pytest.mark.anyio
async def test_handler_exception_does_not_stop_delivery(cluster: Cluster) -> None:
    """A handler that raises is logged; later batches and messages still arrive."""
    a, _ = await cluster.node("a")
    broker_b = cluster.new_broker()
    received: list[Published] = []
    messages: list[dict[str, Any]] = []
    done = asyncio.Event()

    def on_events(batch: Sequence[Published]) -> None:
        received.extend(batch)
        if batch[0].seq == 0:
            raise RuntimeError("handler bug")
        done.set()

    def on_message(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["n"] == 0:
            raise RuntimeError("handler bug")

    with anyio.fail_after(BOUND):
        await broker_b.start("b", on_events, on_message)
    if broker_b not in cluster.brokers:
        cluster.brokers.append(broker_b)
    events = make_events(unique("d"), 2)
    with anyio.fail_after(BOUND):
        await a.send("b", {"n": 0})
        await a.send("b", {"n": 1})
        await a.publish(events[:1])
        await a.publish(events[1:])
        await done.wait()
    assert received == events
    assert messages == [{"n": 0}, {"n": 1}]


@pytest.mark.anyio
async def test_close_stops_delivery(cluster: Cluster) -> None:
    """After close a node receives nothing; a closed Redis broker refuses to publish."""
    a, rec_a = await cluster.node("a")
    b, rec_b = await cluster.node("b")
    with anyio.fail_after(BOUND):
        await b.close()
        await b.close()  # idempotent
    marker = EncodedEvent(unique("marker"), 0, "device.status", "status", b"{}")
    if cluster.kind == "memory":
        # One shared object: closing it detaches every node.
        with anyio.fail_after(BOUND):
            await a.publish([marker])
            await a.send("a", {"marker": "x"})
        assert rec_a.events == rec_b.events == []
        assert rec_a.messages == rec_b.messages == []
        return
    with anyio.fail_after(BOUND):
        await a.publish([marker])
        await a.send("b", {"marker": "to-closed"})
    await rec_a.wait_until(lambda: rec_a.has_event(marker.device_id))
    assert rec_a.events == [marker]
    assert rec_b.events == []
    assert rec_b.messages == []
    with anyio.fail_after(BOUND):
        with pytest.raises(BrokerUnavailableError):
            await b.publish([marker])
        with pytest.raises(BrokerUnavailableError):
            await b.ping()


@pytest.mark.anyio
async def test_ping_succeeds_while_reachable(cluster: Cluster) -> None:
    """ping returns None while the backend is reachable, and delivery goes on after it."""
    a, rec_a = await cluster.node("a")
    with anyio.fail_after(BOUND):
        await a.ping()
        await a.send("a", {"marker": "after-ping"})
    await rec_a.wait_until(lambda: rec_a.has_message("after-ping"))
    assert rec_a.messages == [{"marker": "after-ping"}]


# -- factory and wire format --------------------------------------------------------------


@pytest.mark.anyio
async def test_make_broker_picks_the_backend_by_url() -> None:
    """memory:// gives a MemoryBroker, redis:// a RedisBroker, anything else ValueError."""
    assert type(make_broker("memory://")) is MemoryBroker
    broker = make_broker("redis://127.0.0.1:6379/3")
    try:
        assert type(broker) is RedisBroker
        assert broker.events_channel == "fleetwire:3:events"
        assert broker.node_channel("n1") == "fleetwire:3:node:n1"
    finally:
        with anyio.fail_after(BOUND):
            await broker.close()
    with pytest.raises(ValueError, match="unsupported broker URL scheme"):
        make_broker("kafka://x")


def test_wire_format_round_trip_keeps_payload_bytes() -> None:
    """encode_batch/decode_batch round-trip exactly, payload bytes verbatim, even empty ones."""
    batch = [
        *make_events("d", 3),
        EncodedEvent("e", 9, "device.registered", "registry", b""),
        EncodedEvent("f", 1, "x", "x", b"\xff"),
    ]
    data = encode_batch(batch)
    assert decode_batch(data) == batch
    assert data.endswith(b"".join(p.payload for p in batch))
    assert decode_batch(encode_batch([])) == []
    for bad in (b"", b"FW\x01", b"nope" * 4, data[:-1], data + b"x", b"FW\x01\x00\x00\x00\x02[]x"):
        with pytest.raises(ValueError, match=r"batch|payload|bytes|header|char|unexpected|input"):
            decode_batch(bad)


# -- Redis only ---------------------------------------------------------------------------


def _other_db_url(url: str) -> str:
    base, db = url.rsplit("/", 1)
    return f"{base}/{int(db) % 15 + 1}"


@pytest.mark.redis
@pytest.mark.anyio
async def test_redis_databases_are_isolated(redis_url: str) -> None:
    """Two clusters on different database numbers of one Redis never see each other's traffic."""
    other_url = _other_db_url(redis_url)
    assert other_url != redis_url
    here, there = Cluster("redis", redis_url), Cluster("redis", other_url)
    try:
        a, rec_a = await here.node("n1")
        b, rec_b = await there.node("n1")  # same node id, other cluster
        mine, theirs = unique("mine"), unique("theirs")
        with anyio.fail_after(BOUND):
            await a.publish([EncodedEvent(mine, 1, "device.status", "status", b"{}")])
            await a.send("n1", {"marker": mine})
            await b.publish([EncodedEvent(theirs, 1, "device.status", "status", b"{}")])
            await b.send("n1", {"marker": theirs})
        await rec_a.wait_until(lambda: rec_a.has_event(mine) and rec_a.has_message(mine))
        await rec_b.wait_until(lambda: rec_b.has_event(theirs) and rec_b.has_message(theirs))
        assert not rec_a.has_event(theirs)
        assert not rec_a.has_message(theirs)
        assert not rec_b.has_event(mine)
        assert not rec_b.has_message(mine)
    finally:
        await here.close()
        await there.close()


@pytest.mark.redis
@pytest.mark.anyio
async def test_redis_garbage_on_a_channel_is_skipped(redis_url: str) -> None:
    """A malformed message on the events or node channel is logged and skipped."""
    import redis.asyncio as aioredis

    nodes = Cluster("redis", redis_url)
    raw = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        a, rec_a = await nodes.node("a")
        assert isinstance(a, RedisBroker)
        with anyio.fail_after(BOUND):
            await raw.publish(a.events_channel, b"not a batch")
            await raw.publish(a.node_channel("a"), b"[1, 2]")
            await raw.publish(a.node_channel("a"), b"{broken")
            await a.publish(make_events("d", 1))
            await a.send("a", {"marker": "ok"})
        await rec_a.wait_until(lambda: rec_a.has_message("ok"))
        assert rec_a.events == make_events("d", 1)
        assert rec_a.messages == [{"marker": "ok"}]
    finally:
        await raw.aclose()
        await nodes.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A private redis-server on a free port, which a test may kill and restart."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            missing("redis-server is not installed", "the outage test starts its own")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await poll_until(self._answers)

    async def _answers(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            return await reader.readline() == b"+PONG\r\n"
        except OSError:
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with anyio.fail_after(BOUND):
                await self.proc.wait()
        self.proc = None


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        await server.kill()


def _fast_broker(url: str, reconnects: list[str], name: str) -> RedisBroker:
    return RedisBroker(
        url,
        on_reconnect=lambda: reconnects.append(name),
        socket_timeout=0.5,
        connect_timeout=0.5,
        health_interval=0.5,
        backoff_base=0.02,
        backoff_cap=0.2,
    )


async def poll_until(check: Callable[[], Awaitable[bool]], within_s: float = BOUND) -> None:
    """Poll a condition nothing signals (a process listening, connection state), bounded."""
    with anyio.fail_after(within_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.01)


def state(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return predicate()

    return check


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_redis_outage_and_recovery(private_redis: RedisServer) -> None:
    """Killing Redis makes publish/send/ping fail fast; after a restart the nodes resubscribe,
    fire on_reconnect once each, and delivery resumes."""
    await private_redis.start()
    reconnects: list[str] = []
    a = _fast_broker(private_redis.url, reconnects, "a")
    b = _fast_broker(private_redis.url, reconnects, "b")
    rec_a, rec_b = Recorder(), Recorder()
    try:
        with anyio.fail_after(BOUND):
            await a.start("a", rec_a.on_events, rec_a.on_message)
            await b.start("b", rec_b.on_events, rec_b.on_message)
        assert a.connected
        assert b.connected
        before = make_events("before", 2)
        with anyio.fail_after(BOUND):
            await a.publish(before)
        await rec_b.wait_until(lambda: len(rec_b.events) == 2)

        await private_redis.kill()
        await poll_until(state(lambda: not a.connected and not b.connected), within_s=3.0)
        started = time.monotonic()
        with anyio.fail_after(3.0):
            with pytest.raises(BrokerUnavailableError):
                await a.publish(make_events("lost", 1))
            with pytest.raises(BrokerUnavailableError):
                await a.send("b", {"marker": "lost"})
            with pytest.raises(BrokerUnavailableError):
                await b.ping()
        assert time.monotonic() - started < 3.0
        assert reconnects == []

        await private_redis.start()
        await poll_until(state(lambda: a.connected and b.connected and len(reconnects) == 2))
        assert sorted(reconnects) == ["a", "b"]
        after = make_events("after", 3)
        with anyio.fail_after(BOUND):
            await a.ping()
            await a.publish(after)
            await a.send("b", {"marker": "back"})
        await rec_b.wait_until(lambda: len(rec_b.events) == 5 and rec_b.has_message("back"))
        await rec_a.wait_until(lambda: len(rec_a.events) == 5)
        assert rec_a.events == rec_b.events == before + after
        assert rec_b.messages == [{"marker": "back"}]
        assert sorted(reconnects) == ["a", "b"]
    finally:
        with anyio.fail_after(BOUND):
            await a.close()
            await b.close()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_redis_start_while_down_connects_later(private_redis: RedisServer) -> None:
    """start() against an unreachable Redis returns promptly, not connected; once Redis is up
    the node subscribes on its own, fires on_reconnect (an async hook works too) and receives."""
    reconnected = asyncio.Event()

    async def hook() -> None:
        reconnected.set()

    broker = RedisBroker(
        private_redis.url,
        on_reconnect=hook,
        socket_timeout=0.5,
        connect_timeout=0.5,
        health_interval=0.5,
        backoff_base=0.02,
        backoff_cap=0.2,
    )
    rec = Recorder()
    try:
        with anyio.fail_after(3.0):
            await broker.start("a", rec.on_events, rec.on_message)
        assert broker.connected is False
        with anyio.fail_after(3.0), pytest.raises(BrokerUnavailableError):
            await broker.publish(make_events("d", 1))
        await private_redis.start()
        with anyio.fail_after(BOUND):
            await reconnected.wait()
        assert broker.connected is True
        with anyio.fail_after(BOUND):
            await broker.publish(make_events("d", 2))
        await rec.wait_until(lambda: len(rec.events) == 2)
        assert rec.events == make_events("d", 2)
    finally:
        with anyio.fail_after(BOUND):
            await broker.close()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_redis_hung_server_is_detected_and_survived(private_redis: RedisServer) -> None:
    """An idle but healthy link stays up; a hung Redis (SIGSTOP) is noticed by the health
    PING, publish/ping fail within their timeouts, close fails a publish stuck in flight at
    once, and after SIGCONT the node resubscribes, fires on_reconnect and receives again."""
    await private_redis.start()
    reconnects: list[str] = []
    a = RedisBroker(
        private_redis.url,
        on_reconnect=lambda: reconnects.append("a"),
        socket_timeout=0.3,
        connect_timeout=0.3,
        health_interval=0.05,
        backoff_base=0.02,
        backoff_cap=0.2,
    )
    slow = RedisBroker(private_redis.url, socket_timeout=5.0, connect_timeout=5.0)
    rec = Recorder()
    try:
        with anyio.fail_after(BOUND):
            await a.start("a", rec.on_events, rec.on_message)
            await slow.ping()
        # Idle for ten health intervals: every PING is answered, nothing reconnects. This
        # sleep is the observation window itself, not a wait for something to happen.
        await asyncio.sleep(0.5)
        assert a.connected is True
        assert reconnects == []

        private_redis.pause()
        await poll_until(state(lambda: not a.connected), within_s=3.0)
        started = time.monotonic()
        with anyio.fail_after(3.0):
            with pytest.raises(BrokerUnavailableError):
                await a.publish(make_events("lost", 1))
            with pytest.raises(BrokerUnavailableError):
                await a.ping()
        assert time.monotonic() - started < 2.5

        stuck = asyncio.create_task(slow.publish(make_events("stuck", 1)))
        # Wait (white-box) until the writer has taken it off its queue: it is then in flight,
        # blocked on the hung server for up to 5 s.
        await poll_until(state(lambda: bool(slow._in_flight)), within_s=1.0)
        with anyio.fail_after(1.0):
            await slow.close()
            with pytest.raises(BrokerUnavailableError):
                await stuck

        private_redis.resume()
        await poll_until(state(lambda: a.connected and reconnects == ["a"]))
        after = make_events("after", 2)
        with anyio.fail_after(BOUND):
            await a.publish(after)
        await rec.wait_until(functools.partial(rec.has_events, 2))
        assert rec.events == after
        assert reconnects == ["a"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            private_redis.resume()
        with anyio.fail_after(BOUND):
            await a.close()
            await slow.close()
