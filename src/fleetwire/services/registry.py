"""The device registry (contract §3): register, change, delete, read, with their events.

Every change is one group-writer operation whose registry event (`device.registered`,
`device.updated`, `device.deleted`) commits in the same transaction; subscribers, the hub and
every node's sessions follow those events. Disabling or deleting a device ends its live
session wherever it is (4003).
"""

from __future__ import annotations

from typing import Any

from fleetwire.auth.principal import Principal
from fleetwire.domain.clock import Clock
from fleetwire.domain.close import Close
from fleetwire.domain.devices import Device, DeviceChanges, DeviceFilter
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.events import Event
from fleetwire.domain.schemas import DEFAULT_LIMITS, SchemaLimits, check_schema_async
from fleetwire.events.writer import GroupWriter
from fleetwire.presence.base import Presence, SessionInfo
from fleetwire.services.cache import DeviceCache
from fleetwire.services.ingest import IngestService, unavailable
from fleetwire.services.sessions import SessionService
from fleetwire.store.base import (
    DeleteDevice,
    RegisterDevice,
    Store,
    StoreUnavailableError,
    UpdateDevice,
    WriteOp,
    WriteResult,
)

_PAGE = 500
OFFLINE: dict[str, Any] = {
    "connected": False,
    "session_id": None,
    "connected_at": None,
    "last_seen_at": None,
    "node": None,
}


class RegistryService:
    def __init__(
        self,
        *,
        store: Store,
        writer: GroupWriter,
        presence: Presence,
        sessions: SessionService,
        ingest: IngestService,
        clock: Clock,
        cache: DeviceCache,
        schema_limits: SchemaLimits = DEFAULT_LIMITS,
    ) -> None:
        self._cache = cache
        self._schema_limits = schema_limits
        self._store = store
        self._writer = writer
        self._presence = presence
        self._sessions = sessions
        self._ingest = ingest
        self._clock = clock

    # -- changes: each one operation of the group writer, with its event in the same transaction
    async def register(self, device: Device) -> Device:
        if device.telemetry_schema is not None:
            await check_schema_async(device.telemetry_schema, self._schema_limits)
        result = await self._write(RegisterDevice(device, self._clock.now_ms()))
        if result.duplicate:
            raise FleetwireError(ErrorCode.CONFLICT, f"device {device.id!r} exists already")
        assert result.device is not None  # a registration that is no duplicate stored it
        self._cache.put(result.device, result.device.seq)  # this node sees its own change at once
        return result.device

    async def update(self, device_id: str, changes: DeviceChanges, status: str | None) -> Device:
        """Apply registry fields and, separately, a status set by an operator (`source: api`)."""
        await self.get(device_id)
        schema = changes.get("telemetry_schema")
        if schema is not None:
            await check_schema_async(schema, self._schema_limits)
        device: Device | None = None
        if changes:
            result = await self._write(UpdateDevice(device_id, changes, self._clock.now_ms()))
            if result.missing:
                raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
            device = result.device
            if device is not None:
                self._cache.put(device, device.seq)
        if status is not None:
            await self._ingest.status(device_id, status, "api")
            device = None  # its seq and status moved on: read it back
        if device is None:
            device = await self.get(device_id)
        if changes.get("disabled"):
            await self._sessions.close_device(device_id, Close.FORBIDDEN)
        return device

    async def delete(self, device_id: str) -> None:
        await self.get(device_id)
        # Subscribers learn the session ended before they learn the device is gone (R1.2).
        await self._sessions.end_device(device_id, Close.FORBIDDEN, "forbidden")
        # The history goes with the device; its `device.deleted` is published, not kept.
        result = await self._write(DeleteDevice(device_id, self._clock.now_ms()))
        if result.missing:
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
        self._cache.drop(device_id)

    async def _write(self, op: WriteOp) -> WriteResult:
        try:
            return await self._writer.submit(op)
        except StoreUnavailableError as exc:
            raise unavailable(exc) from exc

    # -- reads ------------------------------------------------------------------------------
    def find_now(self, device_id: str) -> Device | None:
        """`find` without I/O: the cached record while storage is healthy, else None (not
        "no such device": then `find` asks the store)."""
        return self._cache.get(device_id) if self._writer.healthy else None

    async def find(self, device_id: str) -> Device | None:
        """The registry record for a handshake: from the cache once it is filled. During a
        database outage a new session could not be announced: StoreUnavailableError (503)
        until a probe succeeds."""
        if not self._writer.healthy:
            await self._store.ping()
            self._writer.healthy = True
        return await self._cache.find(device_id)

    async def require_active(self, device_id: str) -> None:
        """For a device's own token: its device must exist and be enabled (else forbidden)."""
        device = await self.find(device_id)
        if device is None or device.disabled:
            raise FleetwireError(ErrorCode.FORBIDDEN, "unknown or disabled device")

    async def get(self, device_id: str) -> Device:
        device = await self._store.get_device(device_id)
        if device is None:
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
        return device

    async def list_devices(self, where: DeviceFilter, limit: int, after: str | None) -> list[Device]:
        return await self._store.list_devices(where, limit, after)

    async def events(self, device_id: str, since: int, limit: int) -> list[Event]:
        await self.get(device_id)
        return await self._store.events(device_id, since, limit)

    async def connection(self, device_id: str) -> dict[str, Any]:
        """The `connection` block of a device (contract §3), from Presence."""
        return connection_block(await self._presence.get(device_id))

    async def connections(self, device_ids: list[str]) -> dict[str, dict[str, Any]]:
        sessions = await self._presence.get_many(device_ids)
        return {device_id: connection_block(sessions.get(device_id)) for device_id in device_ids}

    async def connected_ids(self) -> frozenset[str]:
        return await self._presence.connected_ids()

    async def sessions(self, limit: int, after: str | None) -> list[SessionInfo]:
        return await self._presence.list_sessions(limit, after)

    async def session_count(self, principal: Principal) -> int:
        """Live sessions the principal may see: a restricted viewer does not learn the size
        of the fleet beyond its claim (issue 13.13); counting those costs a scan."""
        if principal.device_patterns is None:
            return await self._presence.count()
        count, after = 0, None
        while True:
            page = await self._presence.list_sessions(_PAGE, after)
            count += sum(1 for s in page if principal.may_see(s.device_id))
            if len(page) < _PAGE:
                return count
            after = page[-1].device_id


def connection_block(session: SessionInfo | None) -> dict[str, Any]:
    if session is None:
        return dict(OFFLINE)
    block = session.public()
    del block["device_id"]
    return block
