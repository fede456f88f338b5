"""The Store contract (store/base.py), one suite run on every implementation.

MemoryStore, SqlStore on SQLite and SqlStore on PostgreSQL. Every test opens a fresh
database: a MemoryDatabase, a file in tmp_path, or a new PostgreSQL database from the
`postgres_url` fixture (skipped when the server is not reachable). `backend.make()` opens
another store on the same database, as another process would.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from enum import IntEnum
from fnmatch import fnmatchcase
from pathlib import Path

import anyio
import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import pytest
import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from fleetwire.domain.clock import format_ms
from fleetwire.domain.commands import Command, CommandState
from fleetwire.domain.devices import Device, DeviceFilter
from fleetwire.domain.errors import ErrorCode
from fleetwire.domain.events import Event, RecordRun
from fleetwire.domain.jobs import ExecutionState, Job, JobSpec, JobState
from fleetwire.domain.telemetry import Record
from fleetwire.domain.twin import Section, Twin, TwinLimits
from fleetwire.store.base import (
    CreateCommand,
    CreateJob,
    DeleteDevice,
    DispatchExecution,
    DuplicateError,
    EventWrite,
    PatchTwin,
    RegisterDevice,
    SetJobState,
    StatusWrite,
    Store,
    StoreUnavailableError,
    TelemetryPoint,
    TelemetryWrite,
    TransitionCommand,
    UpdateDevice,
    WriteResult,
)
from fleetwire.store.memory import MemoryDatabase, MemoryStore
from fleetwire.store.rules import trim_step
from fleetwire.store.sql import SqlStore, async_url, create_engine
from fleetwire.store.sql.engine import MIGRATIONS_DIR

pytestmark = pytest.mark.anyio

LIMIT_S = 30  # bound of every test body; the slowest (PostgreSQL, 40 000 ids) takes ~2 s


@dataclass(frozen=True)
class Backend:
    """One database of one implementation; `make` opens a store on it."""

    url: str | None  # None: in memory
    memory: MemoryDatabase

    def make(self, *, history: int = 1000) -> Store:
        if self.url is None:
            return MemoryStore(self.memory, history=history)
        return SqlStore(self.url, history=history)


def _sql_url(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'fleetwire.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    url = None if request.param == "memory" else _sql_url(request, tmp_path, request.param)
    return Backend(url, MemoryDatabase())


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """For what only a SQL database has (the schema's migrations)."""
    return _sql_url(request, tmp_path, request.param)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = backend.make()
    with anyio.fail_after(LIMIT_S):
        await opened.open()
    try:
        yield opened
    finally:
        with anyio.fail_after(LIMIT_S):
            await opened.close()


def published(result: WriteResult) -> list[Event]:
    """The events a write published: its events, and its records' events (a TelemetryWrite's
    come as one RecordRun)."""
    return result.events + (result.records.events() if result.records is not None else [])


async def _devices(store: Store, *ids: str) -> None:
    for device_id in ids:
        await store.create_device(Device(device_id, created_at_ms=1000, updated_at_ms=1000))


def _command(command_id: str, device_id: str = "d1", **fields: object) -> Command:
    values: dict[str, object] = {
        "id": command_id,
        "device_id": device_id,
        "name": "reboot",
        "params": {"delay": 5},
        "state": CommandState.PENDING,
        "issued_at_ms": 1000,
        "expires_at_ms": 31_000,
        "issuer": "alice",
    }
    values.update(fields)
    return Command(**values)  # type: ignore[arg-type]


# -- lifecycle -----------------------------------------------------------------------------


async def test_open_twice_and_reopen_are_no_ops(store: Store, backend: Backend) -> None:
    """Migrations are idempotent: opening again, and another store on the same URL, keep data."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        await store.open()
        again = backend.make()
        await again.open()
        try:
            assert (await again.get_device("d1")) == await store.get_device("d1")
            await again.ping()
        finally:
            await again.close()
        assert (await store.get_device("d1")) is not None


async def test_concurrent_opens_all_succeed(backend: Backend) -> None:
    """Several processes starting together: every open succeeds, all see one database."""
    with anyio.fail_after(LIMIT_S):
        stores = [backend.make() for _ in range(4)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            await _devices(stores[0], "d1")
            assert (await stores[3].get_device("d1")) is not None
        finally:
            await asyncio.gather(*(s.close() for s in stores))


async def test_concurrent_opens_migrate_once(url: str) -> None:
    """Several processes starting together: every open succeeds, the schema is made once."""
    with anyio.fail_after(LIMIT_S):
        stores = [SqlStore(url) for _ in range(4)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            await _devices(stores[0], "d1")
            assert (await stores[3].get_device("d1")) is not None
            engine = create_async_engine(async_url(url))
            async with engine.connect() as conn:
                versions = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).all()
            await engine.dispose()
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            head = ScriptDirectory.from_config(config).get_current_head()  # one head: a chain
            assert [tuple(v) for v in versions] == [(head,)]
        finally:
            await asyncio.gather(*(s.close() for s in stores))


def _upgrade_to(revision: str) -> Callable[[sa.Connection], None]:
    def upgrade(connection: sa.Connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = connection
        alembic_command.upgrade(config, revision)

    return upgrade


async def _old_device(conn: AsyncConnection, device_id: str, seq: int) -> None:
    """A device row as every revision so far has it (raw SQL: the schema of the test's revision)."""
    await conn.execute(
        sa.text(
            "INSERT INTO devices (id, tags, metadata, disabled, created_at, updated_at, seq)"
            " VALUES (:id, '[]', '{}', false, 1, 1, :seq)"
        ),
        {"id": device_id, "seq": seq},
    )


async def test_revision_0002_migrates_telemetry_of_0001(url: str) -> None:
    """A database at 0001 (one row per record and key, typed columns) keeps every point:
    history, per-key ranges and the latest values read the same after 0002."""
    with anyio.fail_after(LIMIT_S):
        engine = create_engine(url)
        rows = [  # device_id, seq, key, ts, kind (0 float, 1 int, 2 bool, 3 str), num, txt
            ("d1", 1, "t", 1000, 0, 21.5, None),
            ("d1", 1, "on", 1000, 2, 1.0, None),
            ("d1", 2, "t", 3000, 0, 22.0, None),
            ("d1", 2, "n", 3000, 1, float(10**30), str(10**30)),
            ("d1", 3, "t", 2000, 1, 7.0, None),  # older ts, later seq: not the latest
            ("d1", 3, "s", 2000, 3, None, "héllo"),
        ]
        try:
            async with engine.execution_options(fleetwire_write=True).begin() as conn:
                await conn.run_sync(_upgrade_to("0001"))
                await _old_device(conn, "d1", seq=4)
                await conn.execute(
                    sa.text(
                        "INSERT INTO events (device_id, seq, name, at, data) VALUES ('d1', 4, 'e', 4000, '{}')"
                    )
                )
                for device_id, seq, key, ts, kind, num, txt in rows:
                    await conn.execute(
                        sa.text(
                            "INSERT INTO telemetry (device_id, seq, key, ts, kind, num, txt)"
                            " VALUES (:d, :s, :k, :ts, :kind, :num, :txt)"
                        ),
                        {"d": device_id, "s": seq, "k": key, "ts": ts, "kind": kind, "num": num, "txt": txt},
                    )
        finally:
            await engine.dispose()
        store = SqlStore(url)
        await store.open()
        try:
            history = await store.events("d1", 0, 10)
            assert [(e.seq, e.name, e.at_ms, e.data) for e in history] == [
                (1, "device.telemetry", 1000, {"ts": format_ms(1000), "values": {"on": True, "t": 21.5}}),
                (2, "device.telemetry", 3000, {"ts": format_ms(3000), "values": {"n": 10**30, "t": 22.0}}),
                (3, "device.telemetry", 2000, {"ts": format_ms(2000), "values": {"s": "héllo", "t": 7}}),
                (4, "e", 4000, {}),
            ]
            assert type(history[2].data["values"]["t"]) is int
            assert await store.latest_telemetry("d1") == {
                "t": TelemetryPoint("t", 3000, 2, 22.0),
                "on": TelemetryPoint("on", 1000, 1, True),
                "n": TelemetryPoint("n", 3000, 2, 10**30),
                "s": TelemetryPoint("s", 2000, 3, "héllo"),
            }
            points = await store.telemetry("d1", key="t", from_ms=None, to_ms=None, limit=10)
            assert [(p.ts_ms, p.seq, p.value) for p in points] == [
                (3000, 2, 22.0),
                (2000, 3, 7),
                (1000, 1, 21.5),
            ]
            [result] = await store.write([TelemetryWrite("d1", [Record(5000, {"t": 1.0})])])
            assert published(result)[0].seq == 5  # the counter carried over
        finally:
            await store.close()


async def test_revision_0005_keeps_every_command_query_of_0004(url: str) -> None:
    """Commands stored at 0004 (full indexes) are found the same through the partial indexes
    of 0005: queued ones per device, live ones by the sweep, by idempotency key, by job."""
    with anyio.fail_after(LIMIT_S):
        engine = create_engine(url)
        commands = [  # id, state, expires_at, idempotency_key, job_id
            ("c1", "pending", 9000, None, None),
            ("c2", "sent", 8000, "k1", None),
            ("c3", "succeeded", 7000, None, "j1"),
            ("c4", "pending", 6000, None, "j1"),
        ]
        try:
            async with engine.execution_options(fleetwire_write=True).begin() as conn:
                await conn.run_sync(_upgrade_to("0004"))
                await _old_device(conn, "d1", seq=0)
                for command_id, state, expires_at, key, job_id in commands:
                    await conn.execute(
                        sa.text(
                            "INSERT INTO commands (id, device_id, name, params, state, issued_at,"
                            " expires_at, timeout_s, issuer, idempotency_key, extra, job_id)"
                            " VALUES (:id, 'd1', 'reboot', '{}', :state, :issued, :expires, 30,"
                            " 'op', :key, '{}', :job)"
                        ),
                        {
                            "id": command_id,
                            "state": state,
                            "issued": int(command_id[1]),
                            "expires": expires_at,
                            "key": key,
                            "job": job_id,
                        },
                    )
        finally:
            await engine.dispose()
        store = SqlStore(url)
        await store.open()
        try:
            assert [c.id for c in await store.pending_commands("d1", 0)] == ["c1", "c4"]
            assert await store.devices_with_pending(0) == {"d1"}
            assert [c.id for c in await store.due_commands(10_000, 10)] == ["c4", "c2", "c1"]
            found = await store.find_command("op", "k1", 0)
            assert found is not None
            assert found.id == "c2"
            assert await store.job_progress("j1") == (0, 1)  # c4 still live; no pending executions
        finally:
            await store.close()
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                names = await conn.run_sync(lambda c: {i["name"] for i in sa.inspect(c).get_indexes("commands")})
        finally:
            await engine.dispose()
        assert names == {
            "ix_commands_device_id",
            "ix_commands_pending",
            "ix_commands_due",
            "ix_commands_idempotency",
            "ix_commands_job",
        }


async def test_closed_store_is_unavailable(backend: Backend) -> None:
    """After close() every call raises StoreUnavailableError instead of reconnecting."""
    with anyio.fail_after(LIMIT_S):
        closed = backend.make()
        await closed.open()
        await closed.ping()
        await closed.close()
        with pytest.raises(StoreUnavailableError):
            await closed.ping()
        with pytest.raises(StoreUnavailableError):
            await closed.write([EventWrite("d1", "device.connected", 1, {})])


# -- registry ------------------------------------------------------------------------------


async def test_create_and_get_round_trip_every_field(store: Store) -> None:
    """A device comes back exactly as stored, JSON numbers and booleans included."""
    with anyio.fail_after(LIMIT_S):
        device = Device(
            id="site-a.pump_1:x",
            name="Pump 1",
            type="pump",
            tags=("b", "a"),
            metadata={
                "floor": 3,
                "ratio": 0.1,
                "big": 1e300,
                "ok": False,
                "nested": {"list": [1, 2.5, "x", None]},
            },
            status="online",
            status_at_ms=1234,
            disabled=True,
            telemetry_schema={"type": "object", "properties": {"t": {"type": "number"}}},
            created_at_ms=1000,
            updated_at_ms=2000,
        )
        assert await store.create_device(device) == device
        got = await store.get_device(device.id)
        assert got == device
        assert got is not None
        assert type(got.metadata["floor"]) is int
        assert type(got.metadata["ratio"]) is float
        assert got.metadata["big"] == 1e300
        assert await store.get_device("absent") is None


async def test_create_fills_missing_timestamps(store: Store) -> None:
    """created_at/updated_at of 0 mean "now"; the stored values are returned."""
    with anyio.fail_after(LIMIT_S):
        stored = await store.create_device(Device("d1"))
        assert stored.created_at_ms > 1_600_000_000_000
        assert stored.updated_at_ms == stored.created_at_ms
        assert await store.get_device("d1") == stored


async def test_duplicate_device_is_refused(store: Store) -> None:
    """A second create with the same id raises DuplicateError and changes nothing."""
    with anyio.fail_after(LIMIT_S):
        await store.create_device(Device("d1", name="first", created_at_ms=1, updated_at_ms=1))
        with pytest.raises(DuplicateError):
            await store.create_device(Device("d1", name="second", created_at_ms=1, updated_at_ms=1))
        got = await store.get_device("d1")
        assert got is not None
        assert got.name == "first"


async def test_list_filters(store: Store) -> None:
    """status, tag and type filters, only_ids / exclude_ids, each alone and combined."""
    with anyio.fail_after(LIMIT_S):
        for device_id, status, tags, kind in [
            ("a1", "online", ("x", "y"), "pump"),
            ("a2", "offline", ("y",), "pump"),
            ("a3", "online", (), "valve"),
            ("a4", None, ("x",), None),
        ]:
            await store.create_device(
                Device(device_id, status=status, tags=tags, type=kind, created_at_ms=1, updated_at_ms=1)
            )

        async def ids(where: DeviceFilter, limit: int = 100) -> list[str]:
            return [d.id for d in await store.list_devices(where, limit)]

        assert await ids(DeviceFilter()) == ["a1", "a2", "a3", "a4"]
        assert await ids(DeviceFilter(status="online")) == ["a1", "a3"]
        assert await ids(DeviceFilter(tag="x")) == ["a1", "a4"]
        assert await ids(DeviceFilter(tag="y")) == ["a1", "a2"]
        assert await ids(DeviceFilter(tag="z")) == []
        assert await ids(DeviceFilter(type="pump")) == ["a1", "a2"]
        assert await ids(DeviceFilter(only_ids=frozenset({"a2", "a4", "zz"}))) == ["a2", "a4"]
        assert await ids(DeviceFilter(only_ids=frozenset())) == []
        assert await ids(DeviceFilter(exclude_ids=frozenset({"a1", "a3"}))) == ["a2", "a4"]
        assert await ids(DeviceFilter(exclude_ids=frozenset())) == ["a1", "a2", "a3", "a4"]
        assert await ids(DeviceFilter(status="online", tag="x", type="pump")) == ["a1"]
        assert await ids(DeviceFilter(tag="y", exclude_ids=frozenset({"a1"}))) == ["a2"]
        assert await ids(DeviceFilter(patterns=("a[12]",), only_ids=frozenset({"a2", "a3"}))) == ["a2"]


async def test_a_thousand_patterns_are_one_query(store: Store) -> None:
    """Issue 13.14: 1,000 patterns (the subscribe maximum) match like fewer; SQLite used to
    fail with "Expression tree is too large" on one OR term each."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "p-0007", "p-0999", "q-1", "z")
        patterns = (*(f"p-{n:04d}" for n in range(998)), "p-0999*", "q-?")
        found = [d.id for d in await store.list_devices(DeviceFilter(patterns=patterns), 100)]
        assert found == ["p-0007", "p-0999", "q-1"]


async def test_list_patterns_match_like_fnmatchcase(store: Store) -> None:
    """`patterns` are the `devices` claim globs: the same matches as fnmatch.fnmatchcase."""
    with anyio.fail_after(LIMIT_S):
        ids = [
            "site-a.1",
            "site-a.2",
            "site-b.1",
            "Site-a.3",
            "site_a.4",
            "sitexa.5",
            "d1",
            "d10",
            "a%b",
            "x-y:z",
        ]
        await _devices(store, *ids)
        patterns: list[tuple[str, ...]] = [
            ("site-a.*",),
            ("site?a.*",),
            ("site_a.*",),  # `_` is a literal, not LIKE's any-char
            ("d1",),
            ("d1", "site-b.*"),
            ("*",),
            ("d[0-9]*",),
            ("d[!1]",),
            ("[Ss]ite-a.?",),
            ("a%b",),
            ("*:z",),
            ("nomatch*",),
        ]
        for group in patterns:
            found = [d.id for d in await store.list_devices(DeviceFilter(patterns=group), 100)]
            expected = sorted(i for i in ids if any(fnmatchcase(i, p) for p in group))
            assert found == expected, group
        assert await store.list_devices(DeviceFilter(patterns=()), 100) == []


async def test_list_pagination_covers_every_device_once(store: Store) -> None:
    """Pages of `limit` ordered by id (code-point order on both databases) with `after`."""
    with anyio.fail_after(LIMIT_S):
        ids = [f"d{i:02d}" for i in range(23)] + ["B1", "a1", "Z-9", "z_1"]
        await _devices(store, *reversed(ids))
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while True:
            page = await store.list_devices(DeviceFilter(), 10, after)
            if not page:
                break
            pages += 1
            assert len(page) <= 10
            seen += [d.id for d in page]
            after = page[-1].id
        assert seen == sorted(ids)  # Python's str order is code-point order
        assert pages == 3
        filtered = await store.list_devices(DeviceFilter(patterns=("d1*",)), 5, "d11")
        assert [d.id for d in filtered] == ["d12", "d13", "d14", "d15", "d16"]


async def test_list_with_very_many_only_ids(store: Store) -> None:
    """only_ids / exclude_ids of 40 000 ids (beyond both databases' parameter limits) work."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2", "d3")
        many = frozenset({f"x{i}" for i in range(40_000)} | {"d2"})
        assert [d.id for d in await store.list_devices(DeviceFilter(only_ids=many), 10)] == ["d2"]
        excluded = await store.list_devices(DeviceFilter(exclude_ids=many), 10)
        assert [d.id for d in excluded] == ["d1", "d3"]


async def test_update_device(store: Store) -> None:
    """Only the given fields change, updated_at moves, status and seq are never touched."""
    with anyio.fail_after(LIMIT_S):
        await store.create_device(
            Device("d1", name="old", status="online", created_at_ms=1000, updated_at_ms=1000)
        )
        await store.write([EventWrite("d1", "device.connected", 5, {})])
        updated = await store.update_device(
            "d1",
            {
                "name": "new",
                "tags": ["t1"],
                "metadata": {"k": 1},
                "disabled": True,
                "telemetry_schema": {"type": "object"},
                "type": "pump",
            },
        )
        assert updated is not None
        assert (updated.name, updated.tags, updated.metadata, updated.disabled) == (
            "new",
            ("t1",),
            {"k": 1},
            True,
        )
        assert (updated.telemetry_schema, updated.type) == ({"type": "object"}, "pump")
        assert (updated.status, updated.seq, updated.created_at_ms) == ("online", 1, 1000)
        assert updated.updated_at_ms > 1000
        assert await store.get_device("d1") == updated
        cleared = await store.update_device("d1", {"name": None, "telemetry_schema": None})
        assert cleared is not None
        assert (cleared.name, cleared.telemetry_schema, cleared.tags) == (None, None, ("t1",))
        assert await store.update_device("d1", {}) == cleared
        assert await store.update_device("absent", {"name": "x"}) is None
        with pytest.raises(ValueError, match="status"):
            await store.update_device("d1", {"status": "x"})


async def test_delete_removes_history_telemetry_and_commands(store: Store) -> None:
    """delete_device returns the device; nothing of it remains, not even under the same id."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2")
        await store.write(
            [
                EventWrite("d1", "device.connected", 5, {}),
                TelemetryWrite("d1", [Record(10, {"t": 1.0})]),
                TelemetryWrite("d2", [Record(10, {"t": 2.0})]),
            ]
        )
        await store.create_command(_command("c1"))
        deleted = await store.delete_device("d1")
        assert deleted is not None
        assert (deleted.id, deleted.seq) == ("d1", 2)
        assert await store.get_device("d1") is None
        assert await store.delete_device("d1") is None
        assert await store.get_command("c1") is None
        await _devices(store, "d1")
        assert await store.events("d1", 0, 10) == []
        assert await store.telemetry("d1", key=None, from_ms=None, to_ms=None, limit=10) == []
        assert await store.latest_telemetry("d1") == {}
        assert await store.list_commands("d1", None, 10) == []
        assert [e.seq for e in await store.events("d2", 0, 10)] == [1]


# -- registry ops through write -------------------------------------------------------------


async def test_register_device_writes_the_row_and_its_event_together(store: Store) -> None:
    """RegisterDevice inserts the device and `device.registered` (data: the device as inserted,
    seq 0, as REST showed it); result.device carries the event's seq; later ops of the group
    already see the device."""
    with anyio.fail_after(LIMIT_S):
        results = await store.write(
            [
                RegisterDevice(Device("d1", name="Pump", tags=("a",), metadata={"k": 1}), 5000),
                EventWrite("d1", "device.connected", 6000, {}),
                TelemetryWrite("d1", [Record(7000, {"t": 1.5})]),
            ]
        )
        inserted = Device(
            "d1", name="Pump", tags=("a",), metadata={"k": 1}, created_at_ms=5000, updated_at_ms=5000
        )
        registered = Event("d1", 1, "device.registered", 5000, inserted.public())
        assert inserted.public()["seq"] == 0
        assert results == [
            WriteResult(events=[registered], device=replace(inserted, seq=1)),
            WriteResult(events=[Event("d1", 2, "device.connected", 6000, {})]),
            WriteResult(records=RecordRun("d1", 2, [Record(7000, {"t": 1.5})])),
        ]
        assert published(results[2]) == [
            Event("d1", 3, "device.telemetry", 7000, {"ts": format_ms(7000), "values": {"t": 1.5}})
        ]
        assert await store.get_device("d1") == replace(inserted, seq=3)
        assert await store.events("d1", 0, 10) == [e for r in results for e in published(r)]
        kept = Device("d2", created_at_ms=1, updated_at_ms=2)
        [result] = await store.write([RegisterDevice(kept, 9000)])
        assert result.device == replace(kept, seq=1)  # given timestamps are kept


async def test_a_failing_op_takes_the_registered_device_with_it(store: Store) -> None:
    """The row and its event are in the group's one transaction: a later op of the group that
    raises leaves neither behind."""
    with anyio.fail_after(LIMIT_S):
        poisoned = TelemetryWrite("d1", [Record(1, {"t": [1, 2]})])  # type: ignore[dict-item]  # the bug under test
        with pytest.raises(
            TypeError, match=r"^telemetry value of 't' must be a number, a boolean or a string, not list$"
        ):
            await store.write([RegisterDevice(Device("d1"), 5000), poisoned])
        assert await store.get_device("d1") is None
        assert await store.events("d1", 0, 10) == []
        assert await store.list_devices(DeviceFilter(), 10) == []


async def test_register_of_an_existing_id_is_a_duplicate_and_the_rest_commits(store: Store) -> None:
    """RegisterDevice of a taken id writes nothing (duplicate=True), also within one group."""
    with anyio.fail_after(LIMIT_S):
        await store.create_device(Device("d1", name="first", created_at_ms=1, updated_at_ms=1))
        results = await store.write(
            [
                RegisterDevice(Device("d1", name="second"), 10),
                EventWrite("d1", "device.connected", 11, {}),
                RegisterDevice(Device("d2"), 12),
                RegisterDevice(Device("d2", name="again"), 13),
            ]
        )
        d2 = Device("d2", created_at_ms=12, updated_at_ms=12)
        assert results == [
            WriteResult(duplicate=True),
            WriteResult(events=[Event("d1", 1, "device.connected", 11, {})]),
            WriteResult(
                events=[Event("d2", 1, "device.registered", 12, d2.public())], device=replace(d2, seq=1)
            ),
            WriteResult(duplicate=True),
        ]
        assert await store.get_device("d1") == Device(
            "d1", name="first", created_at_ms=1, updated_at_ms=1, seq=1
        )
        assert await store.get_device("d2") == replace(d2, seq=1)


async def test_update_device_records_the_updated_device(store: Store) -> None:
    """UpdateDevice applies the changes with updated_at = at_ms and records `device.updated`
    (data: the updated device, seq before the event); missing and empty changes write nothing."""
    with anyio.fail_after(LIMIT_S):
        await store.create_device(
            Device("d1", name="old", status="online", created_at_ms=1000, updated_at_ms=1000)
        )
        await store.write([EventWrite("d1", "device.connected", 1500, {})])
        results = await store.write(
            [
                UpdateDevice("d1", {"name": "new", "tags": ["t1"], "metadata": {"k": 1}}, 2000),
                UpdateDevice("ghost", {"name": "x"}, 2000),
                UpdateDevice("d1", {}, 2100),
            ]
        )
        updated = Device(
            "d1",
            name="new",
            tags=("t1",),
            metadata={"k": 1},
            status="online",
            created_at_ms=1000,
            updated_at_ms=2000,
            seq=1,
        )
        assert results == [
            WriteResult(
                events=[Event("d1", 2, "device.updated", 2000, updated.public())],
                device=replace(updated, seq=2),
            ),
            WriteResult(missing=True),
            WriteResult(device=replace(updated, seq=2)),
        ]
        assert await store.get_device("d1") == replace(updated, seq=2)
        assert [e.name for e in await store.events("d1", 0, 10)] == ["device.connected", "device.updated"]
        with pytest.raises(ValueError, match="status"):
            await store.write([EventWrite("d1", "x", 3000, {}), UpdateDevice("d1", {"status": "x"}, 3000)])
        assert await store.get_device("d1") == replace(updated, seq=2)  # nothing of that group


async def test_delete_device_returns_its_last_event_and_keeps_nothing(store: Store) -> None:
    """DeleteDevice removes the device, history, telemetry and commands; its `device.deleted`
    event (seq = old seq + 1, data = the device as it was) is returned, not kept."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2")
        await store.write(
            [EventWrite("d1", "device.connected", 5, {}), TelemetryWrite("d1", [Record(10, {"t": 1.0})])]
        )
        await store.create_command(_command("c1"))
        before = await store.get_device("d1")
        assert before is not None
        assert before.seq == 2
        results = await store.write(
            [
                DeleteDevice("d1", 3000),
                EventWrite("d1", "device.connected", 3001, {}),
                DeleteDevice("ghost", 3002),
                RegisterDevice(Device("d1", name="reborn"), 3003),
            ]
        )
        reborn = Device("d1", name="reborn", created_at_ms=3003, updated_at_ms=3003)
        assert results == [
            WriteResult(events=[Event("d1", 3, "device.deleted", 3000, before.public())], device=before),
            WriteResult(missing=True),
            WriteResult(missing=True),
            WriteResult(
                events=[Event("d1", 1, "device.registered", 3003, reborn.public())],
                device=replace(reborn, seq=1),
            ),
        ]
        assert await store.events("d1", 0, 10) == published(results[3])
        assert await store.telemetry("d1", key=None, from_ms=None, to_ms=None, limit=10) == []
        assert await store.get_command("c1") is None
        assert await store.get_device("d2") == Device("d2", created_at_ms=1000, updated_at_ms=1000)


async def test_telemetry_values_must_be_scalars(store: Store) -> None:
    """A dict or None reaching the store fails the write (nothing of the group is written);
    an int or str subclass is stored as the plain value."""

    class Level(IntEnum):
        HIGH = 2

    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        for bad in ({"x": 1}, None):
            with pytest.raises(TypeError, match=r"^telemetry value of 'v' must be"):
                await store.write(
                    [EventWrite("d1", "e", 1, {}), TelemetryWrite("d1", [Record(1, {"ok": 1, "v": bad})])]  # type: ignore[dict-item]  # the bug under test
                )
        assert await store.events("d1", 0, 10) == []
        await store.write([TelemetryWrite("d1", [Record(2, {"n": Level.HIGH})])])
        [point] = (await store.latest_telemetry("d1")).values()
        assert (type(point.value), point.value, point.seq) == (int, 2, 1)


# -- the event log -------------------------------------------------------------------------


async def test_write_numbers_a_mixed_group_strictly_plus_one(store: Store) -> None:
    """Seqs follow op order per device, +1 each, also across groups; results mirror ops."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2")
        telemetry = TelemetryWrite("d1", [Record(100, {"t": 1.5}), Record(101, {"t": 2.5, "ok": True})])
        results = await store.write(
            [
                telemetry,
                EventWrite("d2", "device.connected", 7, {"session_id": "s1", "node": "n1"}),
                StatusWrite("d1", "online", "device", 8),
                StatusWrite("d1", "online", "device", 9),
                EventWrite("d1", "command.updated", 10, {"command_id": "c1"}),
                TelemetryWrite("d2", []),
            ]
        )
        assert published(results[0]) == [
            Event("d1", 1, "device.telemetry", 100, {"ts": format_ms(100), "values": {"t": 1.5}}),
            Event("d1", 2, "device.telemetry", 101, {"ts": format_ms(101), "values": {"t": 2.5, "ok": True}}),
        ]
        assert results == [
            WriteResult(records=RecordRun("d1", 0, telemetry.records)),
            WriteResult(events=[Event("d2", 1, "device.connected", 7, {"session_id": "s1", "node": "n1"})]),
            WriteResult(
                events=[
                    Event(
                        "d1",
                        3,
                        "device.status",
                        8,
                        {"status": "online", "previous_status": None, "source": "device"},
                    )
                ],
                changed=True,
            ),
            WriteResult(),
            WriteResult(events=[Event("d1", 4, "command.updated", 10, {"command_id": "c1"})]),
            WriteResult(),  # no records: no run
        ]
        second = await store.write(
            [EventWrite("d1", "device.disconnected", 11, {}), EventWrite("d2", "x", 12, {})]
        )
        assert [e.seq for r in second for e in published(r)] == [5, 2]
        d1 = await store.get_device("d1")
        assert d1 is not None
        assert (d1.seq, d1.status, d1.status_at_ms) == (5, "online", 8)
        d1_events = [e for r in results for e in published(r) if e.device_id == "d1"] + published(second[0])
        assert await store.events("d1", 0, 100) == d1_events


async def test_status_writes_apply_in_order(store: Store) -> None:
    """Several StatusWrites for one device in one group: each compared with the previous."""
    with anyio.fail_after(LIMIT_S):
        await store.create_device(Device("d1", status="a", status_at_ms=1, created_at_ms=1, updated_at_ms=1))
        results = await store.write(
            [
                StatusWrite("d1", "a", "api", 10),
                StatusWrite("d1", "b", "api", 11),
                StatusWrite("d1", "b", "device", 12),
                StatusWrite("d1", "a", "device", 13),
            ]
        )
        assert [r.changed for r in results] == [False, True, False, True]
        assert [e.data for r in results for e in published(r)] == [
            {"status": "b", "previous_status": "a", "source": "api"},
            {"status": "a", "previous_status": "b", "source": "device"},
        ]
        assert [e.seq for r in results for e in published(r)] == [1, 2]
        device = await store.get_device("d1")
        assert device is not None
        assert (device.status, device.status_at_ms, device.seq) == ("a", 13, 2)
        unchanged = await store.write([StatusWrite("d1", "a", "api", 20)])
        assert unchanged == [WriteResult()]
        device = await store.get_device("d1")
        assert device is not None
        assert (device.status_at_ms, device.seq) == (13, 2)


async def test_missing_devices_change_nothing_and_the_rest_commits(store: Store) -> None:
    """Ops on absent devices come back missing; the group's other ops are written."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        results = await store.write(
            [
                TelemetryWrite("ghost", [Record(1, {"t": 1})]),
                StatusWrite("ghost", "x", "api", 1),
                EventWrite("ghost", "device.connected", 1, {}),
                EventWrite("d1", "device.connected", 2, {}),
                StatusWrite("d1", "on", "api", 3),
            ]
        )
        assert [r.missing for r in results] == [True, True, True, False, False]
        assert [published(r) for r in results[:3]] == [[], [], []]
        assert [e.seq for r in results for e in published(r)] == [1, 2]
        assert await store.get_device("ghost") is None
        assert await store.events("ghost", 0, 10) == []
        assert await store.write([]) == []


async def test_concurrent_writers_share_one_counter(backend: Backend) -> None:
    """Two stores (as two processes) writing the same devices never reuse or skip a seq."""
    with anyio.fail_after(LIMIT_S):
        first, second = backend.make(), backend.make()
        await first.open()
        await second.open()
        try:
            await _devices(first, "d1", "d2")

            async def writer(store: Store, n: int) -> list[Event]:
                out: list[Event] = []
                for i in range(n):
                    results = await store.write(
                        [
                            TelemetryWrite("d2", [Record(i, {"v": i})]),
                            EventWrite("d1", "device.connected", i, {}),
                            TelemetryWrite("d1", [Record(i, {"v": i}), Record(i + 1, {"v": i})]),
                        ]
                    )
                    out += [e for r in results for e in published(r)]
                return out

            events = [
                e for chunk in await asyncio.gather(writer(first, 15), writer(second, 15)) for e in chunk
            ]
            assert sorted(e.seq for e in events if e.device_id == "d1") == list(range(1, 91))
            assert sorted(e.seq for e in events if e.device_id == "d2") == list(range(1, 31))
            assert [e.seq for e in await first.events("d1", 0, 1000)] == list(range(1, 91))
        finally:
            await first.close()
            await second.close()


async def test_events_merge_history_and_telemetry_in_seq_order(store: Store) -> None:
    """events() interleaves stored events and telemetry records by seq, paged by after/limit."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        written: list[Event] = []
        for group in (
            [EventWrite("d1", "device.connected", 1, {"session_id": "s"})],
            [TelemetryWrite("d1", [Record(5, {"a": 1, "b": "x"}), Record(6, {"a": 2})])],
            [StatusWrite("d1", "online", "device", 7)],
            [TelemetryWrite("d1", [Record(3, {"z": False})])],  # an older ts, a newer seq
            [EventWrite("d1", "device.disconnected", 9, {"reason": "closed"})],
        ):
            written += [e for r in await store.write(group) for e in published(r)]
        assert [e.seq for e in written] == [1, 2, 3, 4, 5, 6]
        assert await store.events("d1", 0, 100) == written
        assert await store.events("d1", 0, 3) == written[:3]
        assert await store.events("d1", 1, 2) == written[1:3]
        assert await store.events("d1", 3, 2) == written[3:5]
        assert await store.events("d1", 5, 10) == written[5:]
        assert await store.events("d1", 6, 10) == []
        assert await store.events("d1", 0, 0) == []
        assert await store.events("ghost", 0, 10) == []


async def test_telemetry_values_round_trip_exactly(store: Store) -> None:
    """Numbers, booleans and strings come back with their exact type and value."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        values: dict[str, float | int | bool | str] = {
            "f": 0.1,
            "f_int": 3.0,
            "f_big": 1e300,
            "f_neg": -2.5e-300,
            "i": 42,
            "i_neg": -7,
            "i_53": 2**53 + 1,
            "i_huge": 10**30,
            "i_zero": 0,
            "t": True,
            "fa": False,
            "s": "hé ✓",
            "s_empty": "",
            "s_num": "1.0",
        }
        [result] = await store.write([TelemetryWrite("d1", [Record(1000, values)])])
        [event] = await store.events("d1", 0, 10)
        assert event == published(result)[0]
        for key, value in event.data["values"].items():
            assert type(value) is type(values[key]), key
            assert value == values[key], key
        latest = await store.latest_telemetry("d1")
        assert {k: (type(p.value), p.value) for k, p in latest.items()} == {
            k: (type(v), v) for k, v in values.items()
        }


