"""Memory seams and recording fakes for the services layer: no socket, no real clock.

A `Node` is one fleetwire node built by `build_services` over a MemoryStore, a MemoryBroker,
a presence and a ManualClock; several nodes share a broker, a database and a presence to
form a cluster in one process. Every wait is a bounded number of event-loop iterations.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

from fleetwire.app import build_services
from fleetwire.auth.principal import Principal, Role, TokenVerifier, UnknownKeyError
from fleetwire.broker.base import Published
from fleetwire.broker.memory import MemoryBroker
from fleetwire.domain.close import Close
from fleetwire.domain.devices import Device
from fleetwire.domain.events import EVENT_CLASSES
from fleetwire.events.hub import Subscription
from fleetwire.presence.base import PresenceUnavailableError, SessionInfo
from fleetwire.presence.memory import MemoryPresence
from fleetwire.services.container import Services
from fleetwire.services.local import LocalDeviceSession, LocalSession
from fleetwire.services.subscriptions import HoldingSubscriber
from fleetwire.settings import Settings
from fleetwire.store.base import StoreUnavailableError, WriteOp, WriteResult
from fleetwire.store.memory import MemoryDatabase, MemoryStore
from tests.clock import ManualClock

LIMIT_S = 5.0  # the bound of every await in these tests
STEPS = 5000  # event-loop iterations `until` grants a condition
HOUR_MS = 3_600_000

ADMIN = Principal("alice", Role.ADMIN, 2**62)
OPERATOR = Principal("olga", Role.OPERATOR, 2**62)
VIEWER = Principal("victor", Role.VIEWER, 2**62)


async def until(condition: Callable[[], bool], *, steps: int = STEPS) -> None:
    """Let other tasks run (`sleep(0)` only) until `condition` holds; fail after `steps`."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"condition still false after {steps} event-loop iterations")


# -- seams with a switch ---------------------------------------------------------------------
class FlakyStore(MemoryStore):
    """A MemoryStore whose `write` fails as an outage while `down` is set."""

    def __init__(self, database: MemoryDatabase | None = None, *, history: int = 1000) -> None:
        super().__init__(database, history=history)
        self.down = False
        # Devices `get_device` still finds although they are gone: one deleted between a
        # service's read and its write.
        self.phantoms: set[str] = set()

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        if self.down:
            raise StoreUnavailableError("connection refused by db.internal:5432 (password=hunter2)")
        return await super().write(ops)

    async def get_device(self, device_id: str) -> Device | None:
        if device_id in self.phantoms:
            await asyncio.sleep(0)
            return Device(device_id)
        return await super().get_device(device_id)


