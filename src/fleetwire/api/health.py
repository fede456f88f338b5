"""Liveness, readiness and Prometheus metrics (contract §3); no authentication."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fleetwire.services.container import Services

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    services: Services = request.app.state.services
    checks: dict[str, str] = {}
    for name, probe in (
        ("store", services.store.ping),
        ("broker", services.broker.ping),
        ("presence", services.presence.ping),
    ):
        try:
            await asyncio.wait_for(probe(), 2.0)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        200 if ready else 503,
        headers={} if ready else {"Retry-After": "5"},
    )


class NodeCollector(Collector):
    """Reads the node's counters at scrape time: nothing is counted twice on the hot path."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Any]:
        node = self.services
        yield GaugeMetricFamily(
            "fleetwire_connections",
            "Open sessions on this node (WebSocket and MQTT)",
            value=len(node.sessions.local),
        )
        yield GaugeMetricFamily(
            "fleetwire_device_sessions",
            "Device sessions on this node",
            value=len(node.sessions.local.devices),
        )
        sessions = node.sessions
        by_transport = GaugeMetricFamily(
            "fleetwire_device_sessions_by_transport",
            "Device sessions on this node by transport (websocket, mqtt)",
            labels=["transport"],
        )
        live: dict[str, int] = dict.fromkeys(("websocket", "mqtt"), 0)
        for session in sessions.local.devices.values():
            live[session.transport] = live.get(session.transport, 0) + 1
        for transport, count in sorted(live.items()):
            by_transport.add_metric([transport], count)
        yield by_transport
        opened = CounterMetricFamily(
            "fleetwire_device_sessions_opened",
            "Device sessions opened on this node by transport",
            labels=["transport"],
        )
        for transport in sorted({*live, *sessions.opened_by_transport}):
            opened.add_metric([transport], sessions.opened_by_transport.get(transport, 0))
        yield opened
        yield GaugeMetricFamily(
            "fleetwire_write_queue", "Operations waiting for the group writer", value=node.writer.queued
        )
        yield CounterMetricFamily(
            "fleetwire_events_published", "Events handed to the broker", value=node.publisher.published
        )
        yield CounterMetricFamily(
            "fleetwire_events_dropped", "Events dropped from a full outbox", value=node.publisher.dropped
        )
        yield CounterMetricFamily(
            "fleetwire_deliveries", "Event frames written to subscribers", value=node.hub.delivered
        )


def metrics_registry(services: Services) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(services))
    return registry


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")