async def test_purge_drops_old_telemetry_and_keeps_recent_history(store: Store) -> None:
    """purge(before, history): telemetry with ts < before goes; `history` newest events stay."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2")
        await store.write(
            [EventWrite("d1", f"e{i}", i, {}) for i in range(6)] + [EventWrite("d2", "e", 0, {})]
        )
        await store.write(
            [
                TelemetryWrite("d1", [Record(100, {"a": 1}), Record(200, {"a": 2}), Record(300, {"a": 3})]),
                TelemetryWrite("d2", [Record(100, {"a": 1})]),
            ]
        )
        await store.purge(200, 2)
        d1 = await store.events("d1", 0, 100)
        assert [(e.seq, e.name) for e in d1] == [
            (5, "e4"),
            (6, "e5"),
            (8, "device.telemetry"),
            (9, "device.telemetry"),
        ]
        assert [e.seq for e in await store.events("d2", 0, 100)] == [1]
        points = await store.telemetry("d1", key=None, from_ms=None, to_ms=None, limit=10)
        assert [p.ts_ms for p in points] == [300, 200]
        device = await store.get_device("d1")
        assert device is not None
        assert device.seq == 9  # purging never rewinds the counter
        await store.purge(10**12, 0)
        assert await store.events("d1", 0, 100) == []


async def test_write_keeps_history_bounded_between_purges(backend: Backend) -> None:
    """With history=16, write trims a device's events back to the newest 16 whenever its seq
    crosses a multiple of trim_step(16) = 2, so between trims a device holds at most 17."""
    with anyio.fail_after(LIMIT_S):
        assert trim_step(16) == 2
        small = backend.make(history=16)
        await small.open()
        try:
            await _devices(small, "d1")
            for i in range(41):
                await small.write([EventWrite("d1", "e", i, {"i": i})])
            # Trimmed at seq 40, then one more: 17 events.
            assert [e.seq for e in await small.events("d1", 0, 100)] == list(range(25, 42))
            # One group crossing 42, 44 and 46: trimmed once, at its end.
            await small.write([EventWrite("d1", "e", i, {"i": i}) for i in range(5)])
            assert [e.seq for e in await small.events("d1", 0, 100)] == list(range(31, 47))
        finally:
            await small.close()


# -- telemetry queries ---------------------------------------------------------------------


async def _telemetry_fixture(store: Store) -> list[TelemetryPoint]:
    """Records with repeated and out-of-order timestamps; every point, newest first."""
    await _devices(store, "d1", "d2")
    records = [
        Record(1000, {"temp": 20.5, "hum": 40, "on": True}),
        Record(2000, {"temp": 21.0, "mode": "eco"}),
        Record(2000, {"temp": 21.5}),  # the same ts again: seq breaks the tie
        Record(1500, {"hum": 41, "Temp": 1.0}),  # an older ts after newer ones; `T` < `h` < `t`
        Record(3000, {"on": False}),
    ]
    await store.write([TelemetryWrite("d1", records), TelemetryWrite("d2", [Record(5000, {"temp": 0.0})])])
    points = [
        TelemetryPoint(key, record.ts_ms, seq, value)
        for seq, record in enumerate(records, start=1)
        for key, value in record.values.items()
    ]
    return sorted(points, key=lambda p: (p.ts_ms, p.seq, p.key), reverse=True)


async def test_telemetry_newest_first_with_ranges_and_keys(store: Store) -> None:
    """Order is (ts, seq, key) descending; from/to are inclusive; `key` narrows to one key."""
    with anyio.fail_after(LIMIT_S):
        everything = await _telemetry_fixture(store)

        async def query(**kw: object) -> list[TelemetryPoint]:
            args: dict[str, object] = {"key": None, "from_ms": None, "to_ms": None, "limit": 100}
            args.update(kw)
            return await store.telemetry("d1", **args)  # type: ignore[arg-type]

        assert await query() == everything
        assert await query(limit=3) == everything[:3]
        assert await query(key="temp") == [p for p in everything if p.key == "temp"]
        assert await query(key="hum", limit=1) == [TelemetryPoint("hum", 1500, 4, 41)]
        assert await query(from_ms=1500, to_ms=2000) == [p for p in everything if 1500 <= p.ts_ms <= 2000]
        assert await query(key="temp", from_ms=2000) == [
            TelemetryPoint("temp", 2000, 3, 21.5),
            TelemetryPoint("temp", 2000, 2, 21.0),
        ]
        assert await query(key="absent") == []
        assert await query(to_ms=999) == []
        assert await query(limit=0) == []
        assert await store.telemetry("ghost", key=None, from_ms=None, to_ms=None, limit=10) == []


async def test_telemetry_pages_with_before_cursor(store: Store) -> None:
    """Following `before` = the last point of each page yields every point exactly once."""
    with anyio.fail_after(LIMIT_S):
        everything = await _telemetry_fixture(store)
        for key in (None, "temp"):
            expected = [p for p in everything if key is None or p.key == key]
            for size in (1, 2, 3, 4):
                seen: list[TelemetryPoint] = []
                before: tuple[int, int, str] | None = None
                while True:
                    page = await store.telemetry(
                        "d1", key=key, from_ms=None, to_ms=None, limit=size, before=before
                    )
                    if not page:
                        break
                    seen += page
                    last = page[-1]
                    before = (last.ts_ms, last.seq, last.key)
                assert seen == expected, (key, size)


async def test_telemetry_merges_many_keys(store: Store) -> None:
    """More keys than one merged query holds (300 > 200) still come back in order."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        keys = [f"k{i:03d}" for i in range(300)]
        await store.write(
            [
                TelemetryWrite("d1", [Record(10, {k: i for i, k in enumerate(keys[:150])})]),
                TelemetryWrite("d1", [Record(5, {k: i for i, k in enumerate(keys[150:])})]),
            ]
        )
        points = await store.telemetry("d1", key=None, from_ms=None, to_ms=None, limit=1000)
        assert [(p.ts_ms, p.key) for p in points] == [(10, k) for k in reversed(keys[:150])] + [
            (5, k) for k in reversed(keys[150:])
        ]
        page = await store.telemetry(
            "d1", key=None, from_ms=None, to_ms=None, limit=2, before=(10, 1, "k001")
        )
        assert [(p.ts_ms, p.key) for p in page] == [(10, "k000"), (5, "k299")]
        assert len(await store.latest_telemetry("d1")) == 300