class FakePresence(MemoryPresence):
    """MemoryPresence with node leases on a ManualClock (for `claim_lost`), recorded
    `touch` calls and switches that make `add` or `get_many` fail as an outage."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self._clock = clock
        self.leases: dict[str, int] = {}  # node -> lease end (ms)
        self.touches: list[tuple[list[tuple[str, str]], int]] = []
        self.add_down = False
        self.get_many_down = False

    async def add(self, session: SessionInfo) -> SessionInfo | None:
        if self.add_down:
            raise PresenceUnavailableError("presence is down")
        return await super().add(session)

    async def get_many(self, device_ids: Sequence[str]) -> dict[str, SessionInfo]:
        if self.get_many_down:
            raise PresenceUnavailableError("presence is down")
        return await super().get_many(device_ids)

    async def touch(self, sessions: Sequence[tuple[str, str]], at_ms: int) -> None:
        self.touches.append((list(sessions), at_ms))
        await super().touch(sessions, at_ms)

    async def heartbeat(self, node: str, ttl_s: float) -> None:
        self.leases[node] = self._clock.now_ms() + int(ttl_s * 1000)

    async def claim_lost(self, node: str) -> list[SessionInfo]:
        now = self._clock.now_ms()
        lapsed = {n for n, until_ms in self.leases.items() if until_ms < now and n != node}
        lost = [s for s in await self.list_sessions(10**6) if s.node in lapsed]
        for session in lost:
            await self.remove(session.device_id, session.session_id)
        for n in lapsed:
            del self.leases[n]
        return lost


class FakeVerifier:
    """Tokens are looked up in `tokens`; one in `rotated` names a key the verifier learns
    only from `refresh_keys` (a JWKS rotation)."""

    def __init__(self) -> None:
        self.tokens: dict[str, Principal] = {}
        self.rotated: set[str] = set()
        self.refreshes = 0

    def verify(self, token: str) -> Principal:
        if token in self.rotated:
            raise UnknownKeyError("unknown kid")
        try:
            return self.tokens[token]
        except KeyError:
            from fleetwire.auth.principal import AuthError

            raise AuthError("bad signature") from None

    async def refresh_keys(self) -> bool:
        self.refreshes += 1
        self.rotated.clear()
        return True


# -- sessions ---------------------------------------------------------------------------------
_session_ids = itertools.count(1)


class FakeClientSession:
    """A client session that records what services do to it."""

    def __init__(self, principal: Principal, connected_at_ms: int, session_id: str | None = None) -> None:
        self.session_id = session_id or f"c{next(_session_ids)}"
        self.connected_at_ms = connected_at_ms
        self._principal = principal
        self.sent: list[bytes] = []
        self.closes: list[Close] = []
        self.heartbeats: list[int] = []

    @property
    def principal(self) -> Principal:
        return self._principal

    def send(self, payload: bytes) -> None:
        self.sent.append(payload)

    def close(self, code: Close) -> None:
        self.closes.append(code)

    def heartbeat(self, now_ms: int) -> None:
        self.heartbeats.append(now_ms)

    def messages(self) -> list[dict[str, Any]]:
        return [orjson.loads(p) for p in self.sent]


class FakeDeviceSession(FakeClientSession):
    """A device session recording sends, closes, heartbeats and `connected()` calls."""

    def __init__(self, device: Device, connected_at_ms: int, session_id: str | None = None) -> None:
        super().__init__(
            Principal(device.id, Role.DEVICE, connected_at_ms + HOUR_MS),
            connected_at_ms,
            session_id or f"s{next(_session_ids)}",
        )
        self.device_id = device.id
        self.device = device
        self.seen_ms = connected_at_ms
        self.connected_calls = 0
        self.transport = "websocket"

    @property
    def last_seen_ms(self) -> int:
        return self.seen_ms

    def connected(self) -> None:
        self.connected_calls += 1


class FakeSubscriber:
    """A client connection as the hub and SubscriptionService see it."""

    def __init__(self, principal: Principal) -> None:
        self.subscriptions: dict[str, Subscription] = {}
        self.current = principal
        self.frames: list[tuple[str, int, bytes]] = []
        self.held: list[list[str]] = []
        self.released: list[tuple[str, int]] = []
        self._count = 0
        self.live = None  # every delivery through `deliver`

    @property
    def principal(self) -> Principal:
        return self.current

    def deliver(self, device_id: str, seq: int, frame: bytes) -> None:
        self.frames.append((device_id, seq, frame))

    def deliver_many(self, deliveries: list[tuple[str, int, bytes]]) -> None:
        self.frames.extend(deliveries)

    def next_subscription_id(self) -> str:
        self._count += 1
        return f"sub-{self._count}"

    def hold(self, device_ids: list[str]) -> None:
        self.held.append(list(device_ids))

    def release(self, device_id: str, replayed_to: int) -> None:
        self.released.append((device_id, replayed_to))

    def seqs(self, device_id: str) -> list[int]:
        return [seq for d, seq, _ in self.frames if d == device_id]


_client: type[LocalSession] = FakeClientSession
_device: type[LocalDeviceSession] = FakeDeviceSession
_subscriber: type[HoldingSubscriber] = FakeSubscriber
_verifier: type[TokenVerifier] = FakeVerifier
ALL_CLASSES = frozenset(EVENT_CLASSES)


# -- nodes ------------------------------------------------------------------------------------
class EventLog:
    """A hub listener: every event this node's hub delivered, in delivery order."""

    def __init__(self) -> None:
        self.events: list[Published] = []

    def __call__(self, event: Published) -> None:
        self.events.append(event)

    def of(self, device_id: str) -> list[tuple[str, int]]:
        return [(e.name, e.seq) for e in self.events if e.device_id == device_id]

    def data(self, device_id: str, name: str) -> list[dict[str, Any]]:
        return [
            orjson.loads(e.payload)["data"]
            for e in self.events
            if e.device_id == device_id and e.name == name
        ]

    def count(self, device_id: str, name: str) -> int:
        return sum(1 for e in self.events if e.device_id == device_id and e.name == name)


