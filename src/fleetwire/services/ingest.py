"""Telemetry and status: ingest from a device (WebSocket, REST or any transport) through the
group writer, so an answer means the data is durable (contract §2.2), and stored reads."""

from __future__ import annotations

import asyncio
import logging

from fleetwire.domain.clock import Clock
from fleetwire.domain.devices import Device
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.schemas import DEFAULT_LIMITS, SchemaLimits
from fleetwire.domain.telemetry import Record, SchemaCache
from fleetwire.events.writer import GroupWriter
from fleetwire.store.base import (
    StatusWrite,
    Store,
    StoreUnavailableError,
    TelemetryPoint,
    TelemetryWrite,
    WriteOp,
    WriteResult,
)

log = logging.getLogger(__name__)


class IngestService:
    def __init__(
        self, *, store: Store, writer: GroupWriter, clock: Clock, schema_limits: SchemaLimits = DEFAULT_LIMITS
    ) -> None:
        self._store = store
        self._writer = writer
        self._clock = clock
        self._schemas = SchemaCache(limits=schema_limits)

    async def telemetry(self, device: Device, records: list[Record], *, batch: bool) -> int:
        """Validate against the device's schema, store, and return how many were accepted."""
        future = self.submit_telemetry(device, records, batch=batch)
        await asyncio.wait([future])
        return self.accepted(future, len(records))

    def submit_telemetry(
        self, device: Device, records: list[Record], *, batch: bool
    ) -> asyncio.Future[WriteResult]:
        """`telemetry` for callers that wait with a callback (the WebSocket hot path: no task
        per message): the write's future, to read with `accepted`. A schema refusal raises
        at once, before anything is queued."""
        if device.telemetry_schema is not None:
            self._schemas.check(device.telemetry_schema, records, batch)
        op = TelemetryWrite(device.id, records)
        future = self._writer.submit_nowait(op)
        if future is None:  # the writer's queue is full: wait for room (backpressure) in a task
            return asyncio.ensure_future(self._writer.submit(op))
        return future

    @staticmethod
    def accepted(future: asyncio.Future[WriteResult], count: int) -> int:
        """The outcome of a `submit_telemetry` future: the count accepted, or the error."""
        try:
            result = future.result()
        except StoreUnavailableError as exc:
            raise unavailable(exc) from exc
        if result.missing:
            raise FleetwireError(ErrorCode.NOT_FOUND, "device no longer exists")
        return count

    async def status(self, device_id: str, status: str, source: str) -> bool:
        """Set the status; True when it changed (only a change records `device.status`)."""
        result = await self._write(StatusWrite(device_id, status, source, self._clock.now_ms()))
        if result.missing:
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
        return result.changed

    async def points(
        self,
        device_id: str,
        *,
        key: str | None,
        from_ms: int | None,
        to_ms: int | None,
        limit: int,
        before: tuple[int, int, str] | None,
    ) -> list[TelemetryPoint]:
        await self._existing(device_id)
        return await self._store.telemetry(
            device_id, key=key, from_ms=from_ms, to_ms=to_ms, limit=limit, before=before
        )

    async def latest(self, device_id: str) -> dict[str, TelemetryPoint]:
        await self._existing(device_id)
        return await self._store.latest_telemetry(device_id)

    async def _existing(self, device_id: str) -> Device:
        device = await self._store.get_device(device_id)
        if device is None:
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
        return device

    async def device(self, device_id: str) -> Device:
        """The device a REST ingest writes for (a WebSocket session holds its own copy)."""
        return await self._existing(device_id)

    async def _write(self, op: WriteOp) -> WriteResult:
        try:
            return await self._writer.submit(op)
        except StoreUnavailableError as exc:
            raise unavailable(exc) from exc


def unavailable(exc: Exception) -> FleetwireError:
    """The client learns to retry; the detail (SQL, driver text) stays in the log (13.15)."""
    log.warning("storage unavailable: %s", exc)
    return FleetwireError(ErrorCode.UNAVAILABLE, "storage unavailable, retry later")
