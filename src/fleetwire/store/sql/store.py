"""SqlStore: the Store seam on SQLite (the default) or PostgreSQL, one code path.

The drivers are raw sqlite3 in threads and asyncpg (driver.py says why); SQLAlchemy and
Alembic only migrate the schema at open(). This module holds the transactions; the
statements are in registry, events, telemetry and commands, and what differs between the
two databases is the store's Dialect.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
from sqlalchemy.engine import make_url

from fleetwire.domain.clock import now_ms
from fleetwire.domain.commands import Command, CommandState
from fleetwire.domain.devices import Device, DeviceChanges, DeviceFilter
from fleetwire.domain.events import Event
from fleetwire.domain.jobs import Execution, ExecutionState, Job
from fleetwire.domain.twin import Twin
from fleetwire.store.base import (
    DuplicateError,
    Store,
    TelemetryPoint,
    WriteOp,
    WriteResult,
)
from fleetwire.store.rules import to_store
from fleetwire.store.sql import commands, events, jobs, registry, rows, telemetry, twin
from fleetwire.store.sql.dialect import for_url
from fleetwire.store.sql.driver import Database, PostgresDatabase, SqliteDatabase, Tx
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
_FOREIGN_KEY: Final = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)


class SqlStore:
    """The Store on SQLite or PostgreSQL (see store.base for the contract).

    `history` bounds the event history per device between purges: `write` trims a device's
    events to the newest `history` whenever its seq crosses a multiple of
    `rules.trim_step(history)` (amortised O(1) per event, in steps of an eighth), and
    `purge(…, history)` trims exactly.
    """

    def __init__(
        self, url: str, *, history: int = 1000, pool_size: int = 10, slow_write_ms: float = 200.0
    ) -> None:
        """`pool_size`: PostgreSQL connections (SQLite has one writer and one reader);
        `slow_write_ms`: write transactions that take longer are logged as warnings."""
        if history < 1:
            raise ValueError("history must be at least 1")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if slow_write_ms < 0:
            raise ValueError("slow_write_ms must not be negative")
        self._url = url
        async_url(url)  # refuse a bad URL now, not at open()
        self._database: Database
        if is_sqlite(url):
            synchronous, busy_timeout = sqlite_options(url)
            path = make_url(url).database
            assert path is not None  # async_url refuses URLs without a file
            self._database = SqliteDatabase(
                str(Path(path).expanduser()),
                synchronous=synchronous,
                busy_timeout_ms=busy_timeout,
                slow_write_ms=slow_write_ms,
            )
        else:
            dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
            self._database = PostgresDatabase(dsn, pool_size=pool_size, slow_write_ms=slow_write_ms)
        self._dialect = for_url(url)
        self._history = history
        self._open = False

    @property
    def dialect(self) -> str:
        return self._dialect.name

    @property
    def concurrent_writes(self) -> bool:
        return not is_sqlite(self._url)

    async def open(self) -> None:
        if self._open:
            return
        # The driver's connections first: they stay open across the migration engine's
        # dispose(), so the database never loses its last connection while other processes
        # start (the last close checkpoints the WAL, and a racing open got SQLITE_BUSY).
        await self._database.open()
        try:
            await self._migrate()
        except BaseException:
            await self._database.close()
            raise
        self._open = True

    async def _migrate(self) -> None:
        """Bring the schema up to date through Alembic (SQLAlchemy: not on any hot path)."""
        engine = create_engine(self._url)
        try:
            async with engine.execution_options(fleetwire_write=True).begin() as conn:
                await lock_for_migrations(conn)
                await conn.run_sync(upgrade_to_head)
        except Exception as exc:
            translated = translate(exc)
            if translated is None:
                raise
            raise translated from exc
        finally:
            await engine.dispose()

    async def close(self) -> None:
        self._open = False
        await self._database.close()

    async def ping(self) -> None:
        await self._database.read(_ping)

    # -- registry ------------------------------------------------------------------------

    async def create_device(self, device: Device) -> Device:
        stored = to_store(device, now_ms())
        if not await self._database.write(partial(registry.insert, device=stored)):
            raise DuplicateError(f"device {device.id!r} exists already")
        return stored

    async def get_device(self, device_id: str) -> Device | None:
        return await self._database.read(partial(registry.get, device_id=device_id))

    async def list_devices(self, where: DeviceFilter, limit: int, after: str | None = None) -> list[Device]:
        query = registry.list_query(self._dialect, where, limit, after)
        if query is None:
            return []
        sql, params = query

        async def run(tx: Tx) -> list[Device]:
            return [rows.device(row) for row in await tx.fetch(sql, *params)]

        return await self._database.read(run)

    async def update_device(self, device_id: str, changes: DeviceChanges) -> Device | None:
        values = registry.change_values(changes)
        if not values:
            return await self.get_device(device_id)
        return await self._database.write(
            partial(registry.update, device_id=device_id, values=values, at_ms=now_ms())
        )

    async def delete_device(self, device_id: str) -> Device | None:
        return await self._database.write(partial(registry.delete, device_id=device_id))

    # -- event log -----------------------------------------------------------------------

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        if not ops:
            return []
        return await self._database.write(
            partial(events.write, dialect=self._dialect, ops=ops, history=self._history)
        )

    async def events(self, device_id: str, after_seq: int, limit: int) -> list[Event]:
        if limit <= 0:
            return []
        return await self._database.read(
            partial(events.history, device_id=device_id, after_seq=after_seq, limit=limit), snapshot=True
        )

    async def purge(self, telemetry_before_ms: int, history: int) -> None:
        """Chunks of devices, each in its own short transaction (never one huge delete)."""
        after: str | None = ""
        while after is not None:
            after = await self._database.write(
                partial(
                    events.purge_chunk,
                    dialect=self._dialect,
                    after=after,
                    chunk=_PURGE_CHUNK,
                    telemetry_before_ms=telemetry_before_ms,
                    history=history,
                )
            )

    # -- twin ----------------------------------------------------------------------------

    async def twin(self, device_id: str) -> Twin | None:
        return await self._database.read(partial(twin.get, device_id=device_id))

    async def devices_with_delta(self) -> set[str]:
        return await self._database.read(twin.devices_with_delta)

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
        return await self._database.read(
            partial(
                telemetry.points,
                dialect=self._dialect,
                device_id=device_id,
                key=key,
                from_ms=from_ms,
                to_ms=to_ms,
                limit=limit,
                before=before,
            ),
            # Several pages when records hold fewer points than asked for: one snapshot.
            snapshot=key is None,
        )

    async def latest_telemetry(self, device_id: str) -> dict[str, TelemetryPoint]:
        return await self._database.read(partial(telemetry.latest, device_id=device_id))

    # -- commands ------------------------------------------------------------------------

    async def create_command(self, command: Command) -> Command:
        """Insert; DuplicateError for an existing id, LookupError if the device is absent."""
        try:
            await self._database.write(partial(commands.insert, command=command))
        except _FOREIGN_KEY as exc:  # not unique (that is DuplicateError): the device's key
            raise LookupError(f"device {command.device_id!r} does not exist") from exc
        return command

    async def get_command(self, command_id: str) -> Command | None:
        return await self._database.read(partial(commands.get, command_id=command_id))

    async def find_command(self, issuer: str, idempotency_key: str, since_ms: int) -> Command | None:
        return await self._database.read(
            partial(commands.find, issuer=issuer, idempotency_key=idempotency_key, since_ms=since_ms)
        )

    async def transition_command(
        self,
        command_id: str,
        state: CommandState,
        at_ms: int,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> Command | None:
        return await self._database.write(
            partial(
                commands.transition,
                command_id=command_id,
                state=state,
                at_ms=at_ms,
                result=result,
                error=error,
            )
        )

    async def pending_commands(self, device_id: str, now_ms: int) -> list[Command]:
        return await self._database.read(partial(commands.pending, device_id=device_id, now_ms=now_ms))

    async def devices_with_pending(self, now_ms: int) -> set[str]:
        return await self._database.read(partial(commands.devices_with_pending, now_ms=now_ms))

    async def list_commands(
        self, device_id: str, state: CommandState | None, limit: int, after: str | None = None
    ) -> list[Command]:
        return await self._database.read(
            partial(commands.of_device, device_id=device_id, state=state, limit=limit, after=after)
        )

    async def due_commands(self, now_ms: int, limit: int) -> list[Command]:
        return await self._database.read(partial(commands.due, now_ms=now_ms, limit=limit))

    # -- jobs (store/sql/jobs.py) --------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        return await self._database.read(partial(jobs.get, job_id=job_id))

    async def list_jobs(self, limit: int, before: str | None = None) -> list[Job]:
        return await self._database.read(partial(jobs.list_jobs, limit=limit, before=before))

    async def job_counts(self, job_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        return await self._database.read(partial(jobs.counts, dialect=self._dialect, job_ids=job_ids))

    async def job_executions(
        self, job_id: str, state: ExecutionState | None, limit: int, after: int | None = None
    ) -> list[Execution]:
        return await self._database.read(
            partial(jobs.executions, job_id=job_id, state=state, limit=limit, after=after)
        )

    async def job_progress(self, job_id: str) -> tuple[int, int]:
        return await self._database.read(partial(jobs.progress, job_id=job_id))

    async def next_executions(self, job_id: str, limit: int) -> list[Execution]:
        return await self._database.read(partial(jobs.next_pending, job_id=job_id, limit=limit))

    async def take_job_lease(self, job_id: str, node: str, now_ms: int, until_ms: int) -> bool:
        return await self._database.write(
            partial(jobs.take_lease, job_id=job_id, node=node, now_ms=now_ms, until_ms=until_ms)
        )

    async def release_job_lease(self, job_id: str, node: str) -> None:
        await self._database.write(partial(jobs.release_lease, job_id=job_id, node=node))

    async def orphan_jobs(self, now_ms: int, limit: int) -> list[str]:
        return await self._database.read(partial(jobs.orphans, now_ms=now_ms, limit=limit))


async def _ping(tx: Tx) -> None:
    await tx.fetchrow("SELECT 1")


_: type[Store] = SqlStore  # static conformance: mypy checks SqlStore against the protocol
