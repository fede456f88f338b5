"""The services of one node, composed: what create_app builds and the lifespan starts.

No behaviour lives here: `start` and `stop` only bring the parts up and down in the one
order that keeps the guarantees (the writer drains before the publisher, the publisher
before the broker closes; sessions say goodbye before any of them stops).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from fleetwire.auth.principal import TokenVerifier
from fleetwire.broker.base import Broker
from fleetwire.domain.clock import Clock
from fleetwire.domain.close import Close
from fleetwire.events.hub import Hub
from fleetwire.events.publisher import EventPublisher
from fleetwire.events.writer import GroupWriter
from fleetwire.presence.base import Presence
from fleetwire.services.activity import FleetActivity
from fleetwire.services.auth import Authenticator
from fleetwire.services.cache import DeviceCache
from fleetwire.services.commands import CommandService
from fleetwire.services.ingest import IngestService
from fleetwire.services.jobs import JobService
from fleetwire.services.registry import RegistryService
from fleetwire.services.routing import NodeRouter
from fleetwire.services.sessions import SessionService
from fleetwire.services.subscriptions import SubscriptionService
from fleetwire.services.tasks import Tasks
from fleetwire.services.twin import TwinService
from fleetwire.store.base import Store


@dataclass(frozen=True, slots=True)
class Periods:
    heartbeat_s: float
    command_sweep_s: float
    purge_interval_s: float
    telemetry_retention_days: float
    event_history: int
    job_lease_s: float = 15.0


@dataclass(slots=True)
class Services:
    node_id: str
    clock: Clock
    store: Store
    broker: Broker
    presence: Presence
    verifier: TokenVerifier
    hub: Hub
    publisher: EventPublisher
    writer: GroupWriter
    tasks: Tasks
    router: NodeRouter
    auth: Authenticator
    ingest: IngestService
    commands: CommandService
    sessions: SessionService
    subscriptions: SubscriptionService
    registry: RegistryService
    cache: DeviceCache
    jobs: JobService
    twin: TwinService
    periods: Periods
    activity: FleetActivity

    async def start(self) -> None:
        await self.presence.start()
        if hasattr(self.broker, "on_reconnect"):  # RedisBroker: after an outage, reconcile
            self.broker.on_reconnect = self.sessions.reconcile
        await self.broker.start(self.node_id, self.hub.on_events, self.router.on_message)
        self.publisher.start()
        self.writer.start()
        await self.cache.fill()  # after the broker: registry events from now on keep it current
        # Sessions a previous process with this node id left in Presence are ghosts now.
        self.tasks.spawn(self.sessions.reconcile())
        p, tasks = self.periods, self.tasks
        tasks.every(p.heartbeat_s, self.sessions.heartbeat, "heartbeat")
        tasks.every(p.heartbeat_s / 2, self.sessions.liveness, "liveness")
        tasks.every(1.0, self.sessions.flush_presence, "presence")
        tasks.every(p.command_sweep_s, self.commands.sweep, "sweep")
        tasks.every(p.purge_interval_s, self._purge, "purge")
        # Jobs whose driver died (or that ran here before a restart): take them over.
        self.tasks.spawn(self.jobs.adopt_orphans())
        tasks.every(p.job_lease_s / 3, self.jobs.adopt_orphans, "jobs")

    async def stop(self) -> None:
        """After the transport closed every session: finish their goodbyes, then stop."""
        self.sessions.close_all(Close.SERVER_SHUTDOWN)
        self.tasks.stop()
        await self.jobs.close()  # ends the drivers and gives their leases up for another node
        await self.tasks.drain(5.0)
        self.commands.close()
        await self.writer.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.publisher.drained(), 2.0)
        await self.publisher.stop()
        await self.broker.close()
        await self.presence.close()

    async def _purge(self) -> None:
        cutoff = self.clock.now_ms() - int(self.periods.telemetry_retention_days * 86_400_000)
        await self.store.purge(cutoff, self.periods.event_history)