async def test_latest_telemetry_is_newest_ts_per_key(store: Store) -> None:
    """The latest value of each key is the one with the greatest (ts, seq), not the last written."""
    with anyio.fail_after(LIMIT_S):
        await _telemetry_fixture(store)
        assert await store.latest_telemetry("d1") == {
            "temp": TelemetryPoint("temp", 2000, 3, 21.5),
            "hum": TelemetryPoint("hum", 1500, 4, 41),
            "on": TelemetryPoint("on", 3000, 5, False),
            "mode": TelemetryPoint("mode", 2000, 2, "eco"),
            "Temp": TelemetryPoint("Temp", 1500, 4, 1.0),
        }
        assert await store.latest_telemetry("d2") == {"temp": TelemetryPoint("temp", 5000, 1, 0.0)}
        assert await store.latest_telemetry("ghost") == {}


async def test_latest_telemetry_of_batches_in_time_order(store: Store) -> None:
    """Batches whose records come in time order (SqlStore finds each key's newest walking
    back): a key's newest is its last record, a tie goes to the later record, a key seen only
    early still counts, and a later batch of the group with older points loses to an earlier
    one's newer points, per key; a batch out of time order is judged record by record."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        await store.write(
            [
                TelemetryWrite(
                    "d1",
                    [
                        Record(1000, {"a": 1, "b": 1}),
                        Record(2000, {"a": 2}),
                        Record(2000, {"a": 3, "c": 1}),
                        Record(3000, {"b": 2}),
                    ],
                ),
                TelemetryWrite("d1", [Record(1500, {"a": 9, "c": 9, "d": 1}), Record(2500, {"c": 8})]),
            ]
        )
        assert await store.latest_telemetry("d1") == {
            "a": TelemetryPoint("a", 2000, 3, 3),
            "b": TelemetryPoint("b", 3000, 4, 2),
            "c": TelemetryPoint("c", 2500, 6, 8),
            "d": TelemetryPoint("d", 1500, 5, 1),
        }
        # And one batch out of time order: its newest point is not its last.
        await store.write(
            [TelemetryWrite("d1", [Record(2000, {"a": 7}), Record(5000, {"e": 1}), Record(4000, {"e": 2})])]
        )
        latest = await store.latest_telemetry("d1")
        assert (latest["a"], latest["e"]) == (TelemetryPoint("a", 2000, 7, 7), TelemetryPoint("e", 5000, 8, 1))


# -- commands ------------------------------------------------------------------------------


async def test_error_text_carries_no_sql_parameters(url: str) -> None:
    """A database error on a value never quotes the value (nor does the error it chains)."""
    with anyio.fail_after(LIMIT_S):
        store = SqlStore(url)
        await store.open()
        try:
            with pytest.raises(LookupError) as refused:
                await store.create_command(_command("c1", device_id="ghost", params={"pin": "hunter2"}))
        finally:
            await store.close()
        cause = refused.value.__cause__
        assert isinstance(cause, sqlite3.IntegrityError | asyncpg.ForeignKeyViolationError)
        assert "hunter2" not in f"{refused.value} {cause} {cause.args}"


async def test_create_and_get_command(store: Store) -> None:
    """A command round-trips every field; a duplicate id or an absent device is refused."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        command = _command(
            "c1",
            params={"n": 1, "f": 0.5, "b": True, "s": "x", "l": [1, None]},
            issuer_node="node-1",
            issuer_session="sess-1",
            idempotency_key="k1",
            timeout_s=30,
            extra={"queue": True},
        )
        assert await store.create_command(command) == command
        assert await store.get_command("c1") == command
        assert await store.get_command("absent") is None
        with pytest.raises(DuplicateError):
            await store.create_command(_command("c1"))
        with pytest.raises(LookupError):
            await store.create_command(_command("c2", device_id="ghost"))


