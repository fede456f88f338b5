"""create_app: the only place where fleetwire's parts are chosen and wired together."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.types import ASGIApp, Receive, Scope, Send

    from fleetwire.transport.server import FleetwireServer

from fleetwire.api import (
    commands,
    dashboard,
    devices,
    errors,
    health,
    jobs,
    overview,
    telemetry,
    tokens,
    twin,
)
from fleetwire.auth.principal import TokenVerifier
from fleetwire.auth.secret import signing_secret
from fleetwire.broker.base import Broker
from fleetwire.domain.clock import Clock, SystemClock
from fleetwire.domain.schemas import SchemaLimits
from fleetwire.domain.twin import TwinLimits
from fleetwire.events.hub import Hub
from fleetwire.events.publisher import EventPublisher
from fleetwire.events.writer import GroupWriter
from fleetwire.presence.base import Presence
from fleetwire.realtime.endpoint import EndpointServices
from fleetwire.realtime.handshake import Handshake
from fleetwire.realtime.mqtt.endpoint import MqttGate, MqttServices, PersistentSessions
from fleetwire.realtime.mqtt.session import MqttLimits
from fleetwire.realtime.session import SessionLimits
from fleetwire.services.activity import FleetActivity
from fleetwire.services.auth import Authenticator
from fleetwire.services.cache import DeviceCache, PendingIndex
from fleetwire.services.commands import CommandService
from fleetwire.services.container import Periods, Services
from fleetwire.services.ingest import IngestService
from fleetwire.services.jobs import JobService
from fleetwire.services.local import LocalSessions
from fleetwire.services.registry import RegistryService
from fleetwire.services.routing import NodeRouter
from fleetwire.services.sessions import SessionService
from fleetwire.services.subscriptions import SubscriptionService
from fleetwire.services.tasks import Tasks
from fleetwire.services.twin import TwinService
from fleetwire.settings import Settings
from fleetwire.store.base import Store

log = logging.getLogger(__name__)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fleetwire")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    broker: Broker | None = None,
    presence: Presence | None = None,
    verifier: TokenVerifier | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """Build the ASGI app and every service of the node. Nothing connects until the lifespan.

    Each seam defaults to what the settings' URLs choose: SQLite or PostgreSQL for the
    store, `memory://` or `redis://` for the broker and presence; tests pass their own.
    """
    settings = settings or Settings()
    secret = signing_secret(settings)
    if store is None:
        from fleetwire.store.sql import SqlStore

        store = SqlStore(
            settings.effective_database_url,
            history=settings.event_history,
            pool_size=settings.db_pool_size,
            slow_write_ms=settings.slow_write_ms,
        )
    if broker is None:
        from fleetwire.broker import make_broker

        broker = make_broker(settings.broker_url)
    if presence is None:
        from fleetwire.presence import make_presence

        presence = make_presence(settings.broker_url, settings.node_id)
    clock = clock or SystemClock()
    if verifier is None:
        from fleetwire.auth.jwt import JwtVerifier

        wall = clock  # exp, nbf and iat are judged on the same clock as the sessions
        verifier = JwtVerifier.from_settings(settings, secret, clock=lambda: wall.now_ms() / 1000)
    services = build_services(settings, store, broker, presence, verifier, clock)
    opened_store = store

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await opened_store.open()
        try:
            await services.start()
            app.state.started_ms = clock.now_ms()
            log.info("fleetwire node %s ready", settings.node_id)
            yield
            await services.stop()
        finally:
            await opened_store.close()

    app = FastAPI(
        title="fleetwire",
        version=_version(),
        summary="Device registry, telemetry and commands for IoT fleets",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.services = services
    app.state.signing_secret = secret
    app.state.metrics = health.metrics_registry(services)
    app.state.started_ms = clock.now_ms()  # again when the lifespan has started the services
    errors.install(app)
    for module in (devices, telemetry, commands, tokens, twin, jobs, overview):
        app.include_router(module.router, prefix="/api/v1")
    app.include_router(health.router)
    app.include_router(dashboard.router)
    app.mount("/web", dashboard.static_files(), name="web")
    if settings.origins:
        app.add_middleware(ApiCors, origins=settings.origins)
    return app


class ApiCors:
    """CORS for the REST API only (`/api/v1`), for the browser origins the WebSocket allows
    (`FLEETWIRE_ALLOWED_ORIGINS`; `*` = any): preflights answered, `Authorization` allowed,
    no cookies (tokens travel in the header). Other origins get no CORS headers, so their
    browsers keep the answers from them; other paths are left as they are."""

    def __init__(self, app: ASGIApp, origins: frozenset[str]) -> None:
        from starlette.middleware.cors import CORSMiddleware

        self._app = app
        self._cors = CORSMiddleware(
            app,
            allow_origins=["*"] if "*" in origins else sorted(origins),
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "WWW-Authenticate"],
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/v1/"):
            await self._cors(scope, receive, send)
        else:
            await self._app(scope, receive, send)


def startup_lines(settings: Settings, port: int, secret_source: str) -> list[str]:
    """What `fleetwire serve` tells its user once it listens, one fact a line."""
    from sqlalchemy.engine import make_url

    host = settings.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    base = f"http://{shown}:{port}"
    database = make_url(settings.effective_database_url).render_as_string(hide_password=True)
    return [
        f"fleetwire {_version()}, node {settings.node_id}",
        f"dashboard: {base}/  (sign in: `fleetwire open`)",
        f"API docs:  {base}/docs",
        f"database:  {database}",
        f"broker:    {settings.broker_url}",
        f"secret:    {secret_source}",
    ]


def secret_source(settings: Settings) -> str:
    """Where the token-signing or -verifying key comes from (never the key itself)."""
    from fleetwire.auth.secret import SECRET_FILE

    if any(a.startswith("HS") for a in settings.algorithms):
        if settings.jwt_secret:
            return "FLEETWIRE_JWT_SECRET (HMAC)"
        return f"{(settings.data_dir / SECRET_FILE).resolve()} (HMAC, mode 0600)"
    if settings.jwt_jwks_url:
        return f"JWKS {settings.jwt_jwks_url} (verify only)"
    return "FLEETWIRE_JWT_PUBLIC_KEY (verify only)"


def build_services(
    settings: Settings,
    store: Store,
    broker: Broker,
    presence: Presence,
    verifier: TokenVerifier,
    clock: Clock,
) -> Services:
    """Every service of one node, each given exactly the seams it uses."""
    node_id = settings.node_id
    hub = Hub(clock)
    publisher = EventPublisher(broker)
    writer = GroupWriter(
        store,
        publisher.submit,
        max_queue=settings.write_queue,
        max_batch=settings.write_batch,
        max_pipeline=settings.write_pipeline,
        overlap_commands=store.concurrent_writes,
        linger_turns=settings.write_linger_turns,
        linger_ops=settings.write_linger_ops,
    )
    tasks = Tasks(clock)
    local = LocalSessions()
    router = NodeRouter(node_id, broker, local)
    schema_limits = SchemaLimits(
        max_bytes=settings.max_schema_bytes,
        max_depth=settings.max_schema_depth,
        max_expansion=settings.max_schema_expansion,
    )
    ingest = IngestService(store=store, writer=writer, clock=clock, schema_limits=schema_limits)
    cache = DeviceCache(store)
    pending = PendingIndex()
    commands = CommandService(
        store=store,
        writer=writer,
        presence=presence,
        router=router,
        tasks=tasks,
        clock=clock,
        devices=cache,
        pending=pending,
        max_pending=settings.max_pending_commands,
        max_issuing=settings.max_issuing_commands,
    )
    twin = TwinService(
        store=store,
        writer=writer,
        local=local,
        clock=clock,
        limits=TwinLimits(max_bytes=settings.max_twin_bytes, max_depth=settings.max_twin_depth),
    )
    sessions = SessionService(
        node_id=node_id,
        heartbeat_s=settings.heartbeat_s,
        local=local,
        presence=presence,
        store=store,
        writer=writer,
        router=router,
        commands=commands,
        tasks=tasks,
        clock=clock,
        pending=pending,
        replace_wait_s=settings.replace_wait_s,
        twin=twin,
    )
    registry = RegistryService(
        store=store,
        writer=writer,
        presence=presence,
        sessions=sessions,
        ingest=ingest,
        clock=clock,
        cache=cache,
        schema_limits=schema_limits,
    )
    hub.listen(cache.on_event)  # first: the others may read the cache
    hub.listen(sessions.on_event)
    hub.listen(commands.on_event)
    jobs = JobService(
        node_id=node_id,
        store=store,
        writer=writer,
        presence=presence,
        router=router,
        commands=commands,
        tasks=tasks,
        clock=clock,
        max_devices=settings.max_job_devices,
        batch=settings.job_batch,
        lease_s=settings.job_lease_s,
        progress_s=settings.job_progress_s,
    )
    hub.listen(jobs.on_event)
    hub.listen(twin.on_event)
    activity = FleetActivity(
        clock,
        window_minutes=settings.activity_window_minutes,
        flapping_disconnects=settings.flapping_disconnects,
    )
    hub.listen(activity.on_event)
    hub.count_records(activity.on_records)  # records per minute, without an Event each
    return Services(
        node_id=node_id,
        clock=clock,
        store=store,
        broker=broker,
        presence=presence,
        verifier=verifier,
        hub=hub,
        publisher=publisher,
        writer=writer,
        tasks=tasks,
        router=router,
        auth=Authenticator(verifier),
        ingest=ingest,
        commands=commands,
        sessions=sessions,
        subscriptions=SubscriptionService(
            store=store,
            presence=presence,
            hub=hub,
            history=settings.event_history,
            max_subscriptions=settings.max_subscriptions,
            max_patterns=settings.max_patterns,
            max_replay=settings.max_replay,
        ),
        registry=registry,
        cache=cache,
        jobs=jobs,
        twin=twin,
        periods=Periods(
            heartbeat_s=settings.heartbeat_s,
            command_sweep_s=settings.command_sweep_s,
            purge_interval_s=settings.purge_interval_s,
            telemetry_retention_days=settings.telemetry_retention_days,
            event_history=settings.event_history,
            job_lease_s=settings.job_lease_s,
        ),
        activity=activity,
    )


def build_node_server(
    app: FastAPI,
    *,
    port: int | None = None,
    on_started: Callable[[int], None] | None = None,
    log_level: str | None = None,
) -> FleetwireServer:
    """REST and WebSocket on one port (the app's settings give host, port and limits)."""
    from fleetwire.transport.base import TransportLimits
    from fleetwire.transport.mqtt.stream import StreamLimits
    from fleetwire.transport.server import MqttListen, build_server

    settings: Settings = app.state.settings
    services: Services = app.state.services
    limits = TransportLimits(
        max_message_bytes=settings.max_message_bytes,
        send_queue=settings.send_queue,
        max_header_bytes=settings.max_header_bytes,
        handshake_timeout_s=settings.handshake_timeout_s,
        close_grace_s=settings.close_grace_s,
    )
    gate = mqtt_gate(settings, services)  # one per node: it holds the persistent MQTT sessions
    mqtt = None
    if settings.mqtt_port is not None:
        mqtt = MqttListen(
            gate,
            settings.host,
            settings.mqtt_port,
            # Twice the session limit of sockets: the ones over it still read their CONNACK 0x03/0x97.
            StreamLimits(settings.send_queue, settings.close_grace_s, 2 * settings.max_connections),
        )
    return build_server(
        app,
        websocket_handshake(settings, services, gate),
        host=settings.host,
        port=settings.port if port is None else port,
        limits=limits,
        log_level=log_level or settings.log_level,
        on_started=on_started,
        mqtt=mqtt,
    )


def websocket_handshake(settings: Settings, services: Services, mqtt: MqttGate | None = None) -> Handshake:
    """The device and client WebSocket endpoints (and MQTT over WebSocket) over the node's
    services."""
    endpoint_services = endpoint_services_of(services)
    limits = SessionLimits(
        rate=settings.rate_per_second,
        close_after=settings.rate_limit_close_after,
        warning_s=settings.token_warning_s,
        max_clock_skew_s=settings.max_clock_skew_s,
        heartbeat_s=settings.heartbeat_s,
        max_in_flight=settings.max_in_flight,
        close_grace_s=settings.close_grace_s,
        leeway_s=settings.jwt_leeway_s,
    )
    return Handshake(
        endpoint_services,
        services.registry,
        limits,
        origins=settings.origins,
        max_connections=settings.max_connections,
        mqtt=mqtt or mqtt_gate(settings, services),
    )


def mqtt_gate(settings: Settings, services: Services) -> MqttGate:
    """MQTT device endpoints (contract §8) over the node's services: one per node, shared by
    the TCP listener and `/mqtt`, since it holds the node's persistent MQTT sessions."""
    limits = MqttLimits(
        rate=settings.rate_per_second,
        close_after=settings.rate_limit_close_after,
        max_clock_skew_s=settings.max_clock_skew_s,
        max_packet_bytes=settings.max_message_bytes,
        max_keep_alive_s=settings.mqtt_max_keep_alive_s,
        max_in_flight=settings.max_in_flight,
        max_held=settings.send_queue,
        max_session_expiry_s=settings.mqtt_session_expiry_s,
        max_subscriptions=settings.max_subscriptions,
        close_grace_s=settings.close_grace_s,
        leeway_s=settings.jwt_leeway_s,
    )
    return MqttGate(
        MqttServices(
            services=endpoint_services_of(services),
            registry=services.registry,
            limits=limits,
            persistent=PersistentSessions(settings.mqtt_max_sessions),
            max_connections=settings.max_connections,
            connect_timeout_s=settings.handshake_timeout_s,
        )
    )


def endpoint_services_of(services: Services) -> EndpointServices:
    return EndpointServices(
        node_id=services.node_id,
        clock=services.clock,
        auth=services.auth,
        sessions=services.sessions,
        ingest=services.ingest,
        commands=services.commands,
        subscriptions=services.subscriptions,
        twin=services.twin,
        jobs=services.jobs,
    )
