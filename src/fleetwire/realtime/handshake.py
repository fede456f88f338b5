"""The WebSocket handshake decisions (contract §2), taken before the 101 is sent.

Each refusal is an HTTP answer with a JSON body: 404 unknown path, 403 Origin or role,
401 token, 503 at the connection limit or during a storage outage.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from fleetwire.auth.principal import AuthError, Role
from fleetwire.domain.devices import DEVICE_ID
from fleetwire.realtime.endpoint import ClientEndpoint, DeviceEndpoint, EndpointServices, new_session_id
from fleetwire.realtime.mqtt.endpoint import MqttGate
from fleetwire.realtime.session import Session, SessionLimits
from fleetwire.services.registry import RegistryService
from fleetwire.store.base import StoreUnavailableError
from fleetwire.transport.base import Handler, Refusal, UpgradeRequest

DEVICE_PATH = "/ws/device"
CLIENT_PATH = "/ws/client"
MQTT_PATH = "/mqtt"  # contract §8: MQTT over WebSocket, subprotocol `mqtt`

log = logging.getLogger(__name__)


class Handshake:
    def __init__(
        self,
        services: EndpointServices,
        registry: RegistryService,
        limits: SessionLimits,
        *,
        origins: frozenset[str],
        max_connections: int,
        mqtt: MqttGate | None = None,
    ) -> None:
        self._mqtt = mqtt
        self._services = services
        self._registry = registry
        self._limits = limits
        self._origins = origins
        self._max_connections = max_connections

    async def __call__(self, request: UpgradeRequest) -> Handler | Refusal:
        answer = await self._decide(request)
        if isinstance(answer, Refusal):
            # Issue 17: why a browser saw a 403 (path without its query: no token in the log).
            log.info(
                "handshake refused: %s %s from %s: %d %s",
                request.path,
                request.headers.get("origin") or "(no Origin)",
                request.peer or "?",
                answer.status,
                answer.message,
            )
        return answer

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        """Listed, `*`, or the server's own origin (the page it served: the dashboard).

        Same-origin is judged by the Host the browser sent; a page on another origin cannot
        forge either header (contract §2: the list guards against cross-site hijacking)."""
        if "*" in self._origins or origin in self._origins:
            return True
        parts = urlsplit(origin)
        return host is not None and parts.scheme in ("http", "https") and parts.netloc == host.lower()

    async def _decide(self, request: UpgradeRequest) -> Handler | Refusal:
        is_device = request.path == DEVICE_PATH
        is_mqtt = request.path == MQTT_PATH and self._mqtt is not None
        if not is_device and not is_mqtt and request.path != CLIENT_PATH:
            return Refusal(404, "not_found", "no WebSocket endpoint here")
        if is_mqtt and self._mqtt is not None:
            # The token travels in CONNECT, never in an ambient credential (cookie, header a
            # browser adds), so a cross-site page cannot hijack a session: no Origin check
            # (clients such as paho send one of their own). The endpoint decides (CONNACK, §8).
            offered = request.headers.get("sec-websocket-protocol", "")
            if "mqtt" not in (p.strip() for p in offered.split(",")):
                return Refusal(400, "bad_request", "MQTT over WebSocket needs subprotocol `mqtt`")
            return self._mqtt.websocket()
        origin = request.headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, request.headers.get("host")):
            return Refusal(403, "forbidden", "Origin not allowed")
        services = self._services
        if len(services.sessions.local) >= self._max_connections:
            return Refusal(503, "unavailable", "server at its connection limit", {"Retry-After": "5"})
        token = token_of(request)
        if token is None:
            return Refusal(401, "unauthorized", "a bearer token is required")
        try:
            principal = await services.auth.verify(token)
        except AuthError as exc:
            return Refusal(401, "unauthorized", str(exc) or "token refused")
        session = Session(
            principal,
            session_id=new_session_id(),
            is_device=is_device,
            limits=self._limits,
            now_ms=services.clock.now_ms(),
        )
        if not is_device:
            if principal.role is Role.DEVICE:
                return Refusal(403, "forbidden", "a device token cannot open a client session")
            return ClientEndpoint(services, session)
        if principal.role is not Role.DEVICE:
            return Refusal(403, "forbidden", "only device tokens may connect here")
        if not DEVICE_ID.match(principal.sub):  # no such device can exist; spare the database
            return Refusal(403, "forbidden", "unknown or disabled device")
        try:
            device = await self._registry.find(principal.sub)
        except StoreUnavailableError:
            return Refusal(503, "unavailable", "storage unavailable, retry later", {"Retry-After": "5"})
        if device is None or device.disabled:
            return Refusal(403, "forbidden", "unknown or disabled device")
        return DeviceEndpoint(services, session, device)


def token_of(request: UpgradeRequest) -> str | None:
    """The bearer token from `Authorization`, else the `access_token` query parameter."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        return value.strip() or None if scheme.lower() == "bearer" else None
    return request.query.get("access_token") or None
