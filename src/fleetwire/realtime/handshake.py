"""The WebSocket handshake decisions (contract §2), taken before the 101 is sent.

Each refusal is an HTTP answer with a JSON body: 404 unknown path, 403 Origin or role,
401 token, 503 at the connection limit or during a storage outage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from fleetwire.auth.principal import AuthError, Principal, Role, UnknownKeyError
from fleetwire.domain.devices import DEVICE_ID, Device
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


@dataclass(frozen=True, slots=True)
class _Bearer:
    """A request that passed every check on its own: what is left is its token."""

    token: str
    is_device: bool


class Handshake:
    """The transport's WebSocketApp. `decide_now` takes nearly every decision without I/O (a
    known signing key, a cached device), so the transport needs no task per handshake
    (issue 12); `__call__` takes any decision, waiting where it must."""

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

    def decide_now(self, request: UpgradeRequest) -> Handler | Refusal | None:
        """The decision, if it needs no I/O; None when it has to wait (a key set refresh, a
        device not in the cache, storage being probed after an outage): then `__call__`."""
        checked = self._check(request)
        if not isinstance(checked, _Bearer):
            return _logged(request, checked)
        try:
            principal = self._services.auth.verify_now(checked.token)
        except UnknownKeyError:
            return None
        except AuthError as exc:
            return _logged(request, _unauthorized(exc))
        admitted = self._admit(checked, principal)
        if admitted is not None:
            return _logged(request, admitted)
        device = self._registry.find_now(principal.sub)
        if device is None:
            return None
        return _logged(request, self._device_endpoint(principal, device))

    async def __call__(self, request: UpgradeRequest) -> Handler | Refusal:
        checked = self._check(request)
        if not isinstance(checked, _Bearer):
            return _logged(request, checked)
        try:
            principal = await self._services.auth.verify(checked.token)
        except AuthError as exc:
            return _logged(request, _unauthorized(exc))
        admitted = self._admit(checked, principal)
        if admitted is not None:
            return _logged(request, admitted)
        try:
            device = await self._registry.find(principal.sub)
        except StoreUnavailableError:
            return _logged(
                request, Refusal(503, "unavailable", "storage unavailable, retry later", {"Retry-After": "5"})
            )
        return _logged(request, self._device_endpoint(principal, device))

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        """Listed, `*`, or the server's own origin (the page it served: the dashboard).

        Same-origin is judged by the Host the browser sent; a page on another origin cannot
        forge either header (contract §2: the list guards against cross-site hijacking)."""
        if "*" in self._origins or origin in self._origins:
            return True
        parts = urlsplit(origin)
        return host is not None and parts.scheme in ("http", "https") and parts.netloc == host.lower()

    def _check(self, request: UpgradeRequest) -> Handler | Refusal | _Bearer:
        """Everything decided by the request alone (path, Origin, the connection limit, a
        token present); MQTT over WebSocket is decided here entirely."""
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
        if len(self._services.sessions.local) >= self._max_connections:
            return Refusal(503, "unavailable", "server at its connection limit", {"Retry-After": "5"})
        token = token_of(request)
        if token is None:
            return Refusal(401, "unauthorized", "a bearer token is required")
        return _Bearer(token, is_device)

    def _admit(self, bearer: _Bearer, principal: Principal) -> Handler | Refusal | None:
        """The token's role against the endpoint: a client session, a refusal, or None for a
        device session, which needs its device record next."""
        if not bearer.is_device:
            if principal.role is Role.DEVICE:
                return Refusal(403, "forbidden", "a device token cannot open a client session")
            return ClientEndpoint(self._services, self._session(principal, is_device=False))
        if principal.role is not Role.DEVICE:
            return Refusal(403, "forbidden", "only device tokens may connect here")
        if not DEVICE_ID.match(principal.sub):  # no such device can exist; spare the database
            return Refusal(403, "forbidden", "unknown or disabled device")
        return None

    def _device_endpoint(self, principal: Principal, device: Device | None) -> Handler | Refusal:
        if device is None or device.disabled:
            return Refusal(403, "forbidden", "unknown or disabled device")
        return DeviceEndpoint(self._services, self._session(principal, is_device=True), device)

    def _session(self, principal: Principal, *, is_device: bool) -> Session:
        return Session(
            principal,
            session_id=new_session_id(),
            is_device=is_device,
            limits=self._limits,
            now_ms=self._services.clock.now_ms(),
        )


def _unauthorized(exc: AuthError) -> Refusal:
    return Refusal(401, "unauthorized", str(exc) or "token refused")


def _logged(request: UpgradeRequest, answer: Handler | Refusal) -> Handler | Refusal:
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


def token_of(request: UpgradeRequest) -> str | None:
    """The bearer token from `Authorization`, else the `access_token` query parameter."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        return value.strip() or None if scheme.lower() == "bearer" else None
    return request.query.get("access_token") or None