async def test_find_command_by_idempotency_key(store: Store) -> None:
    """The newest command of the issuer with the key, issued at or after since_ms."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        await store.create_command(_command("c1", idempotency_key="k", issued_at_ms=1000))
        await store.create_command(_command("c2", idempotency_key="k", issued_at_ms=2000))
        await store.create_command(_command("c3", idempotency_key="k", issued_at_ms=3000, issuer="bob"))
        await store.create_command(_command("c4", idempotency_key="other", issued_at_ms=4000))
        found = await store.find_command("alice", "k", 0)
        assert found is not None
        assert found.id == "c2"
        found = await store.find_command("alice", "k", 2000)
        assert found is not None
        assert found.id == "c2"
        assert await store.find_command("alice", "k", 2001) is None
        assert await store.find_command("carol", "k", 0) is None


async def test_transition_command_is_compare_and_set(store: Store) -> None:
    """Only ALLOWED_FROM transitions succeed; they set sent_at / completed_at, result, error."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        for command_id in ("ok", "fail", "late", "never"):
            await store.create_command(_command(command_id))
        assert await store.transition_command("ok", CommandState.SUCCEEDED, 5) is None  # not sent yet
        assert await store.transition_command("ok", CommandState.PENDING, 5) is None
        sent = await store.transition_command("ok", CommandState.SENT, 2000)
        assert sent is not None
        assert (sent.state, sent.sent_at_ms, sent.completed_at_ms) == (CommandState.SENT, 2000, None)
        assert await store.transition_command("ok", CommandState.SENT, 2001) is None
        assert await store.transition_command("ok", CommandState.EXPIRED, 2001) is None
        done = await store.transition_command("ok", CommandState.SUCCEEDED, 3000, result={"v": 1.5})
        assert done is not None
        assert (done.state, done.sent_at_ms, done.completed_at_ms, done.result, done.error) == (
            CommandState.SUCCEEDED,
            2000,
            3000,
            {"v": 1.5},
            None,
        )
        assert await store.get_command("ok") == done
        assert await store.transition_command("ok", CommandState.FAILED, 4000) is None

        await store.transition_command("fail", CommandState.SENT, 2000)
        failed = await store.transition_command(
            "fail", CommandState.FAILED, 2500, error={"code": "busy", "message": "try later"}
        )
        assert failed is not None
        assert (failed.state, failed.error) == (CommandState.FAILED, {"code": "busy", "message": "try later"})

        await store.transition_command("late", CommandState.SENT, 2000)
        timed_out = await store.transition_command("late", CommandState.TIMED_OUT, 31_000)
        assert timed_out is not None
        assert (timed_out.state, timed_out.completed_at_ms) == (CommandState.TIMED_OUT, 31_000)

        expired = await store.transition_command("never", CommandState.EXPIRED, 31_000)
        assert expired is not None
        assert (expired.state, expired.sent_at_ms, expired.completed_at_ms) == (
            CommandState.EXPIRED,
            None,
            31_000,
        )
        assert await store.transition_command("absent", CommandState.SENT, 1) is None