@dataclass
class Node:
    services: Services
    clock: ManualClock
    store: FlakyStore
    broker: MemoryBroker
    presence: FakePresence
    verifier: FakeVerifier
    log: EventLog = field(default_factory=EventLog)
    _sentinels: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def register(self, device_id: str, **fields: Any) -> Device:
        with_timeout = asyncio.wait_for(self.services.registry.register(Device(device_id, **fields)), LIMIT_S)
        device = await with_timeout
        await self.seen(device_id, "device.registered")
        return device

    async def seen(self, device_id: str, name: str, count: int = 1) -> None:
        """Until this node's hub has delivered `count` events `name` of the device."""
        await until(lambda: self.log.count(device_id, name) >= count)

    async def connect(self, device_id: str, session_id: str | None = None) -> FakeDeviceSession:
        """Open a device session and wait until its `device.connected` is delivered."""
        device = await self.services.registry.get(device_id)
        session = FakeDeviceSession(device, self.clock.now_ms(), session_id)
        before = self.log.count(device_id, "device.connected")
        self.services.sessions.device_opened(session)
        await self.seen(device_id, "device.connected", before + 1)
        await until(lambda: session.connected_calls > 0)
        return session

    async def settle(self) -> None:
        """Every spawned task has ended and every event committed so far is delivered:
        a sentinel device registered now is delivered after all of them."""
        await asyncio.wait_for(self.services.tasks.drain(LIMIT_S), LIMIT_S)
        sentinel = f"zz-sentinel-{self.services.node_id}-{next(self._sentinels)}"
        await asyncio.wait_for(self.services.registry.register(Device(sentinel)), LIMIT_S)
        await self.seen(sentinel, "device.registered")


def make_node(
    *,
    node_id: str = "n1",
    clock: ManualClock | None = None,
    broker: MemoryBroker | None = None,
    database: MemoryDatabase | None = None,
    presence: FakePresence | None = None,
    store: FlakyStore | None = None,
    **settings: Any,
) -> Node:
    clock = clock or ManualClock()
    broker = broker or MemoryBroker()
    store = store or FlakyStore(database)
    presence = presence or FakePresence(clock)
    verifier = FakeVerifier()
    values: dict[str, Any] = {"node_id": node_id, "jwt_secret": "x" * 32, "heartbeat_s": 20.0, **settings}
    services = build_services(Settings(**values), store, broker, presence, verifier, clock)
    node = Node(services, clock, store, broker, presence, verifier)
    services.hub.listen(node.log, telemetry=True)
    return node


@asynccontextmanager
async def running(node: Node) -> AsyncIterator[Node]:
    """The node started (store opened, services started) and stopped afterwards."""
    await asyncio.wait_for(node.store.open(), LIMIT_S)
    await asyncio.wait_for(node.services.start(), LIMIT_S)
    await asyncio.wait_for(node.services.tasks.drain(LIMIT_S), LIMIT_S)  # the startup reconcile
    try:
        yield node
    finally:
        await asyncio.wait_for(node.services.stop(), 3 * LIMIT_S)
        await node.store.close()


@asynccontextmanager
async def cluster(*node_ids: str, **settings: Any) -> AsyncIterator[list[Node]]:
    """Several nodes on one clock, broker, database and presence."""
    clock = ManualClock()
    broker = MemoryBroker()
    database = MemoryDatabase()
    presence = FakePresence(clock)
    nodes = [
        make_node(node_id=n, clock=clock, broker=broker, database=database, presence=presence, **settings)
        for n in node_ids
    ]
    async with AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(running(node))
        yield nodes
