"""The MQTT device endpoint (contract §8): the thin loop that decides a CONNECT, then runs an
`MqttSession`'s actions against a byte stream and the services. No rule lives here; see
realtime/mqtt/session.py.

The endpoint is the stream's `StreamHandler` (bytes in, from TCP or from `GET /mqtt`) and,
once its CONNECT is accepted, the services' local device session (`send`, `close`,
`heartbeat`, `connected`), exactly like the WebSocket `DeviceEndpoint`: presence, replacement
across nodes, queued commands and events are the same code.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import orjson

from fleetwire.auth.principal import AuthError, Principal, Role
from fleetwire.domain.clock import Timer
from fleetwire.domain.close import Close
from fleetwire.domain.devices import DEVICE_ID, Device
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.twin import TwinWrite
from fleetwire.realtime.endpoint import EndpointServices, new_session_id
from fleetwire.realtime.mqtt.session import (
    REFUSE_AUTH_METHOD,
    REFUSE_BUSY,
    REFUSE_NOT_AUTHORIZED,
    REFUSE_TOKEN,
    REFUSE_UNAVAILABLE,
    Inbound,
    MqttLimits,
    MqttSession,
    Persisted,
    Run,
    SendBytes,
    refusal,
)
from fleetwire.realtime.session import CloseSocket, PauseReading, ResumeReading
from fleetwire.services.ingest import IngestService
from fleetwire.services.registry import RegistryService
from fleetwire.services.tasks import OUTAGES
from fleetwire.store.base import StoreUnavailableError, WriteResult
from fleetwire.transport.mqtt import codec
from fleetwire.transport.mqtt.codec import Connect, MalformedPacket, StreamDecoder
from fleetwire.transport.mqtt.stream import Stream, WebSocketStream

log = logging.getLogger(__name__)


class PersistentSessions:
    """This node's persistent MQTT sessions between connections (MQTT §4.1), by device id.
    Bounded: at most `max_sessions`; beyond, the one that expires first goes."""

    def __init__(self, max_sessions: int) -> None:
        self._max = max_sessions
        self._by_device: OrderedDict[str, Persisted] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_device)

    def take(self, device_id: str, now_ms: int) -> Persisted | None:
        state = self._by_device.pop(device_id, None)
        return state if state is not None and state.expires_at_ms > now_ms else None

    def put(self, device_id: str, state: Persisted) -> None:
        self._by_device[device_id] = state
        self._by_device.move_to_end(device_id)
        while len(self._by_device) > self._max:
            oldest = min(self._by_device, key=lambda d: self._by_device[d].expires_at_ms)
            del self._by_device[oldest]


@dataclass(frozen=True, slots=True)
class MqttServices:
    """What MQTT endpoints use: built once by create_app, shared by every connection."""

    services: EndpointServices
    registry: RegistryService
    limits: MqttLimits
    persistent: PersistentSessions
    max_connections: int
    connect_timeout_s: float


class MqttEndpoint:
    """One MQTT connection: before CONNECT a gate, after it a device session."""

    __slots__ = (
        "_connecting",
        "_deadline_ms",
        "_decoder",
        "_early",
        "_tasks",
        "_timer",
        "connected_at_ms",
        "core",
        "device",
        "device_id",
        "mqtt",
        "session_id",
        "stream",
    )
    transport: ClassVar[str] = "mqtt"  # `data.transport` of `device.connected` (contract §8)
    device: Device

    def __init__(self, mqtt: MqttServices) -> None:
        self.mqtt = mqtt
        self.stream: Stream | None = None
        self.core: MqttSession | None = None
        self._decoder = StreamDecoder(mqtt.limits.max_packet_bytes)
        self._connecting: asyncio.Task[None] | None = None
        self._early: list[codec.Packet] = []  # read with the CONNECT, before it was decided
        self._timer: Timer | None = None
        self._deadline_ms: int | None = None
        self._tasks: set[asyncio.Task[None]] | None = None
        self.session_id = ""
        self.device_id = ""
        self.connected_at_ms = 0
        # `device` is set when the CONNECT is accepted (kept current by SessionService).

    # -- LocalDeviceSession ---------------------------------------------------------------
    @property
    def principal(self) -> Principal:
        assert self.core is not None
        return self.core.principal

    @property
    def last_seen_ms(self) -> int:
        return self.core.last_seen_ms if self.core is not None else self.connected_at_ms

    def send(self, payload: bytes) -> None:
        """A message for the device from the services: commands become PUBLISH packets."""
        core = self.core
        if core is None:
            return
        message = orjson.loads(payload)
        kind = message.get("type")
        if kind == "command":
            core.command(message, self.mqtt.services.clock.now_ms())
        elif kind == "twin_delta":
            core.twin_delta(message)
        else:
            return  # nothing else is addressed to a device session
        self._run()

    def close(self, code: Close) -> None:
        if self.core is not None:
            self.core.close(code, self.mqtt.services.clock.now_ms())
            self._run()

    def heartbeat(self, now_ms: int) -> None:
        """MQTT keeps alive by the device's own PINGREQ (the keep-alive timer ends it)."""

    def connected(self) -> None:
        if self.core is not None:
            self.core.connected()
            self._run()

    # -- StreamHandler --------------------------------------------------------------------
    def on_open(self, stream: Stream) -> None:
        self.stream = stream
        # MQTT §3.1.4: a CONNECT within a reasonable time, else close.
        self._timer = self.mqtt.services.clock.call_later(self.mqtt.connect_timeout_s, self._no_connect)

    def _no_connect(self) -> None:
        self._timer = None
        if self.core is None and self._connecting is None and self.stream is not None:
            self.stream.close(int(Close.PROTOCOL_ERROR))

    def on_data(self, data: bytes) -> None:
        stream = self.stream
        assert stream is not None
        now = self.mqtt.services.clock.now_ms()
        try:
            packets = self._decoder.feed(data)
        except MalformedPacket as exc:
            if self.core is not None:
                self.core.protocol_error(exc.reason, now)
                self._run()
            else:
                if exc.reason == codec.UNSUPPORTED_VERSION:  # §3.1.2.2: CONNACK 0x01, 3.1.1 format
                    stream.write(codec.encode(codec.Connack(False, 0x01), 4))
                stream.close(int(Close.PROTOCOL_ERROR))
            return
        core = self.core
        for packet in packets:
            if core is not None:
                core.receive(packet, now)
            elif self._connecting is not None:
                self._early.append(packet)  # bounded: reading is paused until the decision
            elif isinstance(packet, Connect):
                stream.pause_reading()
                self._connecting = asyncio.get_running_loop().create_task(self._connect(packet))
            else:  # §3.1.0: the first packet is CONNECT
                stream.close(int(Close.PROTOCOL_ERROR))
                return
        if core is not None:
            self._run()

    def on_closed(self, code: int | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._tasks or ():
            task.cancel()
        core = self.core
        if core is None:
            if self._connecting is not None:
                self._connecting.cancel()
            return
        services = self.mqtt.services
        local = services.sessions.local.devices.get(self.device_id)
        if (
            local is None or local.session_id == self.session_id
        ):  # a replacing session took the state over already
            state = core.persisted(services.clock.now_ms())
            if state is not None:
                self.mqtt.persistent.put(self.device_id, state)
        services.sessions.device_closed(self, core.disconnect_reason(code))

    # -- CONNECT (contract §8: refused before any session) -------------------------------------
    async def _connect(self, connect: Connect) -> None:
        stream = self.stream
        assert stream is not None
        try:
            decided = await self._decide(connect)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("MQTT CONNECT failed")
            decided = (REFUSE_UNAVAILABLE, "internal error")
        if stream.closed:
            return
        accepted, detail = decided
        if isinstance(accepted, Principal) and isinstance(detail, Device):
            self._open(connect, accepted, detail)
        elif isinstance(accepted, tuple) and isinstance(detail, str):
            stream.write(refusal(connect, accepted, detail))
            stream.close(int(Close.FORBIDDEN))

    async def _decide(self, connect: Connect) -> tuple[Principal, Device] | tuple[tuple[int, int], str]:
        mqtt = self.mqtt
        services = mqtt.services
        method = connect.properties.get(codec.AUTH_METHOD)
        token: bytes | None = connect.password
        if method is not None:
            if method != "jwt":
                return REFUSE_AUTH_METHOD, "the authentication method is `jwt`"
            data = connect.properties.get(codec.AUTH_DATA)
            if isinstance(data, bytes) and data:
                token = data
        if len(services.sessions.local) >= mqtt.max_connections:
            return REFUSE_BUSY, "server at its connection limit"
        if not token:
            return REFUSE_TOKEN, "the password (or 5.0 Authentication Data) is the device's JWT"
        try:
            principal = await services.auth.verify(token.decode("ascii"))
        except (AuthError, UnicodeDecodeError) as exc:
            return REFUSE_TOKEN, str(exc) or "token refused"
        if principal.role is not Role.DEVICE:
            return REFUSE_NOT_AUTHORIZED, "only device tokens may connect"
        if connect.client_id != principal.sub:
            return REFUSE_NOT_AUTHORIZED, "the client identifier must be the token's sub"
        if not DEVICE_ID.match(principal.sub):
            return REFUSE_NOT_AUTHORIZED, "unknown or disabled device"
        try:
            device = await mqtt.registry.find(principal.sub)
        except StoreUnavailableError:
            return REFUSE_UNAVAILABLE, "storage unavailable, retry later"
        if device is None or device.disabled:
            return REFUSE_NOT_AUTHORIZED, "unknown or disabled device"
        return principal, device

    def _open(self, connect: Connect, principal: Principal, device: Device) -> None:
        mqtt = self.mqtt
        services = mqtt.services
        now = services.clock.now_ms()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        restored: Persisted | None = None
        if not connect.clean_start:
            previous = services.sessions.local.devices.get(device.id)
            if isinstance(previous, MqttEndpoint) and previous.core is not None:
                restored = previous.core.persisted(now)  # taken over live (MQTT §3.1.4)
            else:
                restored = mqtt.persistent.take(device.id, now)
        else:
            mqtt.persistent.take(device.id, now)  # Clean Start discards a kept session
        self.session_id = new_session_id()
        self.device_id = device.id
        self.device = device
        self.connected_at_ms = now
        self.core = MqttSession(
            principal, connect, session_id=self.session_id, limits=mqtt.limits, now_ms=now, restored=restored
        )
        self.core.start(now)
        self._run()
        services.sessions.device_opened(self)
        early, self._early = self._early, []
        for packet in early:
            self.core.receive(packet, now)
        self._run()
        if self.stream is not None:
            self.stream.resume_reading()

    # -- running actions ------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        stream = self.stream
        if core is None or stream is None:
            return
        for action in core.actions():
            if type(action) is SendBytes:
                stream.write(action.data)
            elif type(action) is Run:
                self._call(action.request)
            elif type(action) is PauseReading:
                stream.pause_reading()
            elif type(action) is ResumeReading:
                stream.resume_reading()
            elif type(action) is CloseSocket:
                stream.close(int(action.code))
        self._arm_timer()

    def _arm_timer(self) -> None:
        """One timer at the core's next deadline; a later deadline (a packet moved the
        keep-alive on) does not re-arm it: the due timer asks the core, which re-arms."""
        core = self.core
        assert core is not None
        deadline = core.next_deadline_ms()
        if self._deadline_ms is not None and self._deadline_ms <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        clock = self.mqtt.services.clock
        self._deadline_ms = deadline
        self._timer = clock.call_later(max((deadline - clock.now_ms()) / 1000, 0.0), self._timer_due)

    def _timer_due(self) -> None:
        self._timer = None
        self._deadline_ms = None
        if self.core is not None:
            self.core.timer(self.mqtt.services.clock.now_ms())
            self._run()

    def _call(self, request: Inbound) -> None:
        services = self.mqtt.services
        if request.type == "telemetry" or request.type == "telemetry_batch":
            try:
                future = services.ingest.submit_telemetry(
                    self.device, request.value, batch=request.type != "telemetry"
                )
            except FleetwireError as exc:
                self._completed(request, exc)
                return
            future.add_done_callback(functools.partial(self._ingested, request))
            return
        task = asyncio.get_running_loop().create_task(self._answer(request))
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ingested(self, request: Inbound, future: asyncio.Future[WriteResult]) -> None:
        try:
            IngestService.accepted(future, len(request.value))
        except FleetwireError as exc:
            self._completed(request, exc)
        except Exception:
            log.exception("MQTT telemetry failed")
            self._completed(request, FleetwireError(ErrorCode.INTERNAL, "internal error"))
        else:
            self._completed(request, None)

    def _completed(self, request: Inbound, error: FleetwireError | None) -> None:
        if self.core is not None:
            self.core.completed(request, error, self.mqtt.services.clock.now_ms())
            self._run()

    async def _answer(self, request: Inbound) -> None:
        services = self.mqtt.services
        error: FleetwireError | None = None
        try:
            if request.type == "status":
                await services.ingest.status(self.device_id, request.value, "device")
            elif request.type == "command_result":
                command_id, ok, result, failure = request.value
                await services.commands.result(self.device_id, command_id, ok, result, failure)
            elif request.type == "twin_report":
                write: TwinWrite = request.value
                await services.twin.report(self.principal, self.device_id, write.patch, write.if_version)
            else:  # auth: 5.0 re-authentication
                error = await self._reauthenticate(request.value)
        except FleetwireError as exc:
            error = exc
        except OUTAGES as exc:
            log.warning("MQTT request %s: %s", request.type, exc)
            error = FleetwireError(ErrorCode.UNAVAILABLE, "a backing service is unavailable; retry later")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("MQTT request %s failed", request.type)
            error = FleetwireError(ErrorCode.INTERNAL, "internal error")
        self._completed(request, error)

    async def _reauthenticate(self, token: str) -> FleetwireError | None:
        assert self.core is not None
        try:
            fresh = await self.mqtt.services.auth.verify(token)
        except AuthError as exc:
            return FleetwireError(ErrorCode.UNAUTHORIZED, str(exc) or "token refused")
        return self.core.reauthenticate(fresh)


class MqttGate:
    """Makes the endpoint of each new MQTT connection: the TCP listener's handler factory,
    and the WebSocket `Handler` for `GET /mqtt`."""

    def __init__(self, mqtt: MqttServices) -> None:
        self.mqtt = mqtt

    def __call__(self) -> MqttEndpoint:
        return MqttEndpoint(self.mqtt)

    def websocket(self) -> WebSocketStream:
        return WebSocketStream(MqttEndpoint(self.mqtt))
