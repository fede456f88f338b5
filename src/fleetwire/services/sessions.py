"""Sessions: who is connected where, and the presence events that say so (contract §2, §5).

A device session goes online (Presence claim, `device.connected`, queued commands) and
offline (`device.disconnected` with its reason); a newer session of the same device
replaces the older one on any node. Node liveness, lost-node claims, reconciliation after
an outage, heartbeats and last-seen flushes run here too. Ordering rule: a session's
`device.connected` is recorded before its `device.disconnected`, and before anything the
device sends (the endpoint holds requests until `connected()`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

from fleetwire.broker.base import Published
from fleetwire.domain.clock import Clock
from fleetwire.domain.close import Close
from fleetwire.domain.devices import Device
from fleetwire.events.writer import GroupWriter
from fleetwire.presence.base import Presence, SessionInfo
from fleetwire.services.cache import PendingIndex
from fleetwire.services.commands import CommandService
from fleetwire.services.local import LocalDeviceSession, LocalSession, LocalSessions
from fleetwire.services.routing import NodeRouter
from fleetwire.services.tasks import Tasks, settle
from fleetwire.services.twin import TwinService
from fleetwire.store.base import EventWrite, Store, StoreUnavailableError

_PAGE = 500
log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Online:
    """What this service tracks of one local device session."""

    # Recording presence and `device.connected`; None once that is over (a finished task
    # held for the session's life was ~0.6 KB of each idle connection's memory).
    task: asyncio.Task[None] | None
    flushed_seen_ms: int  # what Presence last heard of last_seen


class SessionService:
    def __init__(
        self,
        *,
        node_id: str,
        heartbeat_s: float,
        local: LocalSessions,
        presence: Presence,
        store: Store,
        writer: GroupWriter,
        router: NodeRouter,
        commands: CommandService,
        tasks: Tasks,
        clock: Clock,
        pending: PendingIndex | None = None,
        replace_wait_s: float = 2.0,
        twin: TwinService | None = None,
    ) -> None:
        self._twin = twin
        self._pending = pending or PendingIndex()
        self.node_id = node_id
        self._heartbeat_s = heartbeat_s
        self.local = local
        self._presence = presence
        self._store = store
        self._writer = writer
        self._router = router
        self._commands = commands
        self._tasks = tasks
        self._clock = clock
        self._online: dict[str, _Online] = {}  # by session id, device sessions only
        self._announced: set[str] = set()  # local sessions whose `device.connected` is recorded
        # The announced session of every device in the cluster, from `device.connected`
        # events (they reach every node): how a successor knows its predecessor's
        # `device.connected` is committed before it records that session's end.
        self._seen_connected: dict[str, str] = {}
        self._connected_waiters: dict[str, asyncio.Future[bool]] = {}
        self._replace_wait_s = replace_wait_s
        # Device sessions opened on this node since it started, by transport (metrics).
        self.opened_by_transport: dict[str, int] = {}

    # -- a session opens and closes -----------------------------------------------------------
    def opened(self, session: LocalSession) -> None:
        self.local.by_id[session.session_id] = session

    def device_opened(self, session: LocalDeviceSession) -> None:
        self.local.by_id[session.session_id] = session
        transport = session.transport
        self.opened_by_transport[transport] = self.opened_by_transport.get(transport, 0) + 1
        previous = self.local.devices.get(session.device_id)
        self.local.devices[session.device_id] = session
        if previous is not None:
            # The newer connection wins (contract §2); its own arrival tells the world.
            self.local.close(previous.session_id, Close.REPLACED, suppress=True)
        task = self._tasks.spawn(self._device_online(session, previous))
        self._online[session.session_id] = _Online(task, session.connected_at_ms)

    async def _device_online(
        self, session: LocalDeviceSession, local_previous: LocalDeviceSession | None
    ) -> None:
        """Claim presence, report a replaced predecessor, record `device.connected`, deliver
        queued commands.

        If the database fails on the way, the session is closed 1001 so the device
        reconnects, instead of staying half-connected (issue 13.8). If Presence or the broker
        fails, the session stays: `reconcile`, which runs when they are back, claims and
        announces every local session Presence does not have."""
        try:
            await self._go_online(session, local_previous)
        except StoreUnavailableError as exc:
            log.warning("device %s could not be announced, closing its session: %s", session.device_id, exc)
            session.close(Close.SERVER_SHUTDOWN)
        finally:
            if session.session_id not in self._announced:
                self.local.reporting.discard(session.session_id)  # nothing to report
            online = self._online.get(session.session_id)
            if online is not None:
                online.task = None

    async def _go_online(
        self, session: LocalDeviceSession, local_previous: LocalDeviceSession | None
    ) -> None:
        info = SessionInfo(
            session.device_id, session.session_id, self.node_id, session.connected_at_ms, self._clock.now_ms()
        )
        previous = await self._presence.add(info)
        if previous is None and local_previous is not None:
            # Presence had lost the local predecessor (an outage): it is replaced all the same.
            previous = SessionInfo(
                local_previous.device_id,
                local_previous.session_id,
                self.node_id,
                local_previous.connected_at_ms,
                local_previous.last_seen_ms,
            )
        if previous is not None and previous.session_id != session.session_id:
            await self._replaced(previous)
        await self._announce(session)
        await self._commands.deliver_queued(session.device_id, session.send)
        if self._twin is not None:  # contract §6: the delta after welcome and queued commands
            await self._twin.sync(session)

    async def _replaced(self, previous: SessionInfo) -> None:
        """The claim said this session replaces `previous`: end it, and record its
        `device.disconnected` (reason replaced) only after its `device.connected` (issue
        13.12b). Exactly one node reports it: this one, if that event is seen within
        `replace_wait_s`, before this session's own `device.connected`; else the
        predecessor's node, right after its announce (a session never announced is not
        reported as gone)."""
        settled = self._clock.now_ms() - previous.connected_at_ms > self._replace_wait_s * 1000
        # A predecessor older than the wait has long been announced (or closed): no wait.
        seen = settled or await self._announced_soon(previous.device_id, previous.session_id)
        if previous.node == self.node_id:  # device_opened has closed it already
            self.local.decide(previous.session_id, suppress=seen, report=not seen)
        else:
            await self._router.close(previous.node, previous.session_id, Close.REPLACED, report=not seen)
        if seen:
            await self._disconnected(
                previous.device_id, previous.session_id, previous.connected_at_ms, "replaced"
            )

    async def _announced_soon(self, device_id: str, session_id: str) -> bool:
        if self._seen_connected.get(device_id) == session_id:
            return True
        waiter = self._connected_waiters.get(session_id)
        if waiter is None:
            waiter = self._connected_waiters[session_id] = asyncio.get_running_loop().create_future()
        timer = self._clock.call_later(self._replace_wait_s, functools.partial(settle, waiter, False))
        try:
            return await waiter
        finally:
            timer.cancel()
            self._connected_waiters.pop(session_id, None)

    def closed(self, session: LocalSession) -> None:
        self.local.by_id.pop(session.session_id, None)
        self.local.suppressed.discard(session.session_id)

    def device_closed(self, session: LocalDeviceSession, reason: str) -> None:
        """The session ended; `reason` is the `device.disconnected` reason (contract §2.3)."""
        self.local.by_id.pop(session.session_id, None)
        if self._twin is not None:
            self._twin.session_closed(session.session_id)
        suppressed = session.session_id in self.local.suppressed
        self.local.suppressed.discard(session.session_id)
        online = self._online.pop(session.session_id, None)
        device_id = session.device_id
        if self.local.devices.get(device_id) is session:
            del self.local.devices[device_id]
        if session.session_id in self.local.reporting:
            # Replaced before its successor saw it announced: its end is this node's to
            # report, after its `device.connected` (now, or when its announce commits).
            if session.session_id in self._announced:
                self._tasks.spawn(self._report_replaced(session))
        elif suppressed:
            self._announced.discard(session.session_id)
        else:
            self._tasks.spawn(self._device_offline(device_id, session, online, reason))

    async def _device_offline(
        self, device_id: str, session: LocalSession, online: _Online | None, reason: str
    ) -> None:
        if online is not None and online.task is not None:
            await asyncio.wait([online.task])  # connected is recorded before disconnected
        announced = session.session_id in self._announced
        self._announced.discard(session.session_id)
        if not await self._presence.remove(device_id, session.session_id):
            return  # replaced meanwhile: the successor reported this session's end
        if announced:  # a session nobody saw connect is not reported as gone either
            await self._disconnected(device_id, session.session_id, session.connected_at_ms, reason)

    async def _disconnected(self, device_id: str, session_id: str, connected_at_ms: int, reason: str) -> None:
        at = self._clock.now_ms()
        data = {
            "session_id": session_id,
            "reason": reason,
            "connected_for_s": round((at - connected_at_ms) / 1000, 3),
        }
        await self._writer.submit(EventWrite(device_id, "device.disconnected", at, data))

    async def _announce(self, session: LocalDeviceSession) -> None:
        data = {"session_id": session.session_id, "node": self.node_id, "transport": session.transport}
        await self._writer.submit(
            EventWrite(session.device_id, "device.connected", session.connected_at_ms, data)
        )
        self._announced.add(session.session_id)
        if session.session_id in self.local.reporting and session.session_id not in self.local.by_id:
            await self._report_replaced(session)  # it was replaced (and closed) meanwhile
            return
        session.connected()

    async def _report_replaced(self, session: LocalDeviceSession) -> None:
        self.local.reporting.discard(session.session_id)
        self._announced.discard(session.session_id)
        await self._disconnected(session.device_id, session.session_id, session.connected_at_ms, "replaced")

    async def close_device(self, device_id: str, code: Close) -> None:
        """Close the device's live session wherever it is (deleted, disabled: 4003)."""
        local = self.local.devices.get(device_id)
        if local is not None:
            local.close(code)
            return
        session = await self._presence.get(device_id)
        if session is not None:
            await self._router.close(session.node, session.session_id, code)

    async def end_device(self, device_id: str, code: Close, reason: str) -> None:
        """End the device's live session wherever it is, and record its `device.disconnected`
        (with `reason`) before returning: for a device about to be deleted, whose history
        goes with it, the event must be committed while the device still exists."""
        local = self.local.devices.get(device_id)
        session = await self._presence.get(device_id)
        if session is not None:
            if await self._presence.remove(device_id, session.session_id):
                await self._disconnected(device_id, session.session_id, session.connected_at_ms, reason)
            await self._router.close(session.node, session.session_id, code, suppress=True)
        if local is not None and (session is None or local.session_id != session.session_id):
            # Presence lost this node's session (an outage, before reconcile): close it too.
            self.local.close(local.session_id, code, suppress=True)

    def close_all(self, code: Close) -> None:
        for session in list(self.local.by_id.values()):
            session.close(code)

    def on_event(self, event: Published) -> None:
        """A hub listener: which session of each device is announced (for `_replaced`), and
        a local device session follows its device's registry record."""
        name = event.name
        if self._pending.on_event(event):
            # Queued on another node while this device was connecting here: deliver it now.
            local = self.local.devices.get(event.device_id)
            if local is not None and local.session_id in self._announced:
                self._tasks.spawn(self._commands.deliver_queued(event.device_id, local.send, recheck=True))
        elif name == "device.connected":
            session_id = event.data["session_id"]
            self._seen_connected[event.device_id] = session_id
            waiter = self._connected_waiters.get(session_id)
            if waiter is not None:
                settle(waiter, True)
        elif name == "device.disconnected" or name == "device.deleted":
            self._seen_connected.pop(event.device_id, None)
        elif name == "device.updated":
            session = self.local.devices.get(event.device_id)
            if session is not None:
                session.device = Device.from_public(event.data)

    # -- periodic work ------------------------------------------------------------------------
    async def heartbeat(self) -> None:
        """Ping everyone; a session whose previous ping went unanswered ends (`timeout`)."""
        now = self._clock.now_ms()
        for session in list(self.local.by_id.values()):
            session.heartbeat(now)

    async def liveness(self) -> None:
        """Keep this node alive in Presence; declare lapsed nodes' sessions lost (contract §5).

        The liveness TTL is 2 × heartbeat_s and checks run every heartbeat_s / 2, so a dead
        node's sessions are declared `node_lost` within 2.5 × heartbeat_s (contract: 3×).
        """
        await self._presence.heartbeat(self.node_id, 2 * self._heartbeat_s)
        for lost in await self._presence.claim_lost(self.node_id):
            await self._disconnected(lost.device_id, lost.session_id, lost.connected_at_ms, "node_lost")

    async def reconcile(self) -> None:
        """After a broker/presence outage: put back local sessions that Presence lost, close
        the ones another node took over meanwhile, announce any never announced."""
        self._pending.forget()  # `command.updated` events may have been missed meanwhile
        if self._twin is not None:
            self._twin.index_stale()  # and `twin.updated` ones
        await self._pending.fill(self._store, self._clock.now_ms())
        if self._twin is not None:
            await self._twin.fill()
        await self._presence.heartbeat(self.node_id, 2 * self._heartbeat_s)
        for device_id, session in list(self.local.devices.items()):
            current = await self._presence.get(device_id)
            if current is None:
                info = SessionInfo(
                    device_id, session.session_id, self.node_id, session.connected_at_ms, self._clock.now_ms()
                )
                await self._presence.add(info)
                # Presence lost it (Redis restarted, or other nodes declared it node_lost):
                # announce it again so subscribers see it live.
                await self._announce(session)
                await self._commands.deliver_queued(device_id, session.send)
                if self._twin is not None:
                    await self._twin.sync(session)
            elif current.session_id != session.session_id:
                # The newer session's node reported the replacement.
                self.local.close(session.session_id, Close.REPLACED, suppress=True)
        # Sessions that ended here while Presence was unreachable: remove the ghosts.
        after: str | None = None
        while True:
            page = await self._presence.list_sessions(_PAGE, after)
            for info in page:
                ghost = info.node == self.node_id and info.session_id not in self.local.by_id
                if ghost and await self._presence.remove(info.device_id, info.session_id):
                    await self._disconnected(info.device_id, info.session_id, info.connected_at_ms, "closed")
            if len(page) < _PAGE:
                break
            after = page[-1].device_id

    async def flush_presence(self) -> None:
        """last_seen_at for sessions heard from since the previous flush, in one call."""
        pairs = []
        for device_id, session in self.local.devices.items():
            online = self._online.get(session.session_id)
            if online is not None and session.last_seen_ms != online.flushed_seen_ms:
                online.flushed_seen_ms = session.last_seen_ms
                pairs.append((device_id, session.session_id))
        if pairs:
            await self._presence.touch(pairs, self._clock.now_ms())
