"""Device and client connections: the thin loop around `SessionProtocol`.

A connection turns transport callbacks into protocol calls and carries out the requests the
protocol returns through the node's services. Replies are written in the order requests
complete; every request gets exactly one reply echoing its `id` (contract §2.1).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from fleetwire.auth.principal import AuthError, Principal
from fleetwire.broker.base import BrokerUnavailableError
from fleetwire.domain.clock import format_ms, now_ms
from fleetwire.domain.devices import Device
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.presence.base import PresenceUnavailableError
from fleetwire.realtime import protocol
from fleetwire.realtime.codes import Close
from fleetwire.realtime.hub import Subscription
from fleetwire.realtime.protocol import CloseWith, Reply, Request, SessionProtocol
from fleetwire.store.base import StoreUnavailableError
from fleetwire.transport.base import Socket

if TYPE_CHECKING:
    from fleetwire.realtime.node import Node

log = logging.getLogger(__name__)
# Live events held per connection while a `resume` replays history.
_MAX_HELD = 10_000


class Connection:
    """What device and client connections share: protocol, token timer, heartbeat, replies."""

    def __init__(self, node: Node, principal: Principal, session: SessionProtocol) -> None:
        self.node = node
        self.protocol = session
        self.session_id = secrets.token_hex(8)
        self.socket: Socket | None = None
        self.connected_at_ms = now_ms()
        self.last_seen_ms = self.connected_at_ms
        self.flushed_seen_ms = self.connected_at_ms  # what Presence last heard of last_seen
        self.awaiting_pong = False
        self.close_code: int | None = None  # what the server closed with, if it closed first
        self.event_suppressed = False  # another node already told the world how this ended
        self._token_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def principal(self) -> Principal:
        return self.protocol.principal

    # -- transport callbacks -----------------------------------------------------------------
    def on_open(self, socket: Socket) -> None:
        self.socket = socket
        self.send(self.welcome())
        self._arm_token_timer()
        self.node.opened(self)

    def on_message(self, payload: bytes, is_text: bool) -> None:
        self.last_seen_ms = now_ms()
        loop = asyncio.get_running_loop()
        if is_text:
            outcome = self.protocol.receive(payload, loop.time(), self.last_seen_ms)
        else:
            outcome = self.protocol.receive_binary(loop.time())
        if isinstance(outcome, Request):
            self.handle(outcome)
        elif isinstance(outcome, Reply):
            self.send(outcome.payload)
        elif isinstance(outcome, CloseWith):
            self.close(outcome.code)
        else:
            reply, close = outcome
            self.send(reply.payload)
            self.close(close.code)

    def on_pong(self) -> None:
        self.awaiting_pong = False
        self.last_seen_ms = now_ms()

    def on_closed(self, code: int | None) -> None:
        if self._token_timer is not None:
            self._token_timer.cancel()
        for task in self._tasks:
            task.cancel()
        self.node.closed(self, self.close_code if self.close_code is not None else code)

    # -- helpers -------------------------------------------------------------------------------
    def welcome(self) -> bytes:
        raise NotImplementedError

    def handle(self, request: Request) -> None:
        raise NotImplementedError

    def send(self, payload: bytes) -> None:
        if self.socket is not None:
            self.socket.send(payload)

    def close(self, code: Close) -> None:
        if self.close_code is None:
            self.close_code = int(code)
        if self.socket is not None:
            self.socket.close(int(code), code.reason)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def answer(self, request: Request, coro: Coroutine[Any, Any, bytes]) -> None:
        """Run a request and send its one reply: the ack it built, or the error it raised."""
        try:
            payload = await coro
        except FleetwireError as exc:
            payload = protocol.error(request.id, exc)
        except (StoreUnavailableError, BrokerUnavailableError, PresenceUnavailableError) as exc:
            log.warning("request %s: %s", request.type, exc)
            payload = protocol.error(
                request.id,
                FleetwireError(ErrorCode.UNAVAILABLE, "a backing service is unavailable; retry later"),
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request %s failed", request.type)
            payload = protocol.error(request.id, FleetwireError(ErrorCode.INTERNAL, "internal error"))
        if payload:  # a handler that sent its own reply returns b""
            self.send(payload)

    def _arm_token_timer(self) -> None:
        if self._token_timer is not None:
            self._token_timer.cancel()
        loop = asyncio.get_running_loop()
        delay = (self.protocol.token.next_deadline_ms() - now_ms()) / 1000
        self._token_timer = loop.call_later(max(delay, 0.0), self._token_due)

    def _token_due(self) -> None:
        self._token_timer = None
        outcome = self.protocol.token.due(now_ms())
        if isinstance(outcome, CloseWith):
            self.close(outcome.code)
            return
        if isinstance(outcome, Reply):
            self.send(outcome.payload)
        self._arm_token_timer()

    async def refresh(self, request: Request) -> bytes:
        try:
            fresh = await self.node.verify(request.value)
        except AuthError as exc:
            raise FleetwireError(ErrorCode.UNAUTHORIZED, str(exc) or "token refused") from exc
        problem = self.protocol.refresh(fresh)
        if problem is not None:
            raise problem
        self._arm_token_timer()
        self.refreshed()
        return protocol.ack(request.id, token_expires_at=format_ms(fresh.expires_at_ms))

    def refreshed(self) -> None:
        """The principal changed (a subclass may need to re-check rights)."""


class DeviceConnection(Connection):
    def __init__(self, node: Node, principal: Principal, session: SessionProtocol, device: Device) -> None:
        super().__init__(node, principal, session)
        self.device_id = principal.sub
        self.device = device  # kept current from `device.updated` events (telemetry schema)
        self.online: asyncio.Task[None] | None = None  # recording presence and `device.connected`
        self.announced = False  # `device.connected` is recorded

    def welcome(self) -> bytes:
        return orjson.dumps(
            {
                "type": "welcome",
                "device_id": self.device_id,
                "session_id": self.session_id,
                "server_time": format_ms(now_ms()),
                "token_expires_at": format_ms(self.principal.expires_at_ms),
                "heartbeat_s": self.node.settings.heartbeat_s,
            }
        )

    def handle(self, request: Request) -> None:
        if self.online is not None and not self.online.done():
            # `device.connected` must take a lower seq than anything the device sends.
            self.spawn(self._after_online(request))
            return
        self._handle(request)

    async def _after_online(self, request: Request) -> None:
        assert self.online is not None
        await asyncio.wait([self.online])
        self._handle(request)

    def _handle(self, request: Request) -> None:
        node = self.node
        if request.type in ("telemetry", "telemetry_batch"):
            self.spawn(self.answer(request, node.ingest(self.device, request.value, request.id)))
        elif request.type == "status":
            self.spawn(self.answer(request, node.set_status(self.device_id, request.value, request.id)))
        elif request.type == "command_result":
            self.spawn(self.answer(request, node.command_result(self.device_id, request)))
        else:  # auth
            self.spawn(self.answer(request, self.refresh(request)))


class ClientConnection(Connection):
    def __init__(self, node: Node, principal: Principal, session: SessionProtocol) -> None:
        super().__init__(node, principal, session)
        self.subscriptions: dict[str, Subscription] = {}
        self._subscription_count = 0
        # device id -> live frames held back while that device's history is replayed
        self._held: dict[str, deque[tuple[int, bytes]]] = {}

    def welcome(self) -> bytes:
        return orjson.dumps(
            {
                "type": "welcome",
                "session_id": self.session_id,
                "server_time": format_ms(now_ms()),
                "token_expires_at": format_ms(self.principal.expires_at_ms),
                "role": self.principal.role.value,
            }
        )

    def handle(self, request: Request) -> None:
        node = self.node
        if request.type == "subscribe":
            self.spawn(self.answer(request, node.subscribe(self, request)))
        elif request.type == "unsubscribe":
            if node.hub.remove(self, request.value):
                self.send(protocol.ack(request.id))
            else:
                self.send(
                    protocol.error(request.id, FleetwireError(ErrorCode.NOT_FOUND, "no such subscription"))
                )
        elif request.type == "command":
            self.spawn(self.answer(request, node.issue_command(self, request)))
        else:  # auth
            self.spawn(self.answer(request, self.refresh(request)))

    def refreshed(self) -> None:
        self.node.hub.routes_changed()

    def next_subscription_id(self) -> str:
        self._subscription_count += 1
        return f"sub-{self._subscription_count}"

    # -- delivery (called by the hub) -----------------------------------------------------------
    def deliver(self, device_id: str, seq: int, frame: bytes) -> None:
        if self._held:
            held = self._held.get(device_id)
            if held is not None:
                if len(held) >= _MAX_HELD:
                    self.close(Close.SLOW_CONSUMER)
                    return
                held.append((seq, frame))
                return
        if self.socket is not None:
            self.socket.send_frame(frame)

    def hold(self, device_ids: list[str]) -> None:
        for device_id in device_ids:
            self._held.setdefault(device_id, deque())

    def release(self, device_id: str, replayed_to: int) -> None:
        """History up to `replayed_to` was sent: send held live events after it, then go live."""
        held = self._held.pop(device_id, None)
        if not held or self.socket is None:
            return
        for seq, frame in held:
            if seq > replayed_to:
                self.socket.send_frame(frame)
