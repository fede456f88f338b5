"""create_app: the only place where fleetwire's parts are chosen and wired together."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

if TYPE_CHECKING:
    from collections.abc import Callable

    from fleetwire.transport.server import FleetwireServer

from fleetwire.api import commands, devices, errors, health, telemetry, tokens
from fleetwire.auth.principal import TokenVerifier
from fleetwire.broker.base import Broker
from fleetwire.presence.base import Presence
from fleetwire.realtime.node import Node
from fleetwire.settings import Settings
from fleetwire.store.base import Store

log = logging.getLogger(__name__)


def _signing_secret(settings: Settings) -> str | None:
    """The HMAC secret this server signs and verifies with, if it uses one (contract §4)."""
    if not any(a.startswith("HS") for a in settings.algorithms):
        return None
    if settings.jwt_secret:
        return settings.jwt_secret
    from fleetwire.auth.secret import load_or_create_secret

    return load_or_create_secret(settings.data_dir)


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
) -> FastAPI:
    """Build the ASGI app and its Node. Nothing connects until the lifespan starts.

    Each seam defaults to what the settings' URLs choose: SQLite or PostgreSQL for the
    store, `memory://` or `redis://` for the broker and presence.
    """
    settings = settings or Settings()
    secret = _signing_secret(settings)
    if store is None:
        from fleetwire.store.sql import SqlStore

        store = SqlStore(settings.effective_database_url, history=settings.event_history)
    if broker is None:
        from fleetwire.broker import make_broker

        broker = make_broker(settings.broker_url)
    if presence is None:
        from fleetwire.presence import make_presence

        presence = make_presence(settings.broker_url, settings.node_id)
    if verifier is None:
        from fleetwire.auth.jwt import JwtVerifier

        verifier = JwtVerifier.from_settings(settings, secret)
    node = Node(settings, store=store, broker=broker, presence=presence, verifier=verifier)
    opened_store = store

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await opened_store.open()
        try:
            await node.start()
            log.info("fleetwire node %s ready", settings.node_id)
            yield
            await node.stop()
        finally:
            await opened_store.close()

    app = FastAPI(
        title="fleetwire",
        version=_version(),
        summary="Device registry, telemetry and commands for IoT fleets",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.node = node
    app.state.signing_secret = secret
    app.state.metrics = health.metrics_registry(node)
    errors.install(app)
    for module in (devices, telemetry, commands, tokens):
        app.include_router(module.router, prefix="/api/v1")
    app.include_router(health.router)
    return app


def build_node_server(
    app: FastAPI,
    *,
    port: int | None = None,
    on_started: Callable[[int], None] | None = None,
    log_level: str | None = None,
) -> FleetwireServer:
    """REST and WebSocket on one port (the app's settings give host, port and limits)."""
    from fleetwire.transport.base import TransportLimits
    from fleetwire.transport.server import build_server

    settings: Settings = app.state.settings
    node: Node = app.state.node
    limits = TransportLimits(
        max_message_bytes=settings.max_message_bytes,
        send_queue=settings.send_queue,
        max_header_bytes=settings.max_header_bytes,
        handshake_timeout_s=settings.handshake_timeout_s,
        close_grace_s=settings.close_grace_s,
    )
    return build_server(
        app,
        node.handshake,
        host=settings.host,
        port=settings.port if port is None else port,
        limits=limits,
        log_level=log_level or settings.log_level,
        on_started=on_started,
    )
