"""WebSocket endpoints: the thin loop that runs a `Session`'s actions against a socket and
the services. No rule lives here; see realtime/session.py for them.

The endpoint is the transport's `Handler` (socket callbacks in), the services' local session
(`send`, `close`, `heartbeat`, `connected`), and for clients the hub's subscriber.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

from fleetwire.auth.principal import AuthError, Principal
from fleetwire.domain.clock import Clock, Timer, format_ms
from fleetwire.domain.close import Close
from fleetwire.domain.devices import Device
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.twin import TwinWrite
from fleetwire.events.hub import Subscription
from fleetwire.realtime import protocol
from fleetwire.realtime.protocol import Request
from fleetwire.realtime.session import (
    Call,
    CloseSocket,
    PauseReading,
    Ping,
    ResumeReading,
    Send,
    SendFrame,
    Session,
)
from fleetwire.services.auth import Authenticator
from fleetwire.services.commands import CommandService
from fleetwire.services.ingest import IngestService
from fleetwire.services.jobs import JobService
from fleetwire.services.sessions import SessionService
from fleetwire.services.subscriptions import SubscriptionService
from fleetwire.services.tasks import OUTAGES
from fleetwire.services.twin import TwinService
from fleetwire.store.base import WriteResult
from fleetwire.transport.base import Socket

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EndpointServices:
    """What endpoints call: built once by create_app, shared by every endpoint."""

    node_id: str
    clock: Clock
    auth: Authenticator
    sessions: SessionService
    ingest: IngestService
    commands: CommandService
    subscriptions: SubscriptionService
    twin: TwinService
    jobs: JobService | None = None


class Endpoint:
    """What device and client endpoints share: running actions, calls, the token timer."""

    __slots__ = (
        "_calls",
        "_deadline_ms",
        "_timer",
        "connected_at_ms",
        "core",
        "services",
        "session_id",
        "socket",
    )
    # Request type -> the name of the method that carries it out (per class, not per connection).
    _HANDLERS: ClassVar[dict[str, str]] = {}

    def __init__(self, services: EndpointServices, session: Session) -> None:
        self.services = services
        self.core = session
        self.session_id = session.session_id
        self.connected_at_ms = session.connected_at_ms
        self.socket: Socket | None = None
        self._timer: Timer | None = None
        self._deadline_ms: int | None = None
        self._calls: set[asyncio.Task[None]] | None = None  # made on the first task

    @property
    def principal(self) -> Principal:
        return self.core.principal

    # -- transport callbacks ----------------------------------------------------------------
    def on_open(self, socket: Socket) -> None:
        self.socket = socket
        self._welcome(self.services.clock.now_ms())
        self._opened()
        self._run()

    def on_message(self, payload: bytes, is_text: bool) -> None:
        self.core.receive(payload, is_text, self.services.clock.now_ms())
        self._run()

    def on_pong(self) -> None:
        self.core.pong(self.services.clock.now_ms())

    def on_closed(self, code: int | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in self._calls or ():
            task.cancel()
        core = self.core
        reason = core.disconnect_reason(code)
        # Issue 17: a closed session can be debugged from the server's log (never a token).
        principal = core.principal
        log.info(
            "session %s closed: %s %s, code %s, reason %s",
            self.session_id,
            "device" if core.is_device else principal.role.value,
            principal.sub,
            int(core.close_code) if core.close_code is not None else code,
            reason,
        )
        self._ended(reason)

    # -- what services call ---------------------------------------------------------------
    def send(self, payload: bytes) -> None:
        if self.socket is not None:
            self.socket.send(payload)

    def close(self, code: Close) -> None:
        self.core.close(code, self.services.clock.now_ms())
        self._run()

    def heartbeat(self, now_ms: int) -> None:
        self.core.heartbeat(now_ms)
        self._deadline_ms = None  # a deferred deadline may now be near enough to arm
        self._run()

    # -- running actions ------------------------------------------------------------------
    def _run(self) -> None:
        socket = self.socket
        for action in self.core.actions():
            if type(action) is Send:
                if socket is not None:
                    socket.send(action.payload)
            elif type(action) is SendFrame:
                if socket is not None:
                    socket.send_frame(action.frame)
            elif type(action) is Call:
                self._call(action.request)
            elif type(action) is Ping:
                if socket is not None:
                    socket.ping()
            elif type(action) is PauseReading:
                if socket is not None:
                    socket.pause_reading()
            elif type(action) is ResumeReading:
                if socket is not None:
                    socket.resume_reading()
            elif type(action) is CloseSocket and socket is not None:
                socket.close(int(action.code), action.reason)
        self._arm_timer()

    def _arm_timer(self) -> None:
        """A timer for the core's next deadline, armed only once it is due before the
        heartbeat after next: a one-hour token costs an idle connection no timer (memory,
        and a heap push per handshake) until its last heartbeats; every tick looks again."""
        deadline = self.core.next_deadline_ms()
        if deadline == self._deadline_ms:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline_ms = deadline
        delay = max((deadline - self.services.clock.now_ms()) / 1000, 0.0)
        if delay <= 2 * self.core.heartbeat_s:
            self._timer = self.services.clock.call_later(delay, self._timer_due)

    def _timer_due(self) -> None:
        self._timer = None
        self._deadline_ms = None
        self.core.timer(self.services.clock.now_ms())
        self._run()

    def _call(self, request: Request) -> None:
        handler = self._handler(request.type)
        task = asyncio.get_running_loop().create_task(self._answer(request, handler))
        if self._calls is None:
            self._calls = set()
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _answer(self, request: Request, handler: Callable[[Request], Awaitable[bytes | None]]) -> None:
        """Carry out one request; its one reply is the ack it built or the error it raised."""
        clock = self.services.clock
        try:
            reply = await handler(request)
        except FleetwireError as exc:
            self.core.failed(request, exc, clock.now_ms())
        except OUTAGES as exc:
            log.warning("request %s: %s", request.type, exc)
            unavailable = FleetwireError(
                ErrorCode.UNAVAILABLE, "a backing service is unavailable; retry later"
            )
            self.core.failed(request, unavailable, clock.now_ms())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request %s failed", request.type)
            self.core.failed(request, FleetwireError(ErrorCode.INTERNAL, "internal error"), clock.now_ms())
        else:
            if reply is not None:  # None: the handler reported to the core itself
                self.core.completed(reply, clock.now_ms())
        self._run()

    async def _refresh(self, request: Request) -> bytes:
        try:
            fresh = await self.services.auth.verify(request.value)
        except AuthError as exc:
            raise FleetwireError(ErrorCode.UNAUTHORIZED, str(exc) or "token refused") from exc
        problem = self.core.refresh(fresh)
        if problem is not None:
            raise problem
        self._refreshed()
        return protocol.ack(request.id, token_expires_at=format_ms(fresh.expires_at_ms))

    # -- per kind -------------------------------------------------------------------------
    def _welcome(self, now_ms: int) -> None:
        raise NotImplementedError

    def _opened(self) -> None:
        raise NotImplementedError

    def _ended(self, reason: str) -> None:
        raise NotImplementedError

    def _handler(self, kind: str) -> Callable[[Request], Awaitable[bytes | None]]:
        handler: Callable[[Request], Awaitable[bytes | None]] = getattr(self, self._HANDLERS[kind])
        return handler

    def _refreshed(self) -> None:
        """The principal changed (a subclass may need to re-check rights)."""


class DeviceEndpoint(Endpoint):
    __slots__ = ("device", "device_id")
    transport: ClassVar[str] = "websocket"  # `data.transport` of `device.connected` (contract §8)
    _HANDLERS: ClassVar[dict[str, str]] = {
        "status": "_status",
        "command_result": "_command_result",
        "twin_report": "_twin_report",
        "twin_get": "_twin_get",
        "auth": "_refresh",
    }

    def __init__(self, services: EndpointServices, session: Session, device: Device) -> None:
        super().__init__(services, session)
        self.device_id = device.id
        self.device = device  # kept current by SessionService (telemetry schema)

    @property
    def last_seen_ms(self) -> int:
        return self.core.last_seen_ms

    def connected(self) -> None:
        self.core.connected()
        self._run()

    def _welcome(self, now_ms: int) -> None:
        self.core.welcome(now_ms, self.device_id)

    def _opened(self) -> None:
        self.services.sessions.device_opened(self)

    def _ended(self, reason: str) -> None:
        self.services.sessions.device_closed(self, reason)

    def _call(self, request: Request) -> None:
        """Telemetry waits for its commit with a callback, not a task (the hot path)."""
        if request.type != "telemetry" and request.type != "telemetry_batch":
            super()._call(request)
            return
        try:
            future = self.services.ingest.submit_telemetry(
                self.device, request.value, batch=request.type != "telemetry"
            )
        except FleetwireError as exc:
            self.core.failed(request, exc, self.services.clock.now_ms())
            self._run()
            return
        future.add_done_callback(functools.partial(self._ingested, request))

    def _ingested(self, request: Request, future: asyncio.Future[WriteResult]) -> None:
        now = self.services.clock.now_ms()
        try:
            accepted = IngestService.accepted(future, len(request.value))
        except FleetwireError as exc:
            self.core.failed(request, exc, now)
        except Exception:
            log.exception("request %s failed", request.type)
            self.core.failed(request, FleetwireError(ErrorCode.INTERNAL, "internal error"), now)
        else:
            self.core.completed(protocol.ack(request.id, accepted=accepted), now)
        self._run()

    async def _status(self, request: Request) -> bytes:
        changed = await self.services.ingest.status(self.device_id, request.value, "device")
        return protocol.ack(request.id, changed=changed)

    async def _command_result(self, request: Request) -> bytes:
        command_id, ok, result, error = request.value
        await self.services.commands.result(self.device_id, command_id, ok, result, error)
        return protocol.ack(request.id)

    async def _twin_report(self, request: Request) -> bytes:
        write: TwinWrite = request.value
        twin = await self.services.twin.report(self.principal, self.device_id, write.patch, write.if_version)
        return protocol.ack(request.id, version=twin.version)

    async def _twin_get(self, request: Request) -> bytes:
        twin = await self.services.twin.get(self.principal, self.device_id)
        return protocol.ack(request.id, twin=twin.public())


class ClientEndpoint(Endpoint):
    __slots__ = ("_subscription_count", "live", "subscriptions")
    _HANDLERS: ClassVar[dict[str, str]] = {
        "subscribe": "_subscribe",
        "unsubscribe": "_unsubscribe",
        "command": "_command",
        "twin_update": "_twin_update",
        "auth": "_refresh",
    }

    def __init__(self, services: EndpointServices, session: Session) -> None:
        super().__init__(services, session)
        self.subscriptions: dict[str, Subscription] = {}
        self._subscription_count = 0
        self.live: Socket | None = None  # the hub's Subscriber.live

    def _welcome(self, now_ms: int) -> None:
        self.core.welcome(now_ms)

    def _opened(self) -> None:
        self.services.sessions.opened(self)

    def _run(self) -> None:
        super()._run()
        # After the actions ran: a replay's frames are out before the hub writes directly.
        self.live = self.socket if not self.core.holding else None

    def _ended(self, reason: str) -> None:
        self.live = None
        self.services.subscriptions.drop(self)
        self.services.sessions.closed(self)
        if self.services.jobs is not None:
            self.services.jobs.unwatch(self)

    def _refreshed(self) -> None:
        self.services.subscriptions.rights_changed()
        jobs = self.services.jobs
        if jobs is not None and jobs.watching(self):
            jobs.watch(self, self.principal, self.send)  # judged by the new token from now on

    async def _subscribe(self, request: Request) -> None:
        plan = await self.services.subscriptions.subscribe(self, request.value)
        if request.value.jobs and self.services.jobs is not None:
            self.services.jobs.watch(self, self.principal, self.send)
        self.core.subscribed(request, plan, self.services.clock.now_ms())

    async def _unsubscribe(self, request: Request) -> bytes:
        self.services.subscriptions.unsubscribe(self, request.value)
        return protocol.ack(request.id)

    async def _command(self, request: Request) -> bytes:
        command = await self.services.commands.issue(
            self.principal,
            request.value,
            issuer_node=self.services.node_id,
            issuer_session=self.session_id,
        )
        return protocol.ack(request.id, command_id=command.id, state=command.state.value)

    async def _twin_update(self, request: Request) -> bytes:
        write: TwinWrite = request.value
        assert write.device_id is not None  # parsed with its device
        twin = await self.services.twin.update_desired(
            self.principal, write.device_id, write.patch, write.if_version
        )
        return protocol.ack(request.id, version=twin.version)

    # -- the hub's subscriber -------------------------------------------------------------
    def next_subscription_id(self) -> str:
        self._subscription_count += 1
        return f"sub-{self._subscription_count}"

    def deliver(self, device_id: str, seq: int, frame: bytes) -> None:
        live = self.live
        if live is not None:  # nothing held: straight out, no action object, no allocation
            live.write_frame(frame)
            return
        self.core.deliver(device_id, seq, frame)
        self._run()

    def deliver_many(self, deliveries: list[tuple[str, int, bytes]]) -> None:
        live = self.live
        if live is not None:
            live.send_frames([frame for _, _, frame in deliveries])
            return
        for device_id, seq, frame in deliveries:
            self.core.deliver(device_id, seq, frame)
        self._run()

    def hold(self, device_ids: list[str]) -> None:
        self.core.hold(device_ids)
        self.live = None

    def release(self, device_id: str, replayed_to: int) -> None:
        self.core.release(device_id, replayed_to)
        self._run()


def new_session_id() -> str:
    return secrets.token_hex(8)
