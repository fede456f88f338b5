"""The session core (contract §2) without I/O: messages and the time in, actions out.

A `Session` is one device or client session as a state machine. Its inputs are what the
transport and the services report — a message (`receive`), a pong, a finished request
(`completed`, `subscribed`), `device.connected` recorded (`connected`), the heartbeat tick,
a due timer, a close decided by a service — each with the current time. It never awaits,
reads a clock or touches a socket; what it decides piles up as actions that the endpoint
drains with `actions()` and carries out in order: send, send a framed event, call a
service, ping, pause or resume reading, close.

The rules that live here (and nowhere else):
- Every request gets exactly one reply echoing its `id`, in the order requests complete.
- A device's requests wait until its `device.connected` is recorded, so that event takes
  a lower `seq` than anything the device sends.
- At most `max_in_flight` requests run at once; at the cap the session pauses reading, so
  backpressure reaches the peer's TCP window instead of piling up tasks. Messages the
  transport had already read (the rest of one read buffer) wait, parsed, for a free slot.
  (That rule is `realtime/admission.py`'s, shared with the MQTT core.)
- A close decided by the server (rate flood 4029, token expiry 4001, shutdown 1001,
  replaced 4009 …) lets the replies of requests already accepted go out first, for at most
  `close_grace_s`, and reads nothing more meanwhile.
- Heartbeats: a tick pings; the next tick with the ping unanswered ends the session with
  reason `timeout`. The token warns `token_warning_s` before `exp` and closes 4001 at it.
- A client's live events of a device wait while that device's history is replayed after
  a `subscribe`; the replay goes first, then the held events newer than it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

import orjson

from fleetwire.auth.principal import Principal
from fleetwire.domain.clock import format_ms
from fleetwire.domain.close import Close, disconnect_reason
from fleetwire.domain.errors import FleetwireError
from fleetwire.realtime import protocol
from fleetwire.realtime.admission import PAUSED, STARTED, Admission
from fleetwire.realtime.protocol import CloseWith, Reply, Request, SessionProtocol
from fleetwire.services.subscriptions import SubscriptionPlan


@dataclass(frozen=True, slots=True)
class Send:
    payload: bytes  # one JSON text message


@dataclass(frozen=True, slots=True)
class SendFrame:
    frame: bytes  # an event framed once by the hub, shared by every subscriber


@dataclass(frozen=True, slots=True)
class Call:
    request: Request  # carry it out; report with `completed` (or `subscribed`)


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class PauseReading:
    pass


@dataclass(frozen=True, slots=True)
class ResumeReading:
    pass


@dataclass(frozen=True, slots=True)
class CloseSocket:
    code: Close
    reason: str


Action = Send | SendFrame | Call | Ping | PauseReading | ResumeReading | CloseSocket

PING: Final = Ping()
PAUSE: Final = PauseReading()
RESUME: Final = ResumeReading()


@dataclass(frozen=True, slots=True)
class SessionLimits:
    rate: float  # messages per second (contract §4 FLEETWIRE_RATE_LIMIT)
    close_after: int  # refusals in a row before 4029
    warning_s: float  # `token_expiring` this long before exp
    max_clock_skew_s: float
    heartbeat_s: float
    max_in_flight: int = 64
    close_grace_s: float = 2.0
    leeway_s: float = 0.0
    max_held: int = 10_000  # live events held per device during a replay; beyond: 4008


class Session:
    # Slots: one Session per connection, so every byte counts (issue 12: ≤ 12 KB per idle connection).
    __slots__ = (
        "_admission",
        "_awaiting_pong",
        "_close_by_ms",
        "_closed",
        "_closing",
        "_end_reason",
        "_held",
        "_limits",
        "_out",
        "close_code",
        "connected_at_ms",
        "is_device",
        "last_seen_ms",
        "protocol",
        "session_id",
    )

    def __init__(
        self,
        principal: Principal,
        *,
        session_id: str,
        is_device: bool,
        limits: SessionLimits,
        now_ms: int,
    ) -> None:
        self.protocol = SessionProtocol(
            principal,
            is_device=is_device,
            rate=limits.rate,
            close_after=limits.close_after,
            warning_s=limits.warning_s,
            max_clock_skew_s=limits.max_clock_skew_s,
            leeway_s=limits.leeway_s,
        )
        self.session_id = session_id
        self.is_device = is_device
        self.connected_at_ms = now_ms
        self.last_seen_ms = now_ms
        self._limits = limits
        # In-flight bound and queue (issue 12); a device's requests wait for `device.connected`.
        self._admission: Admission[Request] = Admission(limits.max_in_flight, ready=not is_device)
        self._awaiting_pong = False
        self._closing: Close | None = None  # a close waiting for in-flight replies
        self._close_by_ms: int | None = None
        self._closed = False  # the CloseSocket action was emitted
        self._end_reason: str | None = None  # set when the end is not told by a close code
        self.close_code: Close | None = None  # what the server closed with, if it closed first
        self._held: dict[str, deque[tuple[int, bytes]]] = {}
        self._out: list[Action] = []

    @property
    def principal(self) -> Principal:
        return self.protocol.principal

    @property
    def heartbeat_s(self) -> float:
        return self._limits.heartbeat_s

    @property
    def holding(self) -> bool:
        """Some device's live events are held (a replay is in progress)."""
        return bool(self._held)

    @property
    def in_flight(self) -> int:
        """Accepted requests without their reply yet (running or waiting to run)."""
        return self._admission.in_flight

    @property
    def running(self) -> int:
        return self._admission.running

    def actions(self) -> list[Action]:
        """What to do now, in order; each action is returned once."""
        out = self._out
        self._out = []
        return out

    # -- the session starts ---------------------------------------------------------------
    def welcome(self, now_ms: int, device_id: str | None = None) -> None:
        body: dict[str, object] = {"type": "welcome"}
        if device_id is not None:
            body["device_id"] = device_id
        body["session_id"] = self.session_id
        body["server_time"] = format_ms(now_ms)
        body["token_expires_at"] = format_ms(self.principal.expires_at_ms)
        if self.is_device:
            body["heartbeat_s"] = self._limits.heartbeat_s
        else:
            body["role"] = self.principal.role.value
        self._out.append(Send(orjson.dumps(body)))

    def connected(self) -> None:
        """`device.connected` is recorded: the requests that waited for it run now."""
        self._admission.ready = True
        self._dispatch()

    # -- input from the peer --------------------------------------------------------------
    def receive(self, payload: bytes, is_text: bool, now_ms: int) -> None:
        if self._closing is not None or self._closed:
            return  # after the server decided to close, nothing more is read (RFC 6455 §7.1.1)
        self.last_seen_ms = now_ms
        now = now_ms / 1000
        outcome = (
            self.protocol.receive(payload, now, now_ms) if is_text else self.protocol.receive_binary(now)
        )
        if isinstance(outcome, Request):
            self._accept(outcome)
        elif isinstance(outcome, Reply):
            self._out.append(Send(outcome.payload))
        elif isinstance(outcome, CloseWith):
            self.close(outcome.code, now_ms)
        else:
            reply, close = outcome
            self._out.append(Send(reply.payload))
            self.close(close.code, now_ms)

    def pong(self, now_ms: int) -> None:
        self._awaiting_pong = False
        self.last_seen_ms = now_ms

    def _accept(self, request: Request) -> None:
        admitted = self._admission.admit(request)  # runs now, or waits its turn (admission.py)
        if admitted & PAUSED:
            self._out.append(PAUSE)  # before the call: the transport stops reading first
        if admitted & STARTED:
            self._out.append(Call(request))

    def _dispatch(self) -> None:
        """Start queued requests while there is a free slot (a closing session still
        answers what it accepted)."""
        while (request := self._admission.take()) is not None:
            self._out.append(Call(request))

    # -- results of calls -----------------------------------------------------------------
    def completed(self, reply: bytes, now_ms: int) -> None:
        """A call finished with this reply (an ack or an error); b"" when it sent none."""
        if reply and not self._closed:
            self._out.append(Send(reply))
        self._finished(now_ms)

    def failed(self, request: Request, error: FleetwireError, now_ms: int) -> None:
        self.completed(protocol.error(request.id, error), now_ms)

    def subscribed(self, request: Request, plan: SubscriptionPlan, now_ms: int) -> None:
        """The ack, then each device's replay, then its held live events (contract §2.4)."""
        fields: dict[str, object] = {"subscription_id": plan.subscription_id, "snapshot": plan.snapshot}
        if plan.recovered is not None:
            fields["recovered"] = plan.recovered
        out = self._out
        out.append(Send(protocol.ack(request.id, **fields)))
        for device_id in plan.device_ids:
            replayed_to = 0
            for event in plan.replays.get(device_id, ()):
                if event.event_class in plan.events:
                    out.append(Send(event.payload))
                replayed_to = event.seq
            self.release(device_id, max(replayed_to, plan.resume.get(device_id, 0)))
        self._finished(now_ms)

    def _finished(self, now_ms: int) -> None:
        admission = self._admission
        admission.finish()
        self._dispatch()
        if self._closing is not None:  # closing: reading stays paused until the socket closes
            if admission.in_flight == 0:
                self._close_now(self._closing, self._closing.reason)
        elif admission.resume():
            self._out.append(RESUME)

    # -- the server ends the session -----------------------------------------------------
    def close(self, code: Close, now_ms: int) -> None:
        """End the session with `code`, after the replies of accepted requests (bounded)."""
        if self._closing is not None or self._closed:
            return
        self.close_code = code
        if self.in_flight > 0:  # waiting for `device.connected`, a free slot or their service
            self._closing = code
            self._close_by_ms = now_ms + int(self._limits.close_grace_s * 1000)
            if self._admission.pause():  # read nothing more while the replies go out
                self._out.append(PAUSE)
            return
        self._close_now(code, code.reason)

    def _close_now(self, code: Close, reason: str) -> None:
        self._admission.shut()  # what waits is dropped; nothing starts or resumes any more
        self._closing = None
        self._close_by_ms = None
        if not self._closed:
            self._closed = True
            self._out.append(CloseSocket(code, reason))

    def heartbeat(self, now_ms: int) -> None:
        if self._closed:
            return
        if self._awaiting_pong:
            # The peer is not answering; it is unlikely to read a close frame either.
            self._end_reason = "timeout"
            self.close_code = self.close_code or Close.SERVER_SHUTDOWN
            self._close_now(Close.SERVER_SHUTDOWN, "timeout")
            return
        self._awaiting_pong = True
        self._out.append(PING)

    # -- time -----------------------------------------------------------------------------
    def next_deadline_ms(self) -> int:
        """When `timer` must run next: the token's warning or expiry, or the close grace."""
        deadline = self.protocol.token.next_deadline_ms()
        if self._close_by_ms is not None:
            deadline = min(deadline, self._close_by_ms)
        return deadline

    def timer(self, now_ms: int) -> None:
        if self._closed:
            return
        if self._closing is not None and self._close_by_ms is not None and now_ms >= self._close_by_ms:
            self._close_now(self._closing, self._closing.reason)
            return
        outcome = self.protocol.token.due(now_ms)
        if isinstance(outcome, CloseWith):
            self.close(outcome.code, now_ms)
        elif isinstance(outcome, Reply):
            self._out.append(Send(outcome.payload))

    def refresh(self, fresh: Principal) -> FleetwireError | None:
        """An in-band `auth` (contract §2.1): same sub and role; the deadline moves."""
        return self.protocol.refresh(fresh)

    # -- a client's live events -----------------------------------------------------------
    def deliver(self, device_id: str, seq: int, frame: bytes) -> None:
        held = self._held.get(device_id)
        if held is None:
            self._out.append(SendFrame(frame))
        elif len(held) >= self._limits.max_held:
            self._close_now(Close.SLOW_CONSUMER, Close.SLOW_CONSUMER.reason)
            self.close_code = self.close_code or Close.SLOW_CONSUMER
        else:
            held.append((seq, frame))

    def hold(self, device_ids: list[str]) -> None:
        for device_id in device_ids:
            self._held.setdefault(device_id, deque())

    def release(self, device_id: str, replayed_to: int) -> None:
        """History up to `replayed_to` was sent: send held live events after it, then go live."""
        held = self._held.pop(device_id, None)
        if held:
            self._out.extend(SendFrame(frame) for seq, frame in held if seq > replayed_to)

    # -- the end --------------------------------------------------------------------------
    def disconnect_reason(self, transport_code: int | None) -> str:
        """The `device.disconnected` reason: the server's own code decides, never the peer's."""
        if self._end_reason is not None:
            return self._end_reason
        return disconnect_reason(self.close_code if self.close_code is not None else transport_code)
