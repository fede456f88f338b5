"""CommandService: issue, route, answer and time out commands (contract §2.3, issue 5).

The store holds the lifecycle (a compare-and-set per transition, so exactly one node wins
a race between a result and a timeout). Routing goes through Presence (which node holds
the device) and the Broker (node-addressed messages); the issuer learns the end through a
`command_result` message, subscribers through `command.updated` events.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

import orjson

from fleetwire.auth.principal import Principal, Role
from fleetwire.broker.base import Published
from fleetwire.domain.clock import Clock, Timer, format_ms
from fleetwire.domain.commands import Command, CommandIds, CommandRequest, CommandState
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.events.writer import GroupWriter
from fleetwire.presence.base import Presence
from fleetwire.services.cache import DeviceCache, PendingIndex
from fleetwire.services.routing import NodeRouter
from fleetwire.services.tasks import Tasks, settle
from fleetwire.store.base import CreateCommand, Store, TransitionCommand

log = logging.getLogger(__name__)


class CommandService:
    def __init__(
        self,
        *,
        store: Store,
        writer: GroupWriter,
        presence: Presence,
        router: NodeRouter,
        tasks: Tasks,
        clock: Clock,
        devices: DeviceCache,
        pending: PendingIndex | None = None,
        max_pending: int = 100,
        max_issuing: int = 64,
    ) -> None:
        self._issuing = 0
        self._max_issuing = max_issuing
        self._pending = pending or PendingIndex()
        self._max_pending = max_pending
        self._store = store
        self._devices = devices
        self._writer = writer
        self._presence = presence
        self._router = router
        self._tasks = tasks
        self._clock = clock
        self._ids = CommandIds()
        self._timers: dict[str, Timer] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    # -- issuing -------------------------------------------------------------------------------
    async def issue(
        self,
        principal: Principal,
        request: CommandRequest,
        *,
        issuer_node: str | None = None,
        issuer_session: str | None = None,
    ) -> Command:
        """Admission control (issue 12): beyond `max_issuing` commands being issued at once
        on this node, refuse at once with `rate_limited` instead of queueing until every
        caller times out; offered more than it can do, the node keeps completing at its
        capacity."""
        if self._issuing >= self._max_issuing:
            raise FleetwireError(
                ErrorCode.RATE_LIMITED, "this node is issuing as many commands as it can; retry shortly"
            )
        self._issuing += 1
        try:
            return await self._issue(principal, request, issuer_node, issuer_session)
        finally:
            self._issuing -= 1

    async def _issue(
        self,
        principal: Principal,
        request: CommandRequest,
        issuer_node: str | None,
        issuer_session: str | None,
    ) -> Command:
        if not principal.at_least(Role.OPERATOR):
            raise FleetwireError(ErrorCode.FORBIDDEN, "sending commands needs the operator role")
        if not principal.may_see(request.device_id):
            raise FleetwireError(ErrorCode.FORBIDDEN, "device outside your `devices` claim")
        # Existence and `disabled` from the node's registry cache (the store's CreateCommand
        # checks existence again in its transaction).
        device = await self._devices.find(request.device_id)
        if device is None:
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
        now = self._clock.now_ms()
        if request.idempotency_key is not None:
            earlier = await self._store.find_command(
                principal.sub, request.idempotency_key, now - request.timeout_s * 1000
            )
            if earlier is not None:
                if earlier.device_id != request.device_id or earlier.name != request.name:
                    raise FleetwireError(
                        ErrorCode.CONFLICT, "this idempotency_key was used for another command"
                    )
                return earlier
        if device.disabled:
            raise FleetwireError(ErrorCode.FORBIDDEN, "device is disabled")
        session = await self._presence.get(request.device_id)
        if session is None and not request.queue:
            raise FleetwireError(ErrorCode.DEVICE_OFFLINE, "device is not connected")
        online = session is not None
        if (
            not online
            and len(await self._store.pending_commands(request.device_id, now)) >= self._max_pending
        ):
            # Bounded backlog per device (issue 13.17): it is delivered in one go on connect.
            raise FleetwireError(
                ErrorCode.TOO_LARGE, f"the device already has {self._max_pending} queued commands"
            )
        command = Command(
            id=self._ids.next(now),
            device_id=request.device_id,
            name=request.name,
            params=request.params,
            # Straight to `sent` when the device is online: one transaction, not two.
            state=CommandState.SENT if online else CommandState.PENDING,
            issued_at_ms=now,
            expires_at_ms=now + request.timeout_s * 1000,
            issuer=principal.sub,
            issuer_node=issuer_node,
            issuer_session=issuer_session,
            idempotency_key=request.idempotency_key,
            sent_at_ms=now if online else None,
            timeout_s=request.timeout_s,
        )
        # The command and its first `command.updated` commit together, before the command can
        # leave: a result recorded on another node can never take a lower seq (issue 13.12a).
        created = await self._writer.submit(CreateCommand(command))
        if created.missing or created.command is None:
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
        command = created.command
        self.arm(command)
        if session is not None:
            await self._router.send(session.node, session.session_id, command.device_message())
        return command

    # -- device side --------------------------------------------------------------------------
    async def deliver_queued(
        self, device_id: str, send: Callable[[bytes], None], *, recheck: bool = False
    ) -> None:
        """Right after `welcome`: every pending command, in issue order. No query when the
        device is known to have none queued, unless `recheck` (a pending event came in)."""
        if not recheck and self._pending.known_empty(device_id):
            return
        queued = await self._store.pending_commands(device_id, self._clock.now_ms())
        if not queued:
            self._pending.found_empty(device_id)
        for command in queued:
            moved = TransitionCommand(device_id, command.id, CommandState.SENT, self._clock.now_ms())
            sent = (await self._writer.submit(moved)).command  # with its event, before it leaves
            if sent is not None:
                send(orjson.dumps(sent.device_message()))

    async def result(
        self,
        device_id: str,
        command_id: str,
        ok: bool,
        result: dict[str, Any] | None,
        error: dict[str, Any] | None,
    ) -> Command:
        # No read first: the transition itself moves only this device's command, from a
        # state that allows it; the read below only explains a refusal.
        state = CommandState.SUCCEEDED if ok else CommandState.FAILED
        moved = TransitionCommand(device_id, command_id, state, self._clock.now_ms(), result, error)
        done = (await self._writer.submit(moved)).command
        if done is None:
            current = await self._store.get_command(command_id)
            if current is None or current.device_id != device_id:
                raise FleetwireError(ErrorCode.NOT_FOUND, "no such command for this device")
            raise FleetwireError(
                ErrorCode.CONFLICT, f"command is {current.state.value}; the result was not applied"
            )
        await self.finished(done)
        return done

    # -- ends ------------------------------------------------------------------------------------
    def arm(self, command: Command) -> None:
        """A precise local timer; the periodic sweep covers restarts and other nodes' commands."""
        delay = max((command.expires_at_ms - self._clock.now_ms()) / 1000, 0.0)
        self._timers[command.id] = self._clock.call_later(delay, lambda: self._expire_soon(command.id))

    def _expire_soon(self, command_id: str) -> None:
        self._timers.pop(command_id, None)
        self._tasks.spawn(self.expire(command_id))

    async def expire(self, command_id: str) -> None:
        store = self._store
        command = await store.get_command(command_id)
        if command is None or command.state.final:
            return
        state = CommandState.TIMED_OUT if command.state is CommandState.SENT else CommandState.EXPIRED
        moved = TransitionCommand(command.device_id, command_id, state, self._clock.now_ms())
        done = (await self._writer.submit(moved)).command
        if done is None:  # a result (or another node) got there first
            return
        await self.finished(done)

    async def sweep(self) -> None:
        for command in await self._store.due_commands(self._clock.now_ms(), 500):
            await self.expire(command.id)

    async def finished(self, command: Command) -> None:
        """The command reached a final state (its event is committed): tell the issuer."""
        timer = self._timers.pop(command.id, None)
        if timer is not None:
            timer.cancel()
        if command.issuer_node is not None and command.issuer_session is not None:
            message = {
                "type": "command_result",
                "command_id": command.id,
                "device_id": command.device_id,
                "state": command.state.value,
                "result": command.result,
                "error": command.error,
                "at": format_ms(command.completed_at_ms or self._clock.now_ms()),
            }
            await self._router.send(command.issuer_node, command.issuer_session, message)

    # -- reads -----------------------------------------------------------------------------------
    async def get(self, command_id: str) -> Command:
        command = await self._store.get_command(command_id)
        if command is None:
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such command")
        return command

    async def list_for_device(
        self, device_id: str, state: CommandState | None, limit: int, after: str | None
    ) -> list[Command]:
        """Newest first; `after` is the last command id of the previous page."""
        return await self._store.list_commands(device_id, state, limit, after)

    # -- REST `?wait=true` ---------------------------------------------------------------------
    async def wait(self, command_id: str, timeout_s: float) -> Command | None:
        """Until the command is final or `timeout_s` of the clock pass; works whichever node
        ends it (its `command.updated` reaches every node's hub). A re-read every second
        covers an event this node missed."""
        clock = self._clock
        deadline_ms = clock.now_ms() + int(timeout_s * 1000)
        while True:
            command = await self._store.get_command(command_id)
            if command is None or command.state.final:
                return command
            remaining_s = (deadline_ms - clock.now_ms()) / 1000
            if remaining_s <= 0:
                return command
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(command_id, []).append(future)
            timer = clock.call_later(min(remaining_s, 1.0), functools.partial(settle, future, None))
            try:
                await future
            finally:
                timer.cancel()
                waiters = self._waiters.get(command_id)
                if waiters is not None and future in waiters:
                    waiters.remove(future)
                    if not waiters:
                        del self._waiters[command_id]

    def on_event(self, event: Published) -> None:
        """A hub listener: a `command.updated` may end a REST `?wait=true` on this node."""
        if event.name != "command.updated" or not self._waiters:
            return
        command_id = event.data["command_id"]
        for future in self._waiters.pop(command_id, []):
            settle(future, None)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