async def test_racing_transitions_have_exactly_one_winner(backend: Backend) -> None:
    """Two nodes (two stores) racing pending→sent or sent→final: exactly one succeeds each time."""
    with anyio.fail_after(LIMIT_S):
        first, second = backend.make(), backend.make()
        await first.open()
        await second.open()
        try:
            await _devices(first, "d1")
            for i in range(10):
                await first.create_command(_command(f"c{i}"))
                winners = await asyncio.gather(
                    first.transition_command(f"c{i}", CommandState.SENT, 2000),
                    second.transition_command(f"c{i}", CommandState.SENT, 2001),
                )
                assert sum(w is not None for w in winners) == 1
                finals = await asyncio.gather(
                    first.transition_command(f"c{i}", CommandState.SUCCEEDED, 3000),
                    second.transition_command(f"c{i}", CommandState.TIMED_OUT, 3000),
                )
                assert sum(f is not None for f in finals) == 1
                stored = await first.get_command(f"c{i}")
                assert stored is not None
                assert stored == next(f for f in finals if f is not None)
        finally:
            await first.close()
            await second.close()


async def test_pending_list_and_due_commands(store: Store) -> None:
    """pending: unexpired pending, oldest first; list: newest first, paged; due: expiry order."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2")
        specs = [  # (id, device, issued, expires)
            ("000001a", "d1", 1000, 11_000),
            ("000002b", "d1", 2000, 5_000),
            ("000003c", "d1", 3000, 13_000),
            ("000004d", "d2", 4000, 4_500),
            ("000005e", "d1", 5000, 15_000),
        ]
        for command_id, device_id, issued, expires in specs:
            await store.create_command(
                _command(command_id, device_id=device_id, issued_at_ms=issued, expires_at_ms=expires)
            )
        await store.transition_command("000003c", CommandState.SENT, 3500)
        await store.transition_command("000005e", CommandState.SENT, 5500)
        await store.transition_command("000005e", CommandState.SUCCEEDED, 5600)

        async def ids(commands: list[Command]) -> list[str]:
            return [c.id for c in commands]

        assert await ids(await store.pending_commands("d1", 4000)) == ["000001a", "000002b"]
        assert await ids(await store.pending_commands("d1", 5000)) == ["000001a"]  # expires_at is exclusive
        assert await ids(await store.pending_commands("d2", 4000)) == ["000004d"]

        assert await ids(await store.list_commands("d1", None, 10)) == [
            "000005e",
            "000003c",
            "000002b",
            "000001a",
        ]
        assert await ids(await store.list_commands("d1", None, 2)) == ["000005e", "000003c"]
        assert await ids(await store.list_commands("d1", None, 2, "000003c")) == ["000002b", "000001a"]
        assert await ids(await store.list_commands("d1", CommandState.PENDING, 10)) == ["000002b", "000001a"]
        assert await ids(await store.list_commands("d1", CommandState.SENT, 10, "000003c")) == []

        assert await ids(await store.due_commands(4000, 10)) == []
        assert await ids(await store.due_commands(5000, 10)) == ["000004d", "000002b"]
        assert await ids(await store.due_commands(20_000, 10)) == ["000004d", "000002b", "000001a", "000003c"]
        assert await ids(await store.due_commands(20_000, 1)) == ["000004d"]


async def test_purge_drops_final_commands_completed_before_the_cutoff(store: Store) -> None:
    """Issue 13.17: final commands completed before the cutoff go; later ones, pending and
    sent ones (however old) stay."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        for command_id in ("old-done", "new-done", "old-pending", "old-sent"):
            await store.create_command(_command(command_id, issued_at_ms=10, expires_at_ms=10**12))
        await store.transition_command("old-done", CommandState.EXPIRED, 100)
        await store.transition_command("new-done", CommandState.EXPIRED, 300)
        await store.transition_command("old-sent", CommandState.SENT, 100)
        await store.purge(200, 10)
        kept = await store.list_commands("d1", None, 10)
        assert sorted(c.id for c in kept) == ["new-done", "old-pending", "old-sent"]


