"""SqlStore: the Store seam on SQLite (the default) or PostgreSQL, one code path.

SQLAlchemy 2 async Core with aiosqlite / asyncpg. This module holds the engines and the
transactions; the statements are in registry, events, telemetry and commands, and what
differs between the two databases is the store's Dialect.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fleetwire.domain.clock import now_ms
from fleetwire.domain.commands import Command, CommandState
from fleetwire.domain.devices import Device, DeviceChanges, DeviceFilter
from fleetwire.domain.events import Event
from fleetwire.domain.twin import Twin
from fleetwire.store.base import (
    DuplicateError,
    Store,
    StoreUnavailableError,
    TelemetryPoint,
    WriteOp,
    WriteResult,
)
from fleetwire.store.rules import to_store
from fleetwire.store.sql import commands, events, registry, rows, telemetry, twin
from fleetwire.store.sql.dialect import for_url
from fleetwire.store.sql.engine import (
    async_url,
    create_engine,
    is_sqlite,
    lock_for_migrations,
    sqlite_options,
    upgrade_to_head,
)
from fleetwire.store.sql.errors import translate

_PURGE_CHUNK: Final = 500


class SqlStore:
    """The Store on SQLite or PostgreSQL (see store.base for the contract).

    `history` bounds the event history per device between purges: `write` trims a device's
    events to the newest `history` whenever its seq crosses a multiple of `history`
    (amortised O(1) per event), and `purge(…, history)` trims exactly.
    """

    def __init__(self, url: str, *, history: int = 1000) -> None:
        if history < 1:
            raise ValueError("history must be at least 1")
        self._url = url
        async_url(url)  # refuse a bad URL now, not at open()
        if is_sqlite(url):
            sqlite_options(url)
        self._dialect = for_url(url)
        self._history = history
        self._engine: AsyncEngine | None = None
        self._writer: AsyncEngine | None = None
        self._snapshot: AsyncEngine | None = None
        self._write_lock: contextlib.AbstractAsyncContextManager[Any] = contextlib.nullcontext()

    @property
    def dialect(self) -> str:
        return self._dialect.name

    async def open(self) -> None:
        if self._engine is not None:
            return
        engine = create_engine(self._url)
        writer = engine.execution_options(fleetwire_write=True)
        try:
            async with writer.begin() as conn:
                await lock_for_migrations(conn)
                await conn.run_sync(upgrade_to_head)
        except Exception as exc:
            await engine.dispose()
            translated = translate(exc)
            if translated is None:
                raise
            raise translated from exc
        self._engine, self._writer = engine, writer
        self._write_lock = self._dialect.write_lock()
        isolation = self._dialect.snapshot_isolation
        self._snapshot = engine if isolation is None else engine.execution_options(isolation_level=isolation)

    async def close(self) -> None:
        engine, self._engine, self._writer, self._snapshot = self._engine, None, None, None
        if engine is not None:
            await engine.dispose()

    async def ping(self) -> None:
        async with self._read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # -- transactions --------------------------------------------------------------------

    @asynccontextmanager
    async def _read(self, *, snapshot: bool = False) -> AsyncIterator[AsyncConnection]:
        """A connection for reading; `snapshot` makes several statements see one state."""
        engine = self._snapshot if snapshot else self._engine
        if engine is None:
            raise StoreUnavailableError("the store is closed")
        try:
            async with engine.connect() as conn:
                yield conn
        except Exception as exc:
            translated = translate(exc)
            if translated is None:
                raise
            raise translated from exc

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction (SQLite: BEGIN IMMEDIATE), committed on leaving."""
        if self._writer is None:
            raise StoreUnavailableError("the store is closed")
        try:
            async with self._write_lock, self._writer.begin() as conn:
                yield conn
        except Exception as exc:
            translated = translate(exc)
            if translated is None:
                raise
            raise translated from exc

    # -- registry ------------------------------------------------------------------------

    async def create_device(self, device: Device) -> Device:
        stored = to_store(device, now_ms())
        async with self._write() as conn:
            inserted = await registry.insert(conn, self._dialect, stored)
        if not inserted:
            raise DuplicateError(f"device {device.id!r} exists already")
        return stored

    async def get_device(self, device_id: str) -> Device | None:
        async with self._read() as conn:
            return await registry.get(conn, device_id)

    async def list_devices(self, where: DeviceFilter, limit: int, after: str | None = None) -> list[Device]:
        query = registry.list_query(self._dialect, where, limit, after)
        if query is None:
            return []
        async with self._read() as conn:
            found = (await conn.execute(query)).all()
        return [rows.device(row) for row in found]

    async def update_device(self, device_id: str, changes: DeviceChanges) -> Device | None:
        values = registry.change_values(changes)
        if not values:
            return await self.get_device(device_id)
        async with self._write() as conn:
            return await registry.update(conn, device_id, values, now_ms())

    async def delete_device(self, device_id: str) -> Device | None:
        async with self._write() as conn:
            return await registry.delete(conn, device_id)

    # -- event log -----------------------------------------------------------------------

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        if not ops:
            return []
        async with self._write() as conn:
            return await events.write(conn, self._dialect, ops, self._history)

    async def events(self, device_id: str, after_seq: int, limit: int) -> list[Event]:
        if limit <= 0:
            return []
        async with self._read(snapshot=True) as conn:
            return await events.history(conn, device_id, after_seq, limit)

    async def purge(self, telemetry_before_ms: int, history: int) -> None:
        """Chunks of devices, each in its own short transaction (never one huge delete)."""
        after: str | None = ""
        while after is not None:
            async with self._write() as conn:
                after = await events.purge_chunk(
                    conn, self._dialect, after, _PURGE_CHUNK, telemetry_before_ms, history
                )

    # -- twin ----------------------------------------------------------------------------

    async def twin(self, device_id: str) -> Twin | None:
        async with self._read() as conn:
            return await twin.get(conn, device_id)

    async def devices_with_delta(self) -> set[str]:
        async with self._read() as conn:
            return await twin.devices_with_delta(conn)

    # -- telemetry -----------------------------------------------------------------------

    async def telemetry(
        self,
        device_id: str,
        *,
        key: str | None,
        from_ms: int | None,
        to_ms: int | None,
        limit: int,
        before: tuple[int, int, str] | None = None,
    ) -> list[TelemetryPoint]:
        if limit <= 0:
            return []
        async with self._read() as conn:
            return await telemetry.points(
                conn, device_id, key=key, from_ms=from_ms, to_ms=to_ms, limit=limit, before=before
            )

    async def latest_telemetry(self, device_id: str) -> dict[str, TelemetryPoint]:
        async with self._read() as conn:
            return await telemetry.latest(conn, device_id)

    # -- commands ------------------------------------------------------------------------

    async def create_command(self, command: Command) -> Command:
        """Insert; DuplicateError for an existing id, LookupError if the device is absent."""
        try:
            async with self._write() as conn:
                await commands.insert(conn, command)
        except sa.exc.IntegrityError as exc:  # not unique: the device's foreign key
            raise LookupError(f"device {command.device_id!r} does not exist") from exc
        return command

    async def get_command(self, command_id: str) -> Command | None:
        async with self._read() as conn:
            return await commands.get(conn, command_id)

    async def find_command(self, issuer: str, idempotency_key: str, since_ms: int) -> Command | None:
        async with self._read() as conn:
            return await commands.find(conn, issuer, idempotency_key, since_ms)

    async def transition_command(
        self,
        command_id: str,
        state: CommandState,
        at_ms: int,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> Command | None:
        statement = commands.transition(command_id, state, at_ms, result, error)
        if statement is None:
            return None
        async with self._write() as conn:
            row = (await conn.execute(statement)).first()
        return None if row is None else rows.command(row)

    async def pending_commands(self, device_id: str, now_ms: int) -> list[Command]:
        async with self._read() as conn:
            return await commands.pending(conn, device_id, now_ms)

    async def devices_with_pending(self, now_ms: int) -> set[str]:
        async with self._read() as conn:
            return await commands.devices_with_pending(conn, now_ms)

    async def list_commands(
        self, device_id: str, state: CommandState | None, limit: int, after: str | None = None
    ) -> list[Command]:
        async with self._read() as conn:
            return await commands.of_device(conn, device_id, state, limit, after)

    async def due_commands(self, now_ms: int, limit: int) -> list[Command]:
        async with self._read() as conn:
            return await commands.due(conn, now_ms, limit)


_: type[Store] = SqlStore  # static conformance: mypy checks SqlStore against the protocol
