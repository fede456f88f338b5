"""The MQTT device session core (contract §8) without I/O: packets and the time in, actions out.

An `MqttSession` is one accepted MQTT connection of a device (its CONNECT was verified by the
endpoint) as a state machine, in the style of `realtime/session.py`: it never awaits, reads a
clock or touches a socket. Its inputs are decoded packets (`receive`), finished requests
(`completed`, `reauthenticated`), `device.connected` recorded (`connected`), a command for the
device (`command`), a due timer and a close decided by a service, each with the time; what it
decides piles up as actions (`actions()`): bytes to write, a request to run, pause or resume
reading, close.

The rules that live here:
- Topics (§8): a device publishes only under `devices/{id}/` (telemetry, status, command
  results, twin reported) and subscribes only under it; anything else is not authorized (5.0 reason 0x87;
  3.1.1: SUBACK 0x80, and a publish elsewhere closes the connection).
- A QoS 1 publish is acknowledged when its request completed (telemetry: after the durable
  commit), PUBACKs in the order the publishes arrived (MQTT 3.1.1 §4.6). A refused publish
  changes nothing; its error object (§2.1 shape, `id` = the packet id) is published to
  `devices/{id}/errors` when the device subscribed to it, and on 5.0 the PUBACK carries the
  reason (0x99 invalid, 0x87 not authorized, 0x97 rate limited, 0x80 otherwise).
- QoS 2 is not offered (5.0 CONNACK Maximum QoS 1; a QoS 2 publish is a protocol error).
- Requests wait for `device.connected` (so it takes a lower `seq`), at most `max_in_flight`
  run at once and reading pauses at the cap (5.0 CONNACK Receive Maximum says so): the
  admission rule of `realtime/admission.py`, shared with the WebSocket core.
- Commands go out as QoS 1 PUBLISH on `devices/{id}/commands` once the device subscribed to
  it (held until then, bounded), at most the device's Receive Maximum unacknowledged; what is
  unacknowledged when the connection ends is kept by a persistent session and resent with DUP.
- Keep-alive: no packet for 1.5 × the keep-alive ends the session (reason `timeout`; 5.0
  DISCONNECT 0x8D). Token expiry ends it (`token_expired`; 5.0 DISCONNECT 0xA0 first) unless a
  5.0 device that connected with Authentication Method `jwt` re-authenticated (AUTH 0x19).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from fleetwire.auth.principal import Principal
from fleetwire.domain.clock import parse_rfc3339
from fleetwire.domain.close import Close, disconnect_reason
from fleetwire.domain.errors import ErrorCode, FleetwireError, invalid
from fleetwire.realtime import protocol
from fleetwire.realtime.admission import PAUSED, STARTED, Admission
from fleetwire.realtime.protocol import SessionProtocol
from fleetwire.realtime.session import PAUSE, RESUME, CloseSocket, PauseReading, ResumeReading
from fleetwire.transport.mqtt import codec
from fleetwire.transport.mqtt.codec import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)

AUTH_METHOD: Final = "jwt"

# 5.0 reason codes (MQTT 5.0 §2.4).
SUCCESS: Final = 0x00
GRANTED_QOS_1: Final = 0x01
NO_SUBSCRIPTION_EXISTED: Final = 0x11
REAUTHENTICATE: Final = 0x19
UNSPECIFIED: Final = 0x80
FAILURE_311: Final = 0x80  # 3.1.1 SUBACK failure
PROTOCOL_ERROR: Final = 0x82
IMPLEMENTATION_ERROR: Final = 0x83
NOT_AUTHORIZED: Final = 0x87
SERVER_BUSY: Final = 0x89
SHUTTING_DOWN: Final = 0x8B
KEEP_ALIVE_TIMEOUT: Final = 0x8D
SESSION_TAKEN_OVER: Final = 0x8E
TOPIC_FILTER_INVALID: Final = 0x8F
TOPIC_NAME_INVALID: Final = 0x90
TOPIC_ALIAS_INVALID: Final = 0x94
PACKET_TOO_LARGE: Final = 0x95
MESSAGE_RATE_TOO_HIGH: Final = 0x96
QUOTA_EXCEEDED: Final = 0x97
PAYLOAD_FORMAT_INVALID: Final = 0x99
RETAIN_NOT_SUPPORTED: Final = 0x9A
QOS_NOT_SUPPORTED: Final = 0x9B
SHARED_NOT_SUPPORTED: Final = 0x9E
SUBSCRIPTION_IDS_NOT_SUPPORTED: Final = 0xA1
MAXIMUM_CONNECT_TIME: Final = 0xA0

# Why the server ends a session -> the 5.0 DISCONNECT reason sent first (contract §8).
DISCONNECT_CODES: Final = {
    Close.REPLACED: SESSION_TAKEN_OVER,
    Close.TOKEN_EXPIRED: MAXIMUM_CONNECT_TIME,
    Close.FORBIDDEN: NOT_AUTHORIZED,
    Close.SERVER_SHUTDOWN: SHUTTING_DOWN,
    Close.RATE_LIMITED: MESSAGE_RATE_TOO_HIGH,
    Close.SLOW_CONSUMER: QUOTA_EXCEEDED,
    Close.MESSAGE_TOO_BIG: PACKET_TOO_LARGE,
    Close.PROTOCOL_ERROR: PROTOCOL_ERROR,
    Close.INTERNAL_ERROR: IMPLEMENTATION_ERROR,
}

# A refused publish: its error code -> the 5.0 PUBACK reason (only codes PUBACK may carry).
PUBACK_CODES: Final = {
    ErrorCode.INVALID_JSON: PAYLOAD_FORMAT_INVALID,
    ErrorCode.INVALID_MESSAGE: PAYLOAD_FORMAT_INVALID,
    ErrorCode.TOO_LARGE: PAYLOAD_FORMAT_INVALID,
    ErrorCode.FORBIDDEN: NOT_AUTHORIZED,
    ErrorCode.UNAUTHORIZED: NOT_AUTHORIZED,
    ErrorCode.UNKNOWN_TYPE: TOPIC_NAME_INVALID,
    ErrorCode.RATE_LIMITED: QUOTA_EXCEEDED,
}

# CONNACK refusals before any session exists (contract §8): (3.1.1 return code, 5.0 reason).
REFUSE_TOKEN: Final = (0x04, 0x86)  # bad user name or password
REFUSE_NOT_AUTHORIZED: Final = (0x05, 0x87)  # wrong role, unknown/disabled device, id != sub
REFUSE_BUSY: Final = (0x03, 0x97)  # connection limit (5.0: quota exceeded)
REFUSE_UNAVAILABLE: Final = (0x03, 0x88)  # storage unavailable
REFUSE_AUTH_METHOD: Final = (0x05, 0x8C)  # an Authentication Method other than `jwt`


def refusal(connect: Connect, codes: tuple[int, int], reason: str) -> bytes:
    """The CONNACK that refuses `connect` (then the connection closes, MQTT §3.2.2.2)."""
    if connect.version == 5:
        return codec.encode(Connack(False, codes[1], {codec.REASON_STRING: reason}), 5)
    return codec.encode(Connack(False, codes[0]), 4)


@dataclass(frozen=True, slots=True)
class SendBytes:
    data: bytes  # encoded packets


@dataclass(eq=False, slots=True)
class Inbound:
    """One publish (or AUTH) of the device: a request to run, then its acknowledgement."""

    type: str  # telemetry, telemetry_batch, status, command_result, auth
    value: Any  # what the parser made of the payload
    packet_id: int | None  # QoS 1: the packet id to PUBACK; None for QoS 0 and AUTH
    done: bool = False
    error: FleetwireError | None = None


@dataclass(frozen=True, slots=True)
class Run:
    request: Inbound  # carry it out; report with `completed` (or `reauthenticated`)


Action = SendBytes | Run | PauseReading | ResumeReading | CloseSocket


@dataclass(frozen=True, slots=True)
class MqttLimits:
    rate: float  # publishes per second (FLEETWIRE_RATE_LIMIT)
    close_after: int  # refusals in a row before DISCONNECT 0x96
    max_clock_skew_s: float
    max_packet_bytes: int  # FLEETWIRE_MAX_MESSAGE_BYTES (5.0 CONNACK Maximum Packet Size)
    max_keep_alive_s: int = 1200  # a keep-alive of 0 or above it becomes this (5.0: Server Keep Alive)
    max_in_flight: int = 64  # requests at once (5.0 CONNACK Receive Maximum)
    max_held: int = 1000  # commands held (not subscribed, or the device's window full); beyond: close
    max_session_expiry_s: int = 86_400  # a persistent session is kept at most this long
    max_subscriptions: int = 100  # topic filters per session (FLEETWIRE_MAX_SUBSCRIPTIONS)
    close_grace_s: float = 2.0
    leeway_s: float = 0.0


@dataclass(slots=True)
class OutboundCommand:
    packet_id: int
    payload: bytes
    expires_at_ms: int


@dataclass(slots=True)
class Persisted:
    """What a persistent session keeps between connections (MQTT §4.1): subscriptions, and
    commands sent but unacknowledged or not yet sent."""

    subscriptions: dict[str, int]
    unacked: list[OutboundCommand]
    held: list[tuple[bytes, int]]  # (payload, expires_at_ms)
    expires_at_ms: int = 0
    next_packet_id: int = 1


@dataclass(slots=True)
class _Outbox:
    held: deque[tuple[bytes, int]] = field(default_factory=deque)  # commands not yet sent
    unacked: dict[int, OutboundCommand] = field(default_factory=dict)  # by packet id, in send order


def valid_filter(topic_filter: str) -> bool:
    """MQTT §4.7.1: `#` only as the whole last level, `+` only as a whole level."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def matches(topic_filter: str, topic: str) -> bool:
    """Does `topic_filter` match `topic` (MQTT §4.7)?"""
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or (level != "+" and level != topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


class MqttSession:
    __slots__ = (
        "_admission",
        "_close_by_ms",
        "_closed",
        "_closing",
        "_delta",
        "_end_reason",
        "_limits",
        "_order",
        "_out",
        "_outbox",
        "_receive_maximum",
        "_session_expiry_s",
        "close_code",
        "connected_at_ms",
        "device_id",
        "jwt_auth",
        "keep_alive_s",
        "last_seen_ms",
        "next_packet_id",
        "prefix",
        "protocol",
        "session_id",
        "session_present",
        "subscriptions",
        "version",
    )

    def __init__(
        self,
        principal: Principal,
        connect: Connect,
        *,
        session_id: str,
        limits: MqttLimits,
        now_ms: int,
        restored: Persisted | None = None,
    ) -> None:
        self.protocol = SessionProtocol(
            principal,
            is_device=True,
            rate=limits.rate,
            close_after=limits.close_after,
            warning_s=0.0,
            max_clock_skew_s=limits.max_clock_skew_s,
            leeway_s=limits.leeway_s,
        )
        self.session_id = session_id
        self.device_id = principal.sub
        self.prefix = f"devices/{principal.sub}/"
        self.version: codec.Version = connect.version
        self.connected_at_ms = now_ms
        self.last_seen_ms = now_ms
        self._limits = limits
        asked = connect.keep_alive
        self.keep_alive_s = asked if 0 < asked <= limits.max_keep_alive_s else limits.max_keep_alive_s
        self.jwt_auth = connect.properties.get(codec.AUTH_METHOD) == AUTH_METHOD
        receive_maximum = connect.properties.get(codec.RECEIVE_MAXIMUM, 65535)
        self._receive_maximum = int(receive_maximum) if isinstance(receive_maximum, int) else 65535
        self._session_expiry_s = self._expiry_of(connect)
        # In-flight bound and queue (issue 12); requests wait for `device.connected`.
        self._admission: Admission[Inbound] = Admission(limits.max_in_flight, ready=False)
        self._order: deque[Inbound] = deque()  # QoS 1 publishes in arrival order, for PUBACK
        self._closing: Close | None = None
        self._close_by_ms: int | None = None
        self._closed = False
        self._end_reason: str | None = None
        self.close_code: Close | None = None
        self._out: list[Action] = []
        self._outbox = _Outbox()
        self._delta: bytes | None = None  # the twin delta not yet published (latest only)
        self.subscriptions: dict[str, int] = {}
        self.next_packet_id = 1
        self.session_present = restored is not None and not connect.clean_start
        if self.session_present and restored is not None:
            self.subscriptions = dict(restored.subscriptions)
            self.next_packet_id = restored.next_packet_id
            self._outbox.held.extend(restored.held)
            for command in restored.unacked:
                self._outbox.unacked[command.packet_id] = command

    def _expiry_of(self, connect: Connect) -> int:
        """How long the session outlives the connection (s): 3.1.1 CleanSession 0 keeps it
        (for at most `max_session_expiry_s`); 5.0 says so with Session Expiry Interval."""
        if connect.version == 4:
            return 0 if connect.clean_start else self._limits.max_session_expiry_s
        asked = connect.properties.get(codec.SESSION_EXPIRY, 0)
        return min(int(asked), self._limits.max_session_expiry_s) if isinstance(asked, int) else 0

    @property
    def principal(self) -> Principal:
        return self.protocol.principal

    @property
    def persistent(self) -> bool:
        return self._session_expiry_s > 0

    @property
    def in_flight(self) -> int:
        return self._admission.in_flight

    def actions(self) -> list[Action]:
        out = self._out
        self._out = []
        return out

    def _send(self, packet: codec.Packet) -> None:
        self._out.append(SendBytes(codec.encode(packet, self.version)))

    # -- the session starts ---------------------------------------------------------------
    def start(self, now_ms: int) -> None:
        """CONNACK (5.0: what the server offers), then a resumed session's unacknowledged
        commands again, with DUP (MQTT §4.4)."""
        props: codec.Properties = {}
        if self.version == 5:
            limits = self._limits
            props = {
                codec.MAXIMUM_QOS: 1,
                codec.RETAIN_AVAILABLE: 0,
                codec.WILDCARD_AVAILABLE: 1,
                codec.SUBSCRIPTION_ID_AVAILABLE: 0,
                codec.SHARED_AVAILABLE: 0,
                codec.MAXIMUM_PACKET_SIZE: limits.max_packet_bytes,
                codec.RECEIVE_MAXIMUM: limits.max_in_flight,
                codec.SERVER_KEEP_ALIVE: self.keep_alive_s,
                codec.SESSION_EXPIRY: self._session_expiry_s,
            }
            if self.jwt_auth:
                props[codec.AUTH_METHOD] = AUTH_METHOD
        self._send(Connack(self.session_present, SUCCESS, props))
        for command in list(self._outbox.unacked.values()):
            if command.expires_at_ms <= now_ms:
                del self._outbox.unacked[command.packet_id]
            else:
                self._send(Publish(self._commands_topic, command.payload, 1, command.packet_id, dup=True))
        self._pump(now_ms)

    def connected(self) -> None:
        """`device.connected` is recorded: the requests that waited for it run now."""
        self._admission.ready = True
        self._dispatch()

    @property
    def _commands_topic(self) -> str:
        return self.prefix + "commands"

    # -- input from the device ------------------------------------------------------------
    def receive(self, packet: codec.Packet, now_ms: int) -> None:
        if self._closing is not None or self._closed:
            return
        self.last_seen_ms = now_ms
        if isinstance(packet, Publish):
            self._publish(packet, now_ms)
        elif isinstance(packet, PubAck):
            self._outbox.unacked.pop(packet.packet_id, None)  # an unknown id: already gone
            self._pump(now_ms)
        elif isinstance(packet, PingReq):
            self._send(PingResp())
        elif isinstance(packet, Subscribe):
            self._subscribe(packet, now_ms)
        elif isinstance(packet, Unsubscribe):
            codes = tuple(
                SUCCESS if self.subscriptions.pop(f, None) is not None else NO_SUBSCRIPTION_EXISTED
                for f in packet.filters
            )
            self._send(Unsuback(packet.packet_id, codes if self.version == 5 else ()))
        elif isinstance(packet, Disconnect):
            self._disconnect(packet, now_ms)
        elif isinstance(packet, Auth):
            self._auth(packet, now_ms)
        else:  # a second CONNECT (§3.1.0), or a packet only a server sends
            self.close(Close.PROTOCOL_ERROR, now_ms)

    def _disconnect(self, packet: Disconnect, now_ms: int) -> None:
        expiry = packet.properties.get(codec.SESSION_EXPIRY)
        if isinstance(expiry, int):
            if self._session_expiry_s == 0 and expiry > 0:  # 5.0 §3.14.2.2.2
                self.close(Close.PROTOCOL_ERROR, now_ms)
                return
            self._session_expiry_s = min(expiry, self._limits.max_session_expiry_s)
        # The device asked to close: nothing is sent back (§3.14.4).
        self.close_code = Close.NORMAL
        self.close(Close.NORMAL, now_ms)

    def _auth(self, packet: Auth, now_ms: int) -> None:
        """5.0 §4.12.1 re-authentication: only after a CONNECT with method `jwt`."""
        token = packet.properties.get(codec.AUTH_DATA)
        if (
            not self.jwt_auth
            or packet.reason_code != REAUTHENTICATE
            or packet.properties.get(codec.AUTH_METHOD) != AUTH_METHOD
            or not isinstance(token, bytes)
        ):
            self.close(Close.PROTOCOL_ERROR, now_ms)
            return
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        self._accept(Inbound("auth", text, None))

    def _publish(self, packet: Publish, now_ms: int) -> None:
        if packet.qos == 2:  # not offered (contract §8)
            self.close(Close.PROTOCOL_ERROR, now_ms, QOS_NOT_SUPPORTED)
            return
        if self.version == 5:
            if packet.retain:  # CONNACK said Retain Available 0 (5.0 §3.3.1.3)
                self.close(Close.PROTOCOL_ERROR, now_ms, RETAIN_NOT_SUPPORTED)
                return
            if codec.TOPIC_ALIAS in packet.properties:  # Topic Alias Maximum 0 (§3.3.2.3.4)
                self.close(Close.PROTOCOL_ERROR, now_ms, TOPIC_ALIAS_INVALID)
                return
        packet_id = packet.packet_id
        allowed = self.protocol.limiter.allow(now_ms / 1000)
        if allowed is None:
            self.close(Close.RATE_LIMITED, now_ms)
            return
        if allowed is False:
            self._refuse(packet_id, FleetwireError(ErrorCode.RATE_LIMITED, "message rate above the limit"))
            return
        topic = packet.topic
        if not topic.startswith(self.prefix):
            if self.version == 4:  # 3.1.1 has no negative PUBACK: the connection closes (§8)
                self.close(Close.PROTOCOL_ERROR, now_ms)
                return
            forbidden = FleetwireError(ErrorCode.FORBIDDEN, "a device publishes only to its own topics")
            self._refuse(packet_id, forbidden)
            return
        try:
            kind, value = self._parse(topic[len(self.prefix) :], packet.payload, now_ms)
        except FleetwireError as exc:
            self._refuse(packet_id, exc)
            return
        self._accept(Inbound(kind, value, packet_id))

    def _parse(self, suffix: str, payload: bytes, now_ms: int) -> tuple[str, Any]:
        """A publish on the device's own topic -> (request type, checked value)."""
        if suffix == "telemetry":
            kind = "telemetry"
        elif suffix == "status":
            kind = "status"
        elif suffix.startswith("commands/") and suffix.endswith("/result") and suffix.count("/") == 2:
            kind = "command_result"
        elif suffix == "twin/reported":
            kind = "twin_report"
        else:
            raise FleetwireError(ErrorCode.UNKNOWN_TYPE, f"no such topic: {self.prefix}{suffix}")
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise FleetwireError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc.msg}") from None
        if not isinstance(message, dict):
            raise invalid("the payload is a JSON object")
        if kind == "telemetry" and "records" in message:
            kind = "telemetry_batch"
        elif kind == "command_result":
            message["command_id"] = suffix.split("/")[1]  # the topic names the command
        return kind, self.protocol.parse(kind, message, now_ms)

    def _refuse(self, packet_id: int | None, error: FleetwireError) -> None:
        entry = Inbound("refused", None, packet_id, done=True, error=error)
        if packet_id is None:
            self._report(entry)
        else:
            self._order.append(entry)
            self._flush()

    def _accept(self, request: Inbound) -> None:
        if request.packet_id is not None:
            self._order.append(request)
        admitted = self._admission.admit(request)  # runs now, or waits its turn (admission.py)
        if admitted & PAUSED:
            self._out.append(PAUSE)  # before the run: the transport stops reading first
        if admitted & STARTED:
            self._out.append(Run(request))

    def _dispatch(self) -> None:
        while (request := self._admission.take()) is not None:
            self._out.append(Run(request))

    def _subscribe(self, packet: Subscribe, now_ms: int) -> None:
        if 0x0B in packet.properties:  # CONNACK said Subscription Identifier Available 0
            self.close(Close.PROTOCOL_ERROR, now_ms, SUBSCRIPTION_IDS_NOT_SUPPORTED)
            return
        v5 = self.version == 5
        codes = []
        for topic_filter, options in packet.filters:
            if topic_filter.startswith("$share/"):
                codes.append(SHARED_NOT_SUPPORTED if v5 else FAILURE_311)
            elif not valid_filter(topic_filter):
                codes.append(TOPIC_FILTER_INVALID if v5 else FAILURE_311)
            elif not topic_filter.startswith(self.prefix):  # devices/{id}/# and below only
                codes.append(NOT_AUTHORIZED if v5 else FAILURE_311)
            elif (
                topic_filter not in self.subscriptions
                and len(self.subscriptions) >= self._limits.max_subscriptions
            ):
                codes.append(QUOTA_EXCEEDED if v5 else FAILURE_311)  # bounded memory per session
            else:
                qos = min(options & 0x03, 1)
                self.subscriptions[topic_filter] = qos
                codes.append(qos)
        self._send(Suback(packet.packet_id, tuple(codes)))
        self._pump(now_ms)  # queued commands go out after the SUBACK (contract §8)
        self._publish_delta()

    def _qos_for(self, topic: str) -> int | None:
        """The QoS a message on `topic` goes out with; None when not subscribed."""
        granted = None
        for topic_filter, qos in self.subscriptions.items():
            if matches(topic_filter, topic) and (granted is None or qos > granted):
                granted = qos
        return granted

    # -- results of requests --------------------------------------------------------------
    def completed(self, request: Inbound, error: FleetwireError | None, now_ms: int) -> None:
        """A request finished (error None: it succeeded; telemetry: it is stored)."""
        request.done = True
        request.error = error
        if request.type == "auth":
            if error is not None:  # 5.0 §4.12.1: a failed re-authentication disconnects
                self._finished(now_ms)
                self.close(Close.FORBIDDEN, now_ms)
                return
            self._send(Auth(SUCCESS, {codec.AUTH_METHOD: AUTH_METHOD}))
        elif request.packet_id is None:
            if error is not None:
                self._report(request)
        else:
            self._flush()
        self._finished(now_ms)

    def reauthenticate(self, fresh: Principal) -> FleetwireError | None:
        """A new token from AUTH: the same sub and role; the expiry moves (contract §8)."""
        return self.protocol.refresh(fresh)

    def _flush(self) -> None:
        """PUBACKs in arrival order: the head of the line, as soon as it is done."""
        order = self._order
        while order and order[0].done:
            entry = order.popleft()
            if self._closed:
                continue
            reason = SUCCESS
            if entry.error is not None:
                self._report(entry)
                if self.version == 5:
                    reason = PUBACK_CODES.get(entry.error.code, UNSPECIFIED)
            assert entry.packet_id is not None  # only QoS 1 publishes are ordered
            self._send(PubAck(entry.packet_id, reason))

    def _report(self, entry: Inbound) -> None:
        """A refused publish's error object to `devices/{id}/errors`, if subscribed (QoS 0)."""
        assert entry.error is not None
        topic = self.prefix + "errors"
        if not self._closed and self._qos_for(topic) is not None:
            self._send(Publish(topic, protocol.error(entry.packet_id, entry.error)))

    def _finished(self, now_ms: int) -> None:
        admission = self._admission
        admission.finish()
        self._dispatch()
        if self._closing is not None:  # closing: reading stays paused until the socket closes
            if admission.in_flight == 0:
                self._close_now(self._closing)
        elif admission.resume():
            self._out.append(RESUME)

    # -- commands to the device -----------------------------------------------------------
    def command(self, message: dict[str, Any], now_ms: int) -> None:
        """A command for the device (the WebSocket `command` message): published on
        `devices/{id}/commands` without `type`, when subscribed and the window allows."""
        if self._closed:
            return
        body = {k: v for k, v in message.items() if k != "type"}
        expires = message.get("expires_at")
        expires_at_ms = parse_rfc3339(expires) if isinstance(expires, str) else now_ms + 3_600_000
        held = self._outbox.held
        if len(held) >= self._limits.max_held:
            self.close(Close.SLOW_CONSUMER, now_ms)
            return
        held.append((orjson.dumps(body), expires_at_ms))
        self._pump(now_ms)

    def twin_delta(self, message: dict[str, Any]) -> None:
        """The twin's delta changed (contract §6): `{"version", "delta"}` on
        `devices/{id}/twin/delta`, QoS 0. It is state, not a message: only the latest is
        kept until the device subscribes (a delta given at connect waits for the SUBACK)."""
        if self._closed:
            return
        self._delta = orjson.dumps({k: v for k, v in message.items() if k != "type"})
        self._publish_delta()

    def _publish_delta(self) -> None:
        topic = self.prefix + "twin/delta"
        if self._delta is not None and not self._closed and self._qos_for(topic) is not None:
            self._send(Publish(topic, self._delta))
            self._delta = None

    def _pump(self, now_ms: int) -> None:
        outbox = self._outbox
        held = outbox.held
        if not held or self._closed:
            return
        qos = self._qos_for(self._commands_topic)
        if qos is None:
            return  # held until the device subscribes
        while held and len(outbox.unacked) < self._receive_maximum:
            payload, expires_at_ms = held.popleft()
            if expires_at_ms <= now_ms:
                continue  # expired meanwhile: the command service ends it
            if qos == 0:
                self._send(Publish(self._commands_topic, payload))
                continue
            packet_id = self._next_packet_id()
            outbox.unacked[packet_id] = OutboundCommand(packet_id, payload, expires_at_ms)
            self._send(Publish(self._commands_topic, payload, 1, packet_id))

    def _next_packet_id(self) -> int:
        unacked = self._outbox.unacked
        while True:
            packet_id = self.next_packet_id
            self.next_packet_id = packet_id % 65535 + 1
            if packet_id not in unacked:
                return packet_id

    def persisted(self, now_ms: int) -> Persisted | None:
        """What a persistent session keeps once this connection has ended (None: nothing)."""
        if not self.persistent:
            return None
        outbox = self._outbox
        return Persisted(
            dict(self.subscriptions),
            list(outbox.unacked.values()),
            list(outbox.held),
            now_ms + self._session_expiry_s * 1000,
            self.next_packet_id,
        )

    # -- the server ends the session ------------------------------------------------------
    def close(self, code: Close, now_ms: int, reason_code: int | None = None) -> None:
        """End the session with `code`, after the acknowledgements of accepted publishes
        (bounded by `close_grace_s`); on 5.0 a DISCONNECT with its reason goes first."""
        if self._closing is not None or self._closed:
            return
        self.close_code = code
        if self.in_flight > 0 and code is not Close.PROTOCOL_ERROR:
            self._closing = code
            self._close_by_ms = now_ms + int(self._limits.close_grace_s * 1000)
            if self._admission.pause():  # read nothing more while the PUBACKs go out
                self._out.append(PAUSE)
            return
        self._close_now(code, reason_code)

    def protocol_error(self, reason_code: int, now_ms: int) -> None:
        """The decoder refused the stream (0x81 malformed, 0x82 protocol error, 0x95 too large)."""
        code = Close.MESSAGE_TOO_BIG if reason_code == PACKET_TOO_LARGE else Close.PROTOCOL_ERROR
        self.close_code = self.close_code or code
        self._close_now(code, reason_code)

    def _close_now(self, code: Close, reason_code: int | None = None) -> None:
        self._admission.shut()  # what waits is dropped; nothing starts or resumes any more
        self._closing = None
        self._close_by_ms = None
        if self._closed:
            return
        self._closed = True
        if self.version == 5 and code is not Close.NORMAL:
            reason = reason_code if reason_code is not None else DISCONNECT_CODES.get(code, UNSPECIFIED)
            self._send(Disconnect(reason))
        self._out.append(CloseSocket(code, code.reason))

    # -- time -----------------------------------------------------------------------------
    def next_deadline_ms(self) -> int:
        """When `timer` must run next: keep-alive, the token's expiry, or the close grace."""
        deadline = min(self.protocol.token.expires_at_ms, self.last_seen_ms + self.keep_alive_s * 1500)
        if self._close_by_ms is not None:
            deadline = min(deadline, self._close_by_ms)
        return deadline

    def timer(self, now_ms: int) -> None:
        if self._closed:
            return
        if self._closing is not None and self._close_by_ms is not None and now_ms >= self._close_by_ms:
            self._close_now(self._closing)
            return
        if now_ms >= self.last_seen_ms + self.keep_alive_s * 1500:  # MQTT §3.1.2.10: 1.5 ×
            self._end_reason = "timeout"
            self.close_code = self.close_code or Close.SERVER_SHUTDOWN
            self._close_now(Close.SERVER_SHUTDOWN, KEEP_ALIVE_TIMEOUT)
            return
        if now_ms >= self.protocol.token.expires_at_ms:
            self.close(Close.TOKEN_EXPIRED, now_ms)

    # -- the end --------------------------------------------------------------------------
    def disconnect_reason(self, transport_code: int | None) -> str:
        """The `device.disconnected` reason: the server's own decision, never the peer's."""
        if self._end_reason is not None:
            return self._end_reason
        return disconnect_reason(self.close_code if self.close_code is not None else transport_code)