async def test_a_purged_command_leaves_its_job_execution_its_outcome(store: Store) -> None:
    """Retention takes a job's final command (and its result); the execution keeps the
    command's final state, error and time: it neither reads `canceled` nor counts as it. A
    command still in flight, and an execution whose command is younger, are untouched."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2", "d3")
        await store.write([CreateJob(_job(), [("d1", "c1"), ("d2", "c2"), ("d3", "c3")])])
        sent = [_command(f"c{i}", f"d{i}", state=CommandState.SENT, sent_at_ms=100, job_id="j1") for i in (1, 2)]
        await store.write(
            [
                DispatchExecution("j1", 0, 100, command=sent[0]),
                DispatchExecution("j1", 1, 100, command=sent[1]),
                DispatchExecution("j1", 2, 100, command=_command("c3", "d3", job_id="j1")),
            ]
        )
        await store.write(
            [
                TransitionCommand("d1", "c1", CommandState.FAILED, 150, error={"code": "x"}),
                TransitionCommand("d2", "c2", CommandState.SUCCEEDED, 300, result={"ok": True}),
            ]
        )
        await store.purge(200, 10)
        assert await store.get_command("c1") is None
        executions = await store.job_executions("j1", None, 10)
        assert [(e.state, e.error, e.result, e.updated_at_ms) for e in executions] == [
            (ExecutionState.FAILED, {"code": "x"}, None, 150),
            (ExecutionState.SUCCEEDED, None, {"ok": True}, 300),
            (ExecutionState.PENDING, None, None, 100),
        ]
        assert await store.job_counts(["j1"]) == {"j1": {"failed": 1, "succeeded": 1, "queued": 1}}
        assert await store.job_progress("j1") == (0, 1)


async def test_devices_with_pending_lists_devices_with_unexpired_pending_commands(store: Store) -> None:
    """One query for the pending index: devices with a pending command not yet expired."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2", "d3")
        await store.create_command(_command("c1", "d1", expires_at_ms=5000))
        await store.create_command(_command("c2", "d2", expires_at_ms=1500))
        await store.create_command(_command("c3", "d3", state=CommandState.SENT, expires_at_ms=5000))
        assert await store.devices_with_pending(1000) == {"d1", "d2"}
        assert await store.devices_with_pending(2000) == {"d1"}


async def test_command_ops_store_the_command_and_its_event_in_one_group(store: Store) -> None:
    """CreateCommand inserts the command and records its first `command.updated` (its state)
    with the device's next seq; TransitionCommand moves it compare-and-set and records the
    event, or changes nothing (no event, command None) when the move is not allowed; a
    command for a missing device is `missing`. All in one group with other ops."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        created, status, missing = await store.write(
            [
                CreateCommand(_command("c1")),
                StatusWrite("d1", "busy", "device", 1100),
                CreateCommand(_command("c2", "nope")),
            ]
        )
        assert created.command is not None
        assert created.command.state is CommandState.PENDING
        assert [(e.seq, e.name, e.data["state"]) for e in published(created)] == [
            (1, "command.updated", "pending")
        ]
        assert [e.seq for e in published(status)] == [2]
        assert (missing.missing, published(missing), missing.command) == (True, [], None)
        sent, succeeded, late = await store.write(
            [
                TransitionCommand("d1", "c1", CommandState.SENT, 1200),
                TransitionCommand("d1", "c1", CommandState.SUCCEEDED, 1300, result={"ok": 1}),
                TransitionCommand("d1", "c1", CommandState.TIMED_OUT, 1400),
            ]
        )
        assert [(e.seq, e.data["state"]) for e in published(sent) + published(succeeded)] == [
            (3, "sent"),
            (4, "succeeded"),
        ]
        assert (late.command, published(late)) == (None, [])
        stored = await store.get_command("c1")
        assert stored is not None
        assert (stored.state, stored.result, stored.completed_at_ms) == (
            CommandState.SUCCEEDED,
            {"ok": 1},
            1300,
        )
        assert await store.get_command("c2") is None
        history = await store.events("d1", 0, 10)
        assert [e.name for e in history] == [
            "command.updated",
            "device.status",
            "command.updated",
            "command.updated",
        ]


async def test_creates_in_one_group_see_the_devices_the_group_deleted_and_registered(store: Store) -> None:
    """Each create of a group finds its device as the ops before it in the group left it
    (SqlStore reads the devices of several creates once, and again after a registry op): a
    device deleted earlier in the group is missing, one registered earlier exists."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2")
        results = await store.write(
            [
                CreateCommand(_command("c1", "ghost")),
                CreateCommand(_command("c2", "ghost")),
                DeleteDevice("d2", 1400),
                CreateCommand(_command("c3", "d2")),
                RegisterDevice(Device("ghost"), 1500),
                CreateCommand(_command("c4", "ghost")),
                CreateCommand(_command("c5", "d1")),
            ]
        )
        assert [(r.command.id if r.command else None, r.missing) for r in results] == [
            (None, True),
            (None, True),
            (None, False),  # the delete
            (None, True),
            (None, False),  # the registration
            ("c4", False),
            ("c5", False),
        ]
        kept = {c: await store.get_command(c) is not None for c in ("c1", "c2", "c3", "c4", "c5")}
        assert kept == {"c1": False, "c2": False, "c3": False, "c4": True, "c5": True}
        assert [e.seq for e in published(results[5])] == [2]  # after its device.registered (1)


