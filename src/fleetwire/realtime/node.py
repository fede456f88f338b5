"""The Node: this process's share of the service, used by the WebSocket endpoints and REST.

It authenticates handshakes, keeps the local sessions, records presence, turns requests
into store writes (through the group writer, so events leave in commit order), routes
node-addressed messages, and runs the periodic work: heartbeats, last-seen flushes, node
liveness and lost-node claims, command sweeps and retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import orjson

from fleetwire.auth.principal import AuthError, Principal, Role, TokenVerifier, UnknownKeyError
from fleetwire.broker.base import Broker, BrokerUnavailableError, Published
from fleetwire.domain.clock import format_optional, now_ms
from fleetwire.domain.commands import Command
from fleetwire.domain.devices import DEVICE_ID, Device, DeviceFilter
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.events import Event
from fleetwire.domain.telemetry import Record, SchemaCache
from fleetwire.presence.base import Presence, PresenceUnavailableError, SessionInfo
from fleetwire.realtime import protocol
from fleetwire.realtime.codes import Close, disconnect_reason
from fleetwire.realtime.commands import CommandService
from fleetwire.realtime.connection import ClientConnection, Connection, DeviceConnection
from fleetwire.realtime.hub import Hub, Subscription, is_pattern
from fleetwire.realtime.protocol import Request, SessionProtocol
from fleetwire.realtime.publisher import EventPublisher
from fleetwire.settings import Settings
from fleetwire.store.base import (
    EventWrite,
    StatusWrite,
    Store,
    StoreUnavailableError,
    TelemetryWrite,
    WriteResult,
)
from fleetwire.store.writer import GroupWriter
from fleetwire.transport.base import Handler, Refusal, UpgradeRequest

log = logging.getLogger(__name__)
_SNAPSHOT_PAGE = 500


def _unavailable(exc: Exception) -> FleetwireError:
    return FleetwireError(ErrorCode.UNAVAILABLE, f"storage unavailable, retry later: {exc}")


class Node:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        broker: Broker,
        presence: Presence,
        verifier: TokenVerifier,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.store = store
        self.broker = broker
        self.presence = presence
        self.verifier = verifier
        self.hub = Hub()
        self.publisher = EventPublisher(broker)
        self.writer = GroupWriter(
            store,
            self.publisher.submit,
            max_queue=settings.write_queue,
            max_batch=settings.write_batch,
        )
        self.commands = CommandService(self)
        self.schemas = SchemaCache()
        self.devices: dict[str, DeviceConnection] = {}  # local device sessions by device id
        self.connections: dict[str, Connection] = {}  # every local session by session id
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.hub.listeners.append(self._watch_event)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.presence.start()
        if hasattr(self.broker, "on_reconnect"):  # RedisBroker: after an outage, reconcile
            self.broker.on_reconnect = self.reconcile
        await self.broker.start(self.node_id, self.hub.on_events, self.on_message)
        self.publisher.start()
        self.writer.start()
        # Sessions a previous process with this node id left in Presence are ghosts now.
        self.spawn(self.reconcile())
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._every(self.settings.heartbeat_s, self._heartbeat), name="heartbeat"),
            loop.create_task(self._every(self.settings.heartbeat_s / 2, self._liveness), name="liveness"),
            loop.create_task(self._every(1.0, self._flush_presence), name="presence"),
            loop.create_task(self._every(self.settings.command_sweep_s, self.commands.sweep), name="sweep"),
            loop.create_task(self._every(self.settings.purge_interval_s, self._purge), name="purge"),
        ]

    async def stop(self) -> None:
        """After the transport closed every session: finish their goodbyes, then stop."""
        for conn in list(self.connections.values()):
            conn.close(Close.SERVER_SHUTDOWN)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self.commands.close()
        await self.writer.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.publisher.drained(), 2.0)
        await self.publisher.stop()
        await self.broker.close()
        await self.presence.close()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._guard(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _guard(coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except (StoreUnavailableError, BrokerUnavailableError, PresenceUnavailableError) as exc:
            log.warning("background step failed: %s", exc)
        except Exception:
            log.exception("background step failed")

    async def _every(self, interval: float, step: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._guard(step())

    # -- handshake (contract §2) -------------------------------------------------------------------
    async def handshake(self, request: UpgradeRequest) -> Handler | Refusal:
        is_device = request.path == "/ws/device"
        if not is_device and request.path != "/ws/client":
            return Refusal(404, "not_found", "no WebSocket endpoint here")
        origin = request.headers.get("origin")
        allowed = self.settings.origins
        if origin is not None and "*" not in allowed and origin not in allowed:
            return Refusal(403, "forbidden", "Origin not allowed")
        if len(self.connections) >= self.settings.max_connections:
            return Refusal(503, "unavailable", "server at its connection limit", {"Retry-After": "5"})
        token = _token_of(request)
        if token is None:
            return Refusal(401, "unauthorized", "a bearer token is required")
        try:
            principal = await self.verify(token)
        except AuthError as exc:
            return Refusal(401, "unauthorized", str(exc) or "token refused")
        session = SessionProtocol(
            principal,
            is_device=is_device,
            rate=self.settings.rate_per_second,
            close_after=self.settings.rate_limit_close_after,
            warning_s=self.settings.token_warning_s,
            max_clock_skew_s=self.settings.max_clock_skew_s,
            leeway_s=self.settings.jwt_leeway_s,
        )
        if not is_device:
            if principal.role is Role.DEVICE:
                return Refusal(403, "forbidden", "a device token cannot open a client session")
            return ClientConnection(self, principal, session)
        if principal.role is not Role.DEVICE:
            return Refusal(403, "forbidden", "only device tokens may connect here")
        if not DEVICE_ID.match(principal.sub):  # no such device can exist; spare the database
            return Refusal(403, "forbidden", "unknown or disabled device")
        try:
            device = await self.store.get_device(principal.sub)
        except StoreUnavailableError:
            return Refusal(503, "unavailable", "storage unavailable, retry later", {"Retry-After": "5"})
        if device is None or device.disabled:
            return Refusal(403, "forbidden", "unknown or disabled device")
        return DeviceConnection(self, principal, session, device)

    async def verify(self, token: str) -> Principal:
        try:
            return self.verifier.verify(token)
        except UnknownKeyError:
            await self.verifier.refresh_keys()
            return self.verifier.verify(token)

    # -- sessions -----------------------------------------------------------------------------------
    def opened(self, conn: Connection) -> None:
        self.connections[conn.session_id] = conn
        if isinstance(conn, DeviceConnection):
            previous = self.devices.get(conn.device_id)
            self.devices[conn.device_id] = conn
            if previous is not None:
                # The newer connection wins (contract §2); its own arrival tells the world.
                previous.event_suppressed = True
                previous.close(Close.REPLACED)
            conn.online = self.spawn(self._device_online(conn, previous))

    async def _device_online(self, conn: DeviceConnection, local_previous: DeviceConnection | None) -> None:
        info = SessionInfo(conn.device_id, conn.session_id, self.node_id, conn.connected_at_ms, now_ms())
        previous = await self.presence.add(info)
        if previous is not None and previous.session_id != conn.session_id:
            if previous.node != self.node_id:
                await self.route_close(previous.node, previous.session_id, Close.REPLACED)
            await self._write_disconnected(
                conn.device_id, previous.session_id, previous.connected_at_ms, "replaced"
            )
        elif local_previous is not None:
            await self._write_disconnected(
                conn.device_id, local_previous.session_id, local_previous.connected_at_ms, "replaced"
            )
        await self._announce(conn)
        await self.commands.deliver_queued(conn.device_id, conn.send)

    def closed(self, conn: Connection, code: int | None) -> None:
        self.connections.pop(conn.session_id, None)
        if isinstance(conn, ClientConnection):
            self.hub.drop(conn)
            return
        assert isinstance(conn, DeviceConnection)
        if self.devices.get(conn.device_id) is conn:
            del self.devices[conn.device_id]
        if conn.event_suppressed:
            return
        reason = "timeout" if code == _TIMEOUT else disconnect_reason(code)
        self.spawn(self._device_offline(conn, reason))

    async def _device_offline(self, conn: DeviceConnection, reason: str) -> None:
        if conn.online is not None:
            await asyncio.wait([conn.online])  # connected is recorded before disconnected
        if not await self.presence.remove(conn.device_id, conn.session_id):
            return  # replaced meanwhile: the successor reported this session's end
        await self._write_disconnected(conn.device_id, conn.session_id, conn.connected_at_ms, reason)

    async def _write_disconnected(
        self, device_id: str, session_id: str, connected_at_ms: int, reason: str
    ) -> None:
        at = now_ms()
        await self.writer.submit(
            EventWrite(
                device_id,
                "device.disconnected",
                at,
                {
                    "session_id": session_id,
                    "reason": reason,
                    "connected_for_s": round((at - connected_at_ms) / 1000, 3),
                },
            )
        )

    # -- requests ------------------------------------------------------------------------------------
    async def ingest(self, device: Device, records: list[Record], request_id: Any) -> bytes:
        accepted = await self.store_telemetry(device, records, batch=len(records) > 1)
        return protocol.ack(request_id, accepted=accepted)

    async def store_telemetry(self, device: Device, records: list[Record], *, batch: bool) -> int:
        if device.telemetry_schema is not None:
            self.schemas.check(device.telemetry_schema, records, batch)
        result = await self._write(TelemetryWrite(device.id, records))
        if result.missing:
            raise FleetwireError(ErrorCode.NOT_FOUND, "device no longer exists")
        return len(records)

    async def set_status(self, device_id: str, status: str, request_id: Any) -> bytes:
        result = await self.change_status(device_id, status, "device")
        return protocol.ack(request_id, changed=result.changed)

    async def change_status(self, device_id: str, status: str, source: str) -> WriteResult:
        result = await self._write(StatusWrite(device_id, status, source, now_ms()))
        if result.missing:
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
        return result

    async def _write(self, op: EventWrite | StatusWrite | TelemetryWrite) -> WriteResult:
        try:
            return await self.writer.submit(op)
        except StoreUnavailableError as exc:
            raise _unavailable(exc) from exc

    async def command_result(self, device_id: str, request: Request) -> bytes:
        command_id, ok, result, error = request.value
        await self.commands.result(device_id, command_id, ok, result, error)
        return protocol.ack(request.id)

    async def issue_command(self, conn: ClientConnection, request: Request) -> bytes:
        command = await self.commands.issue(
            conn.principal, request.value, issuer_node=self.node_id, issuer_session=conn.session_id
        )
        return protocol.ack(request.id, command_id=command.id, state=command.state.value)

    async def subscribe(self, conn: ClientConnection, request: Request) -> bytes:
        wanted: protocol.Subscribe = request.value
        principal = conn.principal
        exact = [d for d in wanted.devices if not is_pattern(d)]
        patterns = tuple(d for d in wanted.devices if is_pattern(d))
        for device_id in exact:
            if not principal.may_see(device_id):
                raise FleetwireError(ErrorCode.FORBIDDEN, f"device {device_id!r} is outside your claim")
        devices: dict[str, Device] = {}
        for device_id in exact:
            device = await self.store.get_device(device_id)
            if device is None:
                raise FleetwireError(ErrorCode.NOT_FOUND, f"no such device {device_id!r}")
            devices[device_id] = device
        if patterns:
            await self._matching(patterns, principal, devices)
        subscription = Subscription(
            conn.next_subscription_id(),
            frozenset(exact),
            patterns,
            wanted.events,
        )
        # Live events of these devices wait until the ack (and any replay) has been sent.
        conn.hold(list(devices))
        self.hub.add(conn, subscription)
        try:
            sessions = await self.presence.get_many(list(devices))
            replays, recovered = await self._history(wanted, devices)
        except BaseException:
            self.hub.remove(conn, subscription.id)
            for device_id in devices:
                conn.release(device_id, 0)
            raise
        fields: dict[str, Any] = {
            "subscription_id": subscription.id,
            "snapshot": [_snapshot(device, sessions.get(device.id)) for device in devices.values()],
        }
        if wanted.resume is not None:
            fields["recovered"] = recovered
        conn.send(protocol.ack(request.id, **fields))
        for device_id in devices:
            replayed_to = 0
            for event in replays.get(device_id, ()):
                if event.event_class in wanted.events:
                    conn.send(event.wire())
                replayed_to = event.seq
            conn.release(device_id, max(replayed_to, (wanted.resume or {}).get(device_id, 0)))
        return b""  # the ack is sent above, before the replay

    async def _matching(
        self, patterns: tuple[str, ...], principal: Principal, into: dict[str, Device]
    ) -> None:
        where = DeviceFilter(patterns=patterns)
        after: str | None = None
        while True:
            page = await self.store.list_devices(where, _SNAPSHOT_PAGE, after)
            for device in page:
                if principal.may_see(device.id):
                    into.setdefault(device.id, device)
            if len(page) < _SNAPSHOT_PAGE:
                return
            after = page[-1].id

    async def _history(
        self, wanted: protocol.Subscribe, devices: dict[str, Device]
    ) -> tuple[dict[str, list[Event]], dict[str, bool]]:
        """Events after each `resume` seq; recovered = the history still had all of them."""
        replays: dict[str, list[Event]] = {}
        recovered: dict[str, bool] = {}
        for device_id, last_seq in (wanted.resume or {}).items():
            device = devices.get(device_id)
            if device is None:
                recovered[device_id] = False
                continue
            events = await self.store.events(device_id, last_seq, self.settings.event_history)
            replays[device_id] = events
            if last_seq >= device.seq:
                recovered[device_id] = True
            else:
                seqs = [e.seq for e in events]
                contiguous = seqs == list(range(last_seq + 1, last_seq + 1 + len(seqs)))
                recovered[device_id] = contiguous and bool(seqs) and seqs[-1] >= device.seq
        return replays, recovered

    # -- routing between nodes ---------------------------------------------------------------------
    async def route_to_device(self, node: str, session_id: str, command: Command) -> None:
        await self.route_to_session(node, session_id, command.device_message())

    async def route_to_session(self, node: str, session_id: str, message: dict[str, Any]) -> None:
        if node == self.node_id:
            conn = self.connections.get(session_id)
            if conn is not None:
                conn.send(orjson.dumps(message))
            return
        await self.broker.send(node, {"kind": "send", "session_id": session_id, "message": message})

    async def route_close(self, node: str, session_id: str, code: Close) -> None:
        if node == self.node_id:
            self.close_local(session_id, code, suppress=code is Close.REPLACED)
            return
        await self.broker.send(node, {"kind": "close", "session_id": session_id, "code": int(code)})

    def close_local(self, session_id: str, code: Close, *, suppress: bool) -> None:
        conn = self.connections.get(session_id)
        if conn is not None:
            conn.event_suppressed = conn.event_suppressed or suppress
            conn.close(code)

    def on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        session_id = str(message.get("session_id"))
        if kind == "send":
            conn = self.connections.get(session_id)
            if conn is not None:
                conn.send(orjson.dumps(message["message"]))
        elif kind == "close":
            code = Close(int(message["code"]))
            self.close_local(session_id, code, suppress=code is Close.REPLACED)

    async def close_device(self, device_id: str, code: Close) -> None:
        """Close the device's live session wherever it is (deleted, disabled: 4003)."""
        local = self.devices.get(device_id)
        if local is not None:
            local.close(code)
            return
        session = await self.presence.get(device_id)
        if session is not None:
            await self.route_close(session.node, session.session_id, code)

    def _watch_event(self, event: Published) -> None:
        """Side effects of events for this node: schema changes, `?wait=true` waiters."""
        if event.event_class == "registry":
            conn = self.devices.get(event.device_id)
            if conn is not None and b'"event":"device.updated"' in event.payload:
                data = orjson.loads(event.payload)["data"]
                conn.device = Device.from_public(data)
        elif event.event_class == "command" and self.commands.has_waiters:
            data = orjson.loads(event.payload)["data"]
            self.commands.on_event(data["command_id"])

    # -- periodic work -----------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Ping everyone; drop whoever did not answer the previous ping (reason `timeout`)."""
        for conn in list(self.connections.values()):
            if conn.awaiting_pong:
                conn.close_code = _TIMEOUT
                if conn.socket is not None:  # unlikely to be read: the peer is not answering
                    conn.socket.close(int(Close.SERVER_SHUTDOWN), "timeout")
            elif conn.socket is not None:
                conn.awaiting_pong = True
                conn.socket.ping()

    async def _liveness(self) -> None:
        """Keep this node alive in Presence; declare lapsed nodes' sessions lost (contract §5).

        The liveness TTL is 2 × heartbeat_s and checks run every heartbeat_s / 2, so a dead
        node's sessions are declared `node_lost` within 2.5 × heartbeat_s (contract: 3×).
        """
        await self.presence.heartbeat(self.node_id, 2 * self.settings.heartbeat_s)
        for lost in await self.presence.claim_lost(self.node_id):
            await self._write_disconnected(lost.device_id, lost.session_id, lost.connected_at_ms, "node_lost")

    async def reconcile(self) -> None:
        """After a broker/presence outage: put back local sessions that Presence lost, close
        the ones another node took over meanwhile, announce any never announced."""
        await self.presence.heartbeat(self.node_id, 2 * self.settings.heartbeat_s)
        for device_id, conn in list(self.devices.items()):
            current = await self.presence.get(device_id)
            if current is None:
                info = SessionInfo(device_id, conn.session_id, self.node_id, conn.connected_at_ms, now_ms())
                await self.presence.add(info)
                # Presence lost it (Redis restarted, or other nodes declared it node_lost):
                # announce it again so subscribers see it live.
                await self._announce(conn)
                await self.commands.deliver_queued(device_id, conn.send)
            elif current.session_id != conn.session_id:
                conn.event_suppressed = True  # the newer session's node reported the replacement
                conn.close(Close.REPLACED)
        # Sessions that ended here while Presence was unreachable: remove the ghosts.
        after: str | None = None
        while True:
            page = await self.presence.list_sessions(500, after)
            for info in page:
                ghost = info.node == self.node_id and info.session_id not in self.connections
                if ghost and await self.presence.remove(info.device_id, info.session_id):
                    await self._write_disconnected(
                        info.device_id, info.session_id, info.connected_at_ms, "closed"
                    )
            if len(page) < 500:
                break
            after = page[-1].device_id

    async def _announce(self, conn: DeviceConnection) -> None:
        await self.writer.submit(
            EventWrite(
                conn.device_id,
                "device.connected",
                conn.connected_at_ms,
                {"session_id": conn.session_id, "node": self.node_id},
            )
        )
        conn.announced = True

    async def _flush_presence(self) -> None:
        """last_seen_at for sessions heard from since the previous flush, in one call."""
        pairs = []
        for device_id, conn in self.devices.items():
            if conn.last_seen_ms != conn.flushed_seen_ms:
                conn.flushed_seen_ms = conn.last_seen_ms
                pairs.append((device_id, conn.session_id))
        if pairs:
            await self.presence.touch(pairs, now_ms())

    async def _purge(self) -> None:
        cutoff = now_ms() - int(self.settings.telemetry_retention_days * 86_400_000)
        await self.store.purge(cutoff, self.settings.event_history)


# A heartbeat timeout is not a close code the peer ever sees: the peer is not answering.
_TIMEOUT = -1


def _token_of(request: UpgradeRequest) -> str | None:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        return value.strip() or None if scheme.lower() == "bearer" else None
    return request.query.get("access_token") or None


def _snapshot(device: Device, session: SessionInfo | None) -> dict[str, Any]:
    return {
        "device_id": device.id,
        "connected": session is not None,
        "connected_at": format_optional(session.connected_at_ms if session else None),
        "last_seen_at": format_optional(session.last_seen_at_ms if session else None),
        "status": device.status,
        "status_at": format_optional(device.status_at_ms),
        "seq": device.seq,
    }