async def test_a_group_of_many_transitions_moves_each_as_if_alone(store: Store) -> None:
    """Transitions of different commands in one group (SqlStore runs them as one statement)
    each move or not exactly as alone: allowed moves take their state, time, result or error
    and their event at their place in the group's seqs; a move not allowed, another device's
    command and an unknown id change nothing. A create and a move of it in the same group
    run in that order."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2")
        sent = {"state": CommandState.SENT, "sent_at_ms": 1500}
        await store.write(
            [
                CreateCommand(_command("c1", **sent)),
                CreateCommand(_command("c2", **sent)),
                CreateCommand(_command("c3", "d2")),
                CreateCommand(_command("c4", "d2", **sent)),
                CreateCommand(_command("c5", "d2", **sent)),
            ]
        )
        results = await store.write(
            [
                TransitionCommand("d1", "c1", CommandState.SUCCEEDED, 2000, result={"n": 1}),
                TransitionCommand("d2", "c3", CommandState.SENT, 2010),
                StatusWrite("d1", "busy", "device", 2015),
                TransitionCommand("d1", "c2", CommandState.FAILED, 2020, error={"code": "e", "message": "m"}),
                TransitionCommand("d2", "c4", CommandState.EXPIRED, 2030),  # sent: cannot expire
                TransitionCommand("d1", "c5", CommandState.SUCCEEDED, 2040),  # d2's command
                TransitionCommand("d1", "nope", CommandState.SUCCEEDED, 2050),
                CreateCommand(_command("c6", issued_at_ms=2060)),
                TransitionCommand("d1", "c6", CommandState.SENT, 2070),
            ]
        )
        moved = [(r.command.id, r.command.state.value) if r.command else None for r in results]
        assert moved == [
            ("c1", "succeeded"),
            ("c3", "sent"),
            None,
            ("c2", "failed"),
            None,
            None,
            None,
            ("c6", "pending"),
            ("c6", "sent"),
        ]
        events = [(e.device_id, e.seq, e.name, e.data.get("state")) for r in results for e in published(r)]
        assert events == [
            ("d1", 3, "command.updated", "succeeded"),
            ("d2", 4, "command.updated", "sent"),
            ("d1", 4, "device.status", None),
            ("d1", 5, "command.updated", "failed"),
            ("d1", 6, "command.updated", "pending"),
            ("d1", 7, "command.updated", "sent"),
        ]
        stored = {c: await store.get_command(c) for c in ("c1", "c2", "c3", "c4", "c5", "c6")}
        fields = {
            c: (x.state.value, x.sent_at_ms, x.completed_at_ms, x.result, x.error)
            for c, x in stored.items()
            if x is not None
        }
        assert fields == {
            "c1": ("succeeded", 1500, 2000, {"n": 1}, None),
            "c2": ("failed", 1500, 2020, None, {"code": "e", "message": "m"}),
            "c3": ("sent", 2010, None, None, None),
            "c4": ("sent", 1500, None, None, None),
            "c5": ("sent", 1500, None, None, None),
            "c6": ("sent", 2070, None, None, None),
        }
        assert [(e.seq, e.data.get("state")) for e in await store.events("d2", 3, 10)] == [(4, "sent")]


# -- jobs (contract §7) ----------------------------------------------------------------------


def _job(job_id: str = "j1", total: int = 3, **fields: object) -> Job:
    spec = JobSpec(name="reboot", params={"delay": 5}, timeout_s=30, patterns=("d*",), tags=("site-a",))
    values: dict[str, object] = {
        "id": job_id,
        "state": JobState.RUNNING,
        "spec": spec,
        "issuer": "alice",
        "created_at_ms": 1000,
        "updated_at_ms": 1000,
        "total": total,
        "claim": ("d*",),
    }
    values.update(fields)
    return Job(**values)  # type: ignore[arg-type]


async def test_a_job_and_its_executions_are_created_in_one_op(store: Store) -> None:
    """CreateJob stores the job (spec round trip) and one pending execution per device, in
    rollout order; counts and listings read them back; list_jobs is newest first, paged."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2", "d3")
        [created] = await store.write([CreateJob(_job(), [("d1", "c1"), ("d2", "c2"), ("d3", "c3")])])
        assert created.job == _job()
        assert await store.get_job("j1") == _job()
        assert await store.get_job("nope") is None
        assert await store.job_counts(["j1", "nope"]) == {"j1": {"pending": 3}, "nope": {}}
        assert await store.job_progress("j1") == (3, 0)
        executions = await store.job_executions("j1", None, 10)
        assert [(e.index, e.device_id, e.command_id, e.state) for e in executions] == [
            (0, "d1", "c1", ExecutionState.PENDING),
            (1, "d2", "c2", ExecutionState.PENDING),
            (2, "d3", "c3", ExecutionState.PENDING),
        ]
        assert [e.index for e in await store.job_executions("j1", None, 1, after=0)] == [1]
        assert [e.command_id for e in await store.next_executions("j1", 2)] == ["c1", "c2"]
        await store.write([CreateJob(_job("j2", total=0), [])])
        assert [j.id for j in await store.list_jobs(10)] == ["j2", "j1"]
        assert [j.id for j in await store.list_jobs(1, before="j2")] == ["j1"]


async def test_a_transition_moves_only_its_own_devices_command(store: Store) -> None:
    """TransitionCommand names the device: another device's command is not moved (no event,
    command None), so a device's result needs no read to prove the command is its own."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2")
        await store.write([CreateCommand(_command("c1", state=CommandState.SENT))])
        (foreign,) = await store.write([TransitionCommand("d2", "c1", CommandState.SUCCEEDED, 1300)])
        assert (foreign.command, published(foreign)) == (None, [])
        stored = await store.get_command("c1")
        assert stored is not None
        assert stored.state is CommandState.SENT
        (own,) = await store.write([TransitionCommand("d1", "c1", CommandState.SUCCEEDED, 1400)])
        assert own.command is not None
        assert own.command.state is CommandState.SUCCEEDED
        assert [e.name for e in await store.events("d2", 0, 10)] == []


async def test_dispatch_is_a_compare_and_set_with_its_command_and_event(store: Store) -> None:
    """DispatchExecution moves a pending execution once: with a command it inserts the
    command (job_id in its `command.updated`), without one it skips; a second dispatch of the
    same execution writes nothing, and the execution's state follows its command after."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2", "d3")
        await store.write([CreateJob(_job(), [("d1", "c1"), ("d2", "c2"), ("d3", "c3")])])
        sent = _command("c1", state=CommandState.SENT, sent_at_ms=1000, job_id="j1")
        queued = _command("c3", "d3", job_id="j1")
        skip_error = {"code": "device_offline", "message": "offline"}
        first, skipped, again, third = await store.write(
            [
                DispatchExecution("j1", 0, 1000, command=sent),
                DispatchExecution("j1", 1, 1000, error=skip_error),
                DispatchExecution("j1", 0, 1001, command=replace(sent, id="other")),
                DispatchExecution("j1", 2, 1000, command=queued),
            ]
        )
        assert (first.applied, first.command) == (True, sent)
        assert [(e.name, e.data["job_id"], e.data["state"]) for e in published(first)] == [
            ("command.updated", "j1", "sent")
        ]
        assert (skipped.applied, skipped.command, published(skipped)) == (True, None, [])
        assert (again.applied, again.command, published(again)) == (False, None, [])
        assert await store.get_command("other") is None
        assert third.applied
        assert await store.next_executions("j1", 10) == []
        assert await store.job_counts(["j1"]) == {"j1": {"sent": 1, "skipped": 1, "queued": 1}}
        assert await store.job_progress("j1") == (0, 2)
        await store.write([TransitionCommand("d1", "c1", CommandState.FAILED, 2000, error={"code": "x"})])
        executions = await store.job_executions("j1", None, 10)
        assert [(e.state, e.error, e.updated_at_ms) for e in executions] == [
            (ExecutionState.FAILED, {"code": "x"}, 2000),
            (ExecutionState.SKIPPED, skip_error, 1000),
            (ExecutionState.PENDING, None, 1000),
        ]
        assert [e.device_id for e in await store.job_executions("j1", ExecutionState.PENDING, 10)] == ["d3"]
        assert (await store.get_command("c1")) == replace(
            sent, state=CommandState.FAILED, completed_at_ms=2000, error={"code": "x"}
        )


async def test_dispatch_to_a_deleted_device_cancels_the_execution(store: Store) -> None:
    """A device deleted after the job was made: its execution ends canceled (missing), no
    command is written; a deleted dispatched command counts as canceled."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2")
        await store.write([CreateJob(_job(total=2), [("d1", "c1"), ("d2", "c2")])])
        await store.write([DispatchExecution("j1", 0, 1000, command=_command("c1", job_id="j1"))])
        await store.delete_device("d1")
        await store.delete_device("d2")
        [gone] = await store.write(
            [DispatchExecution("j1", 1, 1100, command=_command("c2", "d2", job_id="j1"))]
        )
        assert (gone.applied, gone.missing, gone.command) == (True, True, None)
        assert await store.job_counts(["j1"]) == {"j1": {"canceled": 2}}


async def test_job_state_is_a_compare_and_set_and_cancel_ends_pending_executions(store: Store) -> None:
    """SetJobState moves only from the allowed states; canceled and aborted end every
    execution still pending `canceled` in the same op, dispatched ones keep their command."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2", "d3")
        await store.write([CreateJob(_job(), [("d1", "c1"), ("d2", "c2"), ("d3", "c3")])])
        await store.write([DispatchExecution("j1", 0, 1000, command=_command("c1", job_id="j1"))])
        running = frozenset({JobState.RUNNING})
        paused, refused = await store.write(
            [
                SetJobState("j1", JobState.PAUSED, running, 1500),
                SetJobState("j1", JobState.PAUSED, running, 1600),
            ]
        )
        assert paused.job == _job(state=JobState.PAUSED, updated_at_ms=1500)
        assert refused.job is None
        [held] = await store.write(
            [DispatchExecution("j1", 1, 1700, command=_command("c2", "d2", job_id="j1"))]
        )
        assert (held.applied, held.command) == (False, None)  # paused: nothing leaves
        from_either = frozenset({JobState.RUNNING, JobState.PAUSED})
        [canceled] = await store.write([SetJobState("j1", JobState.CANCELED, from_either, 2000)])
        assert canceled.job == _job(state=JobState.CANCELED, updated_at_ms=2000, finished_at_ms=2000)
        assert await store.get_job("j1") == canceled.job
        assert await store.job_counts(["j1"]) == {"j1": {"queued": 1, "canceled": 2}}
        assert await store.job_progress("j1") == (0, 1)
        [late] = await store.write(
            [DispatchExecution("j1", 1, 2100, command=_command("c2", "d2", job_id="j1"))]
        )
        assert not late.applied


async def test_job_leases_are_held_by_one_node_until_they_run_out(store: Store, backend: Backend) -> None:
    """take_job_lease succeeds for the holder or after the lease ran out; release frees it;
    orphan_jobs lists the running or paused jobs nobody holds; a final job has no lease."""
    with anyio.fail_after(LIMIT_S):
        await store.write([CreateJob(_job("j1", total=0), []), CreateJob(_job("j2", total=0), [])])
        assert await store.orphan_jobs(1000, 10) == ["j1", "j2"]
        assert await store.take_job_lease("j1", "a", 1000, 5000)
        other = backend.make()
        await other.open()
        try:
            assert not await other.take_job_lease("j1", "b", 4999, 9000)
            assert await store.take_job_lease("j1", "a", 4000, 8000)  # renewal
            assert await other.orphan_jobs(7999, 10) == ["j2"]
            assert await other.orphan_jobs(8000, 10) == ["j1", "j2"]
            assert await other.take_job_lease("j1", "b", 8000, 12_000)
            await store.release_job_lease("j1", "a")  # not the holder: nothing changes
            assert not await store.take_job_lease("j1", "a", 9000, 13_000)
            await other.release_job_lease("j1", "b")
            assert await store.take_job_lease("j1", "a", 9000, 13_000)
            done = frozenset({JobState.RUNNING})
            await store.write([SetJobState("j2", JobState.COMPLETED, done, 9000)])
            assert await other.orphan_jobs(20_000, 10) == ["j1"]
            assert not await other.take_job_lease("j2", "b", 20_000, 30_000)
        finally:
            await other.close()


# -- twins (contract §6) --------------------------------------------------------------------


async def test_a_twin_is_created_and_deleted_with_its_device(store: Store) -> None:
    """RegisterDevice and create_device give the device its empty twin at version 1; a
    device that does not exist has none; deleting the device deletes its twin, and a device
    registered again under that id starts with an empty twin."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        await store.write([RegisterDevice(Device("d2"), 1000)])
        assert await store.twin("d1") == Twin.empty("d1")
        assert await store.twin("d2") == Twin.empty("d2")
        assert await store.twin("nope") is None
        await store.write([PatchTwin("d2", Section.DESIRED, {"a": 1}, 2000)])
        await store.write([DeleteDevice("d2", 3000)])
        assert await store.twin("d2") is None
        await store.write([RegisterDevice(Device("d2"), 4000)])
        assert await store.twin("d2") == Twin.empty("d2")
        await store.write([PatchTwin("d1", Section.REPORTED, {"a": 1}, 2000)])
        await store.delete_device("d1")
        assert await store.twin("d1") is None


async def test_patch_twin_merges_and_records_its_event_in_the_same_group(store: Store) -> None:
    """A PatchTwin merges (RFC 7396: nested objects merge, null deletes, arrays replace),
    bumps the version by one, stamps changed leaves in metadata, and records `twin.updated`
    with the device's next seq among the other ops of its group; it reaches the history."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        first, status, second = await store.write(
            [
                PatchTwin("d1", Section.DESIRED, {"led": {"on": True, "rgb": [1, 2, 3]}, "fan": 2}, 1000),
                StatusWrite("d1", "busy", "device", 1100),
                PatchTwin("d1", Section.DESIRED, {"led": {"rgb": [9], "on": None}, "fan": None}, 1200),
            ]
        )
        assert (first.changed, first.refused) == (True, None)
        assert [(e.seq, e.name) for e in published(first) + published(status) + published(second)] == [
            (1, "twin.updated"),
            (2, "device.status"),
            (3, "twin.updated"),
        ]
        assert published(first)[0].data == {
            "version": 2,
            "desired": {"led": {"on": True, "rgb": [1, 2, 3]}, "fan": 2},
            "delta": {"led": {"on": True, "rgb": [1, 2, 3]}, "fan": 2},
        }
        assert published(second)[0].data == {
            "version": 3,
            "desired": {"led": {"rgb": [9], "on": None}, "fan": None},
            "delta": {"led": {"rgb": [9]}},
        }
        twin = await store.twin("d1")
        assert twin is not None
        assert twin == second.twin
        assert (twin.version, twin.desired, twin.reported) == (3, {"led": {"rgb": [9]}}, {})
        assert twin.metadata == {
            "desired": {"led": {"rgb": {"updated_at": format_ms(1200)}}},
            "reported": {},
        }
        (reported,) = await store.write(
            [PatchTwin("d1", Section.REPORTED, {"led": {"rgb": [9]}, "x": 1}, 1300)]
        )
        assert published(reported)[0].data == {
            "version": 4,
            "reported": {"led": {"rgb": [9]}, "x": 1},
            "delta": {},
        }
        history = await store.events("d1", 0, 10)
        assert [(e.seq, e.name, e.data["version"]) for e in history if e.name == "twin.updated"] == [
            (1, "twin.updated", 2),
            (3, "twin.updated", 3),
            (4, "twin.updated", 4),
        ]


async def test_patch_twin_refusals_and_no_ops_change_nothing(store: Store) -> None:
    """An if_version that is not the current version is a conflict; a result over the size
    limit is too_large; a patch that changes nothing is no change: each leaves the twin,
    its version and the device's seq as they were, and records no event. A missing device
    is `missing`. The rest of the group still commits."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1")
        (base,) = await store.write([PatchTwin("d1", Section.DESIRED, {"a": 1}, 1000)])
        assert base.twin is not None
        assert base.twin.version == 2
        conflict, too_big, same, missing, ok = await store.write(
            [
                PatchTwin("d1", Section.DESIRED, {"a": 2}, 1100, if_version=1),
                PatchTwin("d1", Section.DESIRED, {"b": "x" * 100}, 1100, limits=TwinLimits(max_bytes=64)),
                PatchTwin("d1", Section.DESIRED, {"a": 1.0, "gone": None}, 1100, if_version=2),
                PatchTwin("nope", Section.DESIRED, {"a": 1}, 1100),
                PatchTwin("d1", Section.REPORTED, {"a": 1}, 1200, if_version=2),
            ]
        )
        assert conflict.refused is not None
        assert conflict.refused.code is ErrorCode.CONFLICT
        assert too_big.refused is not None
        assert too_big.refused.code is ErrorCode.TOO_LARGE
        for refused in (conflict, too_big, same):
            assert (refused.changed, published(refused), refused.twin) == (False, [], base.twin)
        assert same.refused is None
        assert (missing.missing, published(missing), missing.twin) == (True, [], None)
        assert [(e.seq, e.data["version"]) for e in published(ok)] == [(2, 3)]
        twin = await store.twin("d1")
        assert twin is not None
        assert (twin.version, twin.desired, twin.reported, twin.delta) == (3, {"a": 1}, {"a": 1}, {})
        device = await store.get_device("d1")
        assert device is not None
        assert device.seq == 2


async def test_devices_with_delta_lists_twins_whose_delta_is_not_empty(store: Store) -> None:
    """One query for the index a connect reads instead of the twin: a device with desired
    leaves its reported lacks is listed; converged, empty or reported-only twins are not."""
    with anyio.fail_after(LIMIT_S):
        await _devices(store, "d1", "d2", "d3", "d4")
        await store.write(
            [
                PatchTwin("d1", Section.DESIRED, {"a": {"b": 1}}, 1000),
                PatchTwin("d2", Section.DESIRED, {"a": 1}, 1000),
                PatchTwin("d2", Section.REPORTED, {"a": 1.0, "x": 2}, 1000),
                PatchTwin("d3", Section.REPORTED, {"a": 1}, 1000),
            ]
        )
        assert await store.devices_with_delta() == {"d1"}


async def test_concurrent_twin_writers_lose_no_update(backend: Backend) -> None:
    """Two stores on one database (two nodes) each apply 15 patches to the same twin at
    once: every patch lands, versions are 2..31 without a repeat, and the final document
    holds every key (a read-modify-write race would lose some)."""
    stores = [backend.make(), backend.make()]
    with anyio.fail_after(LIMIT_S):
        for s in stores:
            await s.open()
        try:
            await _devices(stores[0], "d1")

            async def writer(index: int, s: Store) -> list[int]:
                versions = []
                for n in range(15):
                    (result,) = await s.write([PatchTwin("d1", Section.DESIRED, {f"k{index}_{n}": n}, 1000)])
                    assert result.twin is not None
                    assert result.changed
                    versions.append(result.twin.version)
                return versions

            done = await asyncio.gather(*(writer(i, s) for i, s in enumerate(stores)))
            assert sorted(done[0] + done[1]) == list(range(2, 32))
            twin = await stores[0].twin("d1")
            assert twin is not None
            assert twin.version == 31
            assert twin.desired == {f"k{i}_{n}": n for i in range(2) for n in range(15)}
        finally:
            for s in stores:
                await s.close()


async def test_migration_gives_every_existing_device_a_twin(url: str) -> None:
    """Upgrading a database made at revision 0001 adds the twins table with an empty twin
    (version 1) for every device that was there."""
    engine = create_async_engine(async_url(url))
    with anyio.fail_after(LIMIT_S):
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_upgrade_to("0001"))
                await conn.execute(
                    sa.text(
                        "INSERT INTO devices (id, tags, metadata, disabled, created_at, updated_at, seq)"
                        " VALUES ('old1', '[]', '{}', false, 1, 1, 5), ('old2', '[]', '{}', false, 1, 1, 0)"
                    )
                )
        finally:
            await engine.dispose()
        opened = SqlStore(url)
        await opened.open()
        try:
            assert await opened.twin("old1") == Twin.empty("old1")
            assert await opened.twin("old2") == Twin.empty("old2")
            (result,) = await opened.write([PatchTwin("old1", Section.DESIRED, {"a": 1}, 1000)])
            assert [(e.seq, e.data["version"]) for e in published(result)] == [(6, 2)]
        finally:
            await opened.close()
