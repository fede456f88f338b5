"""SqlStore: the Store seam on SQLite (the default) or PostgreSQL, one code path.

SQLAlchemy 2 async Core with aiosqlite / asyncpg. The hot path (`write`) uses a handful of
statements per *group* of operations, not per operation: one lock-and-read of the devices
(PostgreSQL always, to lock rows in id order so that concurrent nodes never deadlock;
SQLite only when the group has status writes), one UPDATE … RETURNING that hands out the
seq numbers of every device in the group, one bulk insert of events and one of telemetry
rows (executemany on SQLite, COPY on PostgreSQL for large groups).

Durability on SQLite: WAL with ``synchronous=FULL`` (the default here) fsyncs the WAL at every
commit, so an acked write survives power loss (contract §2.2: "an acked record is never
lost"). ``synchronous=NORMAL`` survives a process kill but may lose the last commits on power
loss; it can be chosen with ``sqlite:///path.db?synchronous=normal``. Write transactions are
``BEGIN IMMEDIATE`` (one writer at a time, no upgrade deadlocks between processes) and wait up
to ``busy_timeout`` ms (default 10000, ``?busy_timeout=`` in the URL) for the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import string
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, CursorResult, Row, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from fleetwire.domain.clock import format_ms, now_ms
from fleetwire.domain.commands import ALLOWED_FROM, Command, CommandState
from fleetwire.domain.devices import Device, DeviceChanges, DeviceFilter
from fleetwire.domain.errors import invalid
from fleetwire.domain.events import Event
from fleetwire.domain.telemetry import Value
from fleetwire.store.base import (
    DuplicateError,
    EventWrite,
    StatusWrite,
    StoreUnavailableError,
    TelemetryPoint,
    TelemetryWrite,
    WriteOp,
    WriteResult,
)
from fleetwire.store.schema import (
    KIND_BOOL,
    KIND_FLOAT,
    KIND_INT,
    KIND_STR,
    commands,
    devices,
    events,
    telemetry,
)

log = logging.getLogger(__name__)

_Row = Row[*tuple[Any, ...]]

MIGRATIONS_DIR: Final = Path(__file__).parent / "migrations"
# pg_advisory_xact_lock key serialising schema upgrades of processes starting together.
_MIGRATION_LOCK: Final = 0x666C_6565_7477_6972  # "fleetwir"
_SQLITE_OPTIONS: Final = ("synchronous", "busy_timeout")
_SYNCHRONOUS: Final = frozenset({"off", "normal", "full", "extra"})
_EXACT_INT: Final = 2**53  # beyond this a double loses integer digits
_TELEMETRY_COLUMNS: Final = ("device_id", "seq", "key", "ts", "kind", "num", "txt")
_EVENT_COLUMNS: Final = ("device_id", "seq", "name", "at", "data")
_MERGE_ARMS: Final = 200  # per-key scans in one UNION ALL (SQLite allows 500 compound arms)
_SQLITE_VALUES_ROWS: Final = 8000  # 4 parameters a row, under SQLite's 32766 limit
_PURGE_CHUNK: Final = 500
_CHANGEABLE: Final = frozenset({"name", "type", "tags", "metadata", "telemetry_schema", "disabled"})
_NOT_FINAL: Final = (CommandState.PENDING.value, CommandState.SENT.value)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def async_url(url: str) -> str:
    """`sqlite:///abs/path.db` / `postgresql://user@host:port/db` → the async driver's URL."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError("SQLite needs a database file: sqlite:///path/to/fleetwire.db")
        parsed = parsed.set(drivername="sqlite+aiosqlite").difference_update_query(_SQLITE_OPTIONS)
    elif backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(f"unsupported database URL scheme {parsed.drivername!r}: use sqlite or postgresql")
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str) -> AsyncEngine:
    """An async engine configured as fleetwire needs it (pragmas, JSON codec, transactions)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return create_async_engine(
        async_url(url),
        json_serializer=_dumps,
        json_deserializer=orjson.loads,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        connect_args={"timeout": 10},
    )


def _sqlite_options(url: str) -> tuple[str, int]:
    """(synchronous, busy_timeout ms) from fleetwire's own query options of a SQLite URL."""
    query = make_url(url).query
    synchronous = query.get("synchronous", "full")
    busy_timeout = query.get("busy_timeout", "10000")
    if not isinstance(synchronous, str) or synchronous.lower() not in _SYNCHRONOUS:
        raise ValueError("synchronous must be one of off, normal, full, extra")
    if not isinstance(busy_timeout, str) or not busy_timeout.isdigit():
        raise ValueError("busy_timeout must be a number of milliseconds")
    return synchronous.upper(), int(busy_timeout)


def _sqlite_engine(url: str) -> AsyncEngine:
    synchronous, busy_timeout = _sqlite_options(url)
    database = make_url(url).database
    assert database is not None  # async_url refuses URLs without a file
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(
        async_url(url),
        json_serializer=_dumps,
        json_deserializer=orjson.loads,
        pool_size=5,
        max_overflow=5,
        pool_use_lifo=True,
    )
    pragmas = (
        f"PRAGMA busy_timeout={busy_timeout}",  # first: the others may need the lock
        "PRAGMA journal_mode=WAL",
        f"PRAGMA synchronous={synchronous}",
        "PRAGMA foreign_keys=ON",
        "PRAGMA cache_size=-65536",  # 64 MiB: the index pages of a busy telemetry table
        # Checkpoint every ~40 MiB of WAL instead of 4 MiB: a busy device's index pages are
        # rewritten by most commits and are copied back once per checkpoint (2x ingest, measured).
        "PRAGMA wal_autocheckpoint=10000",
        "PRAGMA journal_size_limit=67108864",
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        # The driver must not BEGIN on its own: SQLAlchemy's "begin" event below does it,
        # so that DDL is transactional and writers can ask for BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in pragmas:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("fleetwire_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


async def lock_for_migrations(conn: AsyncConnection) -> None:
    """Serialise schema upgrades across processes (SQLite: BEGIN IMMEDIATE already does)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})


def _upgrade_to_head(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


# -- errors ------------------------------------------------------------------------------


def _is_unique_violation(exc: BaseException) -> bool:
    for candidate in (
        exc,
        getattr(exc, "orig", None),
        getattr(getattr(exc, "orig", None), "__cause__", None),
    ):
        if candidate is None:
            continue
        if getattr(candidate, "sqlstate", None) == "23505":  # PostgreSQL unique_violation
            return True
        name = getattr(candidate, "sqlite_errorname", "")
        if name in ("SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"):
            return True
    return False


# PostgreSQL: character_not_in_repertoire (NUL in text), untranslatable_character (in jsonb).
_NUL_REFUSED: Final = frozenset({"22021", "22P05"})


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (exc, orig, getattr(orig, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def _translate(exc: BaseException) -> BaseException | None:
    """The Store error for a driver/SQLAlchemy exception, or None to let it through."""
    if isinstance(
        exc, sa.exc.IntegrityError | sqlite3.IntegrityError | asyncpg.IntegrityConstraintViolationError
    ):
        return DuplicateError(str(getattr(exc, "orig", exc))) if _is_unique_violation(exc) else None
    if _sqlstate(exc) in _NUL_REFUSED:
        return invalid("text must not contain U+0000 (NUL)")
    if isinstance(exc, sa.exc.ProgrammingError | sa.exc.DataError | sa.exc.ArgumentError):
        return None  # a bug in a query or a value the domain should have refused
    if isinstance(
        exc,
        sa.exc.DBAPIError
        | sa.exc.TimeoutError
        | sqlite3.OperationalError
        | asyncpg.PostgresError
        | asyncpg.InterfaceError
        | OSError
        | TimeoutError,
    ):
        return StoreUnavailableError(f"{type(exc).__name__}: {exc}")
    return None


# -- rows <-> domain ---------------------------------------------------------------------


def _json(value: Any) -> Any:
    """JSON from a raw driver row (text on both drivers when SQLAlchemy types are bypassed)."""
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _device(row: _Row) -> Device:
    m = row._mapping
    return Device(
        id=m["id"],
        name=m["name"],
        type=m["type"],
        tags=tuple(m["tags"] or ()),
        metadata=m["metadata"] or {},
        status=m["status"],
        status_at_ms=m["status_at"],
        disabled=bool(m["disabled"]),
        telemetry_schema=m["telemetry_schema"],
        created_at_ms=m["created_at"],
        updated_at_ms=m["updated_at"],
        seq=m["seq"],
    )


def _command(row: _Row) -> Command:
    m = row._mapping
    return Command(
        id=m["id"],
        device_id=m["device_id"],
        name=m["name"],
        params=m["params"],
        state=CommandState(m["state"]),
        issued_at_ms=m["issued_at"],
        expires_at_ms=m["expires_at"],
        issuer=m["issuer"],
        issuer_node=m["issuer_node"],
        issuer_session=m["issuer_session"],
        idempotency_key=m["idempotency_key"],
        sent_at_ms=m["sent_at"],
        completed_at_ms=m["completed_at"],
        result=m["result"],
        error=m["error"],
        timeout_s=m["timeout_s"],
        extra=m["extra"] or {},
    )


def _pairs(result: CursorResult[*tuple[Any, ...]]) -> dict[Any, Any]:
    return {row[0]: row[1] for row in result}


def _value(kind: int, num: float | None, txt: str | None) -> Value:
    if kind == KIND_FLOAT:
        assert num is not None
        return float(num)
    if kind == KIND_INT:
        if txt is not None:
            return int(txt)
        assert num is not None
        return int(num)
    if kind == KIND_BOOL:
        return bool(num)
    assert txt is not None
    return txt


class _Timestamps:
    """format_ms with the seconds part cached: the same text, without a strftime per record.

    Records of one batch mostly share their second; format_ms costs ~4 µs a call, a third of
    the Python work per record on the ingest path (measured with py-spy).
    """

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, ms: int) -> str:
        second, millis = divmod(ms, 1000)
        if second != self._second:
            self._prefix = format_ms(second * 1000)[:-5]  # drop ".000Z"
            self._second = second
        return f"{self._prefix}.{millis:03d}Z"


def _telemetry_rows(
    device_id: str, seq: int, ts: int, values: dict[str, Value], out: list[tuple[Any, ...]]
) -> None:
    """Append one row per key, in _TELEMETRY_COLUMNS order (the ingest hot path)."""
    for key, value in values.items():
        kind = type(value)
        if kind is float:
            out.append((device_id, seq, key, ts, KIND_FLOAT, value, None))
        elif kind is int and -_EXACT_INT <= value <= _EXACT_INT:  # type: ignore[operator]
            out.append((device_id, seq, key, ts, KIND_INT, float(value), None))
        elif kind is bool:
            out.append((device_id, seq, key, ts, KIND_BOOL, 1.0 if value else 0.0, None))
        elif kind is str:
            out.append((device_id, seq, key, ts, KIND_STR, None, value))
        else:  # a big int: keep the exact digits; num is the nearest double (or NULL)
            try:
                approx: float | None = float(value)
            except OverflowError:
                approx = None
            out.append((device_id, seq, key, ts, KIND_INT, approx, str(value)))


# Characters of a device id (domain.devices.DEVICE_ID); bracket sets are resolved against them.
_ID_CHARS: Final = string.ascii_letters + string.digits + "_.:-"
_Token = tuple[str, str]  # ("*", ""), ("?", ""), ("lit", char), ("set", chars)


def _glob_tokens(pattern: str) -> list[_Token] | None:
    """A glob as tokens with fnmatchcase semantics; None if it can match no device id.

    A bracket set becomes the explicit id characters that fnmatchcase itself says it
    matches, so negation, ranges, reversed ranges and a literal `]` or `^` need no
    translation into either database's dialect.
    """
    tokens: list[_Token] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c in "*?":
            tokens.append((c, ""))
        elif c != "[":
            tokens.append(("lit", c))
        else:
            j = i + (1 if i < n and pattern[i] == "!" else 0)
            j += 1 if j < n and pattern[j] == "]" else 0
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                tokens.append(("lit", "["))  # fnmatch: an unclosed bracket is a literal
                continue
            bracket = pattern[i - 1 : j + 1]
            i = j + 1
            chars = "".join(ch for ch in _ID_CHARS if fnmatchcase(ch, bracket))
            if not chars:
                return None
            tokens.append(("set", chars))
    return tokens


def _glob_sqlite(pattern: str) -> str | None:
    """An fnmatchcase pattern as a SQLite GLOB (case-sensitive), None if it matches nothing."""
    tokens = _glob_tokens(pattern)
    if tokens is None:
        return None
    out: list[str] = []
    for kind, text in tokens:
        if kind in "*?":
            out.append(kind)
        elif kind == "lit":
            out.append("[" + text + "]" if text in "*?[" else text)
        else:  # `-` last is a literal in a GLOB set; `]` and `^` are not id characters
            out.append("[" + text.replace("-", "") + ("-" if "-" in text else "") + "]")
    return "".join(out)


def _glob_regex(pattern: str) -> str | None:
    """An fnmatchcase pattern as an anchored PostgreSQL regex, None if it matches nothing."""
    tokens = _glob_tokens(pattern)
    if tokens is None:
        return None

    def escape(text: str) -> str:  # in an ARE, backslash + non-alphanumeric is that character
        return "".join(ch if ch.isascii() and ch.isalnum() else "\\" + ch for ch in text)

    out = ["^"]
    for kind, text in tokens:
        if kind == "*":
            out.append(".*")
        elif kind == "?":
            out.append(".")
        elif kind == "lit":
            out.append(escape(text))
        else:
            out.append("[" + escape(text) + "]")
    out.append("$")
    return "".join(out)


def _has_wildcard(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


_KEYS_CTE: Final = (
    "WITH RECURSIVE keys(k) AS ("
    " SELECT MIN(key) FROM telemetry WHERE device_id = :d"
    " UNION ALL"
    " SELECT (SELECT MIN(t.key) FROM telemetry t WHERE t.device_id = :d AND t.key > keys.k)"
    " FROM keys WHERE keys.k IS NOT NULL)"
)
_KEYS: Final = sa.text(_KEYS_CTE + " SELECT k FROM keys").bindparams(sa.bindparam("d", type_=sa.Text))
_LATEST: Final = sa.text(
    _KEYS_CTE + " SELECT t.key, t.ts, t.seq, t.kind, t.num, t.txt FROM keys JOIN telemetry t"
    " ON t.device_id = :d AND t.key = keys.k AND t.seq = ("
    "  SELECT t2.seq FROM telemetry t2 WHERE t2.device_id = :d AND t2.key = keys.k"
    "  ORDER BY t2.ts DESC, t2.seq DESC LIMIT 1)"
).bindparams(sa.bindparam("d", type_=sa.Text))


# -- the store ---------------------------------------------------------------------------


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
        self._pg = make_url(url).get_backend_name() != "sqlite"
        if not self._pg:
            _sqlite_options(url)
        self._history = history
        self._engine: AsyncEngine | None = None
        self._writer: AsyncEngine | None = None
        self._snapshot: AsyncEngine | None = None
        self._sqlite_write_lock: contextlib.AbstractAsyncContextManager[Any] = contextlib.nullcontext()

    @property
    def dialect(self) -> str:
        return "postgresql" if self._pg else "sqlite"

    async def open(self) -> None:
        if self._engine is not None:
            return
        engine = create_engine(self._url)
        writer = engine.execution_options(fleetwire_write=True)
        try:
            async with writer.begin() as conn:
                await lock_for_migrations(conn)
                await conn.run_sync(_upgrade_to_head)
        except Exception as exc:
            await engine.dispose()
            translated = _translate(exc)
            if translated is None:
                raise
            raise translated from exc
        self._engine, self._writer = engine, writer
        self._sqlite_write_lock = contextlib.nullcontext() if self._pg else asyncio.Lock()
        # PostgreSQL reads of several statements that must agree (events()).
        self._snapshot = engine.execution_options(isolation_level="REPEATABLE READ") if self._pg else engine

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
            translated = _translate(exc)
            if translated is None:
                raise
            raise translated from exc

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction (SQLite: BEGIN IMMEDIATE), committed on leaving."""
        if self._writer is None:
            raise StoreUnavailableError("the store is closed")
        try:
            # SQLite has one writer at a time. Queue this process's writers here, in order,
            # instead of letting them contend for the file lock: SQLite's busy handler sleeps
            # and retries, which collapsed throughput under concurrent command writes.
            async with self._sqlite_write_lock, self._writer.begin() as conn:
                yield conn
        except Exception as exc:
            translated = _translate(exc)
            if translated is None:
                raise
            raise translated from exc

    def _ids_in(self, column: sa.ColumnElement[str], ids: Iterable[str]) -> sa.ColumnElement[bool]:
        """`column IN ids` as ONE parameter, so that any number of ids fits."""
        values = sorted(ids)
        if self._pg:
            return column == sa.any_(sa.bindparam(None, values, type_=postgresql.ARRAY(sa.Text)))
        each = sa.func.json_each(sa.bindparam(None, _dumps(values), type_=sa.Text)).table_valued("value")
        return column.in_(sa.select(each.c.value))

    # -- registry ------------------------------------------------------------------------

    async def create_device(self, device: Device) -> Device:
        now = now_ms()
        created = device.created_at_ms or now
        stored = Device(
            id=device.id,
            name=device.name,
            type=device.type,
            tags=tuple(device.tags),
            metadata=dict(device.metadata),
            status=device.status,
            status_at_ms=device.status_at_ms,
            disabled=device.disabled,
            telemetry_schema=device.telemetry_schema,
            created_at_ms=created,
            updated_at_ms=device.updated_at_ms or created,
            seq=device.seq,
        )
        async with self._write() as conn:
            await conn.execute(
                devices.insert().values(
                    id=stored.id,
                    name=stored.name,
                    type=stored.type,
                    tags=list(stored.tags),
                    metadata=stored.metadata,
                    status=stored.status,
                    status_at=stored.status_at_ms,
                    disabled=stored.disabled,
                    telemetry_schema=stored.telemetry_schema,
                    created_at=stored.created_at_ms,
                    updated_at=stored.updated_at_ms,
                    seq=stored.seq,
                )
            )
        return stored

    async def get_device(self, device_id: str) -> Device | None:
        async with self._read() as conn:
            row = (await conn.execute(devices.select().where(devices.c.id == device_id))).first()
        return None if row is None else _device(row)

    async def list_devices(self, where: DeviceFilter, limit: int, after: str | None = None) -> list[Device]:
        query = devices.select().order_by(devices.c.id).limit(limit)
        if after is not None:
            query = query.where(devices.c.id > after)
        if where.status is not None:
            query = query.where(devices.c.status == where.status)
        if where.type is not None:
            query = query.where(devices.c.type == where.type)
        if where.tag is not None:
            if self._pg:
                tag = sa.bindparam(None, _dumps([where.tag]), type_=sa.Text)
                query = query.where(
                    sa.cast(devices.c.tags, postgresql.JSONB).op("@>")(sa.cast(tag, postgresql.JSONB))
                )
            else:
                each = sa.func.json_each(devices.c.tags).table_valued("value")
                query = query.where(
                    sa.exists(sa.select(1).select_from(each).where(each.c.value == where.tag))
                )
        if where.only_ids is not None:
            if not where.only_ids:
                return []
            query = query.where(self._ids_in(devices.c.id, where.only_ids))
        if where.exclude_ids:
            query = query.where(sa.not_(self._ids_in(devices.c.id, where.exclude_ids)))
        if where.patterns is not None:
            if not where.patterns:
                return []
            matches: list[sa.ColumnElement[bool]] = []
            for pattern in where.patterns:
                if not _has_wildcard(pattern):
                    matches.append(devices.c.id == pattern)
                elif self._pg:
                    regex = _glob_regex(pattern)
                    if regex is not None:
                        matches.append(devices.c.id.op("~")(regex))
                else:
                    glob = _glob_sqlite(pattern)
                    if glob is not None:
                        matches.append(devices.c.id.op("GLOB")(glob))
            if not matches:
                return []
            query = query.where(sa.or_(*matches))
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [_device(row) for row in rows]

    async def update_device(self, device_id: str, changes: DeviceChanges) -> Device | None:
        unknown = changes.keys() - _CHANGEABLE
        if unknown:
            raise ValueError(f"not changeable through update_device: {sorted(unknown)}")
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "tags":
                values["tags"] = list(value)
            elif name == "disabled":
                values["disabled"] = bool(value)
            else:
                values[name] = value
        if not values:
            return await self.get_device(device_id)
        values["updated_at"] = now_ms()
        statement = devices.update().where(devices.c.id == device_id).values(values).returning(*devices.c)
        async with self._write() as conn:
            row = (await conn.execute(statement)).first()
        return None if row is None else _device(row)

    async def delete_device(self, device_id: str) -> Device | None:
        async with self._write() as conn:
            # The device row first: it waits for (and then excludes) writes in flight.
            row = (
                await conn.execute(devices.delete().where(devices.c.id == device_id).returning(*devices.c))
            ).first()
            if row is None:
                return None
            # Events and commands also cascade by foreign key; telemetry has none (see schema).
            await conn.execute(telemetry.delete().where(telemetry.c.device_id == device_id))
            await conn.execute(events.delete().where(events.c.device_id == device_id))
            await conn.execute(commands.delete().where(commands.c.device_id == device_id))
        return _device(row)

    # -- event log -----------------------------------------------------------------------

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        results = [WriteResult() for _ in ops]
        if not ops:
            return results
        # Events per device before status writes are judged; device order = first appearance.
        counts: dict[str, int] = {}
        status_devices: set[str] = set()
        for op in ops:
            if type(op) is TelemetryWrite:
                counts[op.device_id] = counts.get(op.device_id, 0) + len(op.records)
            elif type(op) is EventWrite:
                counts[op.device_id] = counts.get(op.device_id, 0) + 1
            else:
                counts.setdefault(op.device_id, 0)
                status_devices.add(op.device_id)

        async with self._write() as conn:
            # Status writes need the stored status; PostgreSQL also locks every row, in id
            # order, so that two nodes writing overlapping groups cannot deadlock.
            status_now: dict[str, str | None] = {}
            final_status: dict[str, tuple[str, int]] = {}
            if self._pg or status_devices:
                known = await self._lock_devices(conn, counts.keys() if self._pg else status_devices)
                for device_id in [d for d in counts if d not in known and (self._pg or d in status_devices)]:
                    del counts[device_id]  # missing: nothing of it is written
                status_now = {d: known[d] for d in status_devices if d in known}
                current = dict(status_now)
                for op in ops:
                    if (
                        type(op) is StatusWrite
                        and op.device_id in current
                        and current[op.device_id] != op.status
                    ):
                        counts[op.device_id] += 1
                        current[op.device_id] = op.status
                        final_status[op.device_id] = (op.status, op.at_ms)
            last = await self._advance(conn, counts, final_status) if counts else {}

            # Hand out seqs in op order and build the rows and events.
            next_seq = {d: last[d] - counts[d] for d in last}
            event_rows: list[tuple[Any, ...]] = []
            telemetry_rows: list[tuple[Any, ...]] = []
            stamp = _Timestamps()
            for op, result in zip(ops, results, strict=True):
                device_id = op.device_id
                seq = next_seq.get(device_id)
                if seq is None:
                    result.missing = True
                    continue
                if type(op) is TelemetryWrite:
                    out = result.events
                    for record in op.records:
                        seq += 1
                        ts, values = record.ts_ms, record.values
                        _telemetry_rows(device_id, seq, ts, values, telemetry_rows)
                        # == record.event_data(), faster (see _Timestamps)
                        out.append(
                            Event(device_id, seq, "device.telemetry", ts, {"ts": stamp(ts), "values": values})
                        )
                elif type(op) is EventWrite:
                    seq += 1
                    event_rows.append((device_id, seq, op.name, op.at_ms, _dumps(op.data)))
                    result.events.append(Event(device_id, seq, op.name, op.at_ms, op.data))
                else:
                    assert isinstance(op, StatusWrite)
                    previous = status_now[device_id]
                    if previous == op.status:
                        continue
                    seq += 1
                    status_now[device_id] = op.status
                    change = {"status": op.status, "previous_status": previous, "source": op.source}
                    event_rows.append((device_id, seq, "device.status", op.at_ms, _dumps(change)))
                    result.events.append(Event(device_id, seq, "device.status", op.at_ms, change))
                    result.changed = True
                next_seq[device_id] = seq

            if event_rows:
                await self._insert_events(conn, event_rows)
            if telemetry_rows:
                await self._insert_telemetry(conn, telemetry_rows)
            history = self._history
            crossed = [d for d, seq in last.items() if (seq - counts[d]) // history != seq // history]
            if crossed:
                await self._trim_events(conn, crossed, self._history)
        return results

    async def _lock_devices(self, conn: AsyncConnection, ids: Iterable[str]) -> dict[str, str | None]:
        """{id: status} of the devices that exist; PostgreSQL locks them in id order."""
        wanted = sorted(ids)
        if self._pg:
            result = await conn.exec_driver_sql(
                "SELECT id, status FROM devices WHERE id = ANY($1::text[]) ORDER BY id FOR NO KEY UPDATE",
                (wanted,),
            )
        else:
            result = await conn.exec_driver_sql(
                "SELECT id, status FROM devices WHERE id IN (SELECT value FROM json_each(?))",
                (_dumps(wanted),),
            )
        return _pairs(result)

    async def _advance(
        self, conn: AsyncConnection, counts: dict[str, int], final_status: dict[str, tuple[str, int]]
    ) -> dict[str, int]:
        """Add each device's event count to its seq (and set changed statuses); the new seqs."""
        ids = list(counts)
        if self._pg:
            result = await conn.exec_driver_sql(
                "UPDATE devices AS d SET seq = d.seq + v.n,"
                " status = COALESCE(v.st, d.status),"
                " status_at = CASE WHEN v.st IS NULL THEN d.status_at ELSE v.sat END"
                " FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[]) AS v(id, n, st, sat)"
                " WHERE d.id = v.id RETURNING d.id, d.seq",
                (
                    ids,
                    [counts[d] for d in ids],
                    [final_status[d][0] if d in final_status else None for d in ids],
                    [final_status[d][1] if d in final_status else None for d in ids],
                ),
            )
            return _pairs(result)
        last: dict[str, int] = {}
        for start in range(0, len(ids), _SQLITE_VALUES_ROWS):
            chunk = ids[start : start + _SQLITE_VALUES_ROWS]
            params: list[Any] = []
            for device_id in chunk:
                status, at = final_status.get(device_id, (None, None))
                params += (device_id, counts[device_id], status, at)
            values = ",".join(["(?,?,?,?)"] * len(chunk))
            result = await conn.exec_driver_sql(
                f"WITH v(id, n, st, sat) AS (VALUES {values})"
                " UPDATE devices SET seq = devices.seq + v.n,"
                " status = COALESCE(v.st, devices.status),"
                " status_at = CASE WHEN v.st IS NULL THEN devices.status_at ELSE v.sat END"
                " FROM v WHERE devices.id = v.id RETURNING id, seq",
                tuple(params),
            )
            last.update(_pairs(result))
        return last

    async def _insert_events(self, conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
        await self._bulk_insert(conn, "events", _EVENT_COLUMNS, rows)

    async def _insert_telemetry(self, conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
        await self._bulk_insert(conn, "telemetry", _TELEMETRY_COLUMNS, rows)

    async def _bulk_insert(
        self, conn: AsyncConnection, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        """Insert through the driver itself, inside the connection's open transaction.

        PostgreSQL: COPY, which beats executemany at every size measured (4 to 40 000 rows,
        2-2.5x from 400 rows on). SQLite: the driver's executemany, one call in its thread.
        """
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        if self._pg:
            # The transaction is open already: _lock_devices ran on this connection.
            await driver.copy_records_to_table(table, records=rows, columns=columns)
        else:
            marks = ",".join("?" * len(columns))
            await driver.executemany(f"INSERT INTO {table} ({','.join(columns)}) VALUES ({marks})", rows)

    async def _trim_events(self, conn: AsyncConnection, device_ids: Sequence[str], keep: int) -> None:
        """Delete all but the newest `keep` events of these devices."""
        ranked = (
            sa.select(
                events.c.device_id,
                events.c.seq,
                sa.func.row_number()
                .over(partition_by=events.c.device_id, order_by=events.c.seq.desc())
                .label("rn"),
            )
            .where(self._ids_in(events.c.device_id, device_ids))
            .subquery()
        )
        old = sa.select(ranked.c.device_id, ranked.c.seq).where(ranked.c.rn > keep)
        await conn.execute(events.delete().where(sa.tuple_(events.c.device_id, events.c.seq).in_(old)))

    async def events(self, device_id: str, after_seq: int, limit: int) -> list[Event]:
        if limit <= 0:
            return []
        async with self._read(snapshot=True) as conn:
            stored = (
                await conn.execute(
                    sa.select(events.c.seq, events.c.name, events.c.at, events.c.data)
                    .where(events.c.device_id == device_id, events.c.seq > after_seq)
                    .order_by(events.c.seq)
                    .limit(limit)
                )
            ).all()
            telemetry_seqs = (
                (
                    await conn.execute(
                        sa.select(telemetry.c.seq)
                        .distinct()
                        .where(telemetry.c.device_id == device_id, telemetry.c.seq > after_seq)
                        .order_by(telemetry.c.seq)
                        .limit(limit)
                    )
                )
                .scalars()
                .all()
            )
            seqs = sorted({row.seq for row in stored}.union(telemetry_seqs))[:limit]
            if not seqs:
                return []
            highest = seqs[-1]
            rows: Sequence[_Row] = []
            if telemetry_seqs and telemetry_seqs[0] <= highest:
                rows = (
                    await conn.execute(
                        sa.select(
                            telemetry.c.seq,
                            telemetry.c.ts,
                            telemetry.c.key,
                            telemetry.c.kind,
                            telemetry.c.num,
                            telemetry.c.txt,
                        )
                        .where(
                            telemetry.c.device_id == device_id,
                            telemetry.c.seq > after_seq,
                            telemetry.c.seq <= highest,
                        )
                        .order_by(telemetry.c.seq, telemetry.c.key)
                    )
                ).all()
        merged: list[Event] = [
            Event(device_id, row.seq, row.name, row.at, row.data) for row in stored if row.seq <= highest
        ]
        grouped: dict[int, tuple[int, dict[str, Value]]] = {}
        for row in rows:
            entry = grouped.get(row.seq)
            if entry is None:
                entry = grouped[row.seq] = (row.ts, {})
            entry[1][row.key] = _value(row.kind, row.num, row.txt)
        for seq, (ts, values) in grouped.items():
            merged.append(
                Event(device_id, seq, "device.telemetry", ts, {"ts": format_ms(ts), "values": values})
            )
        merged.sort(key=lambda e: e.seq)
        return merged

    async def purge(self, telemetry_before_ms: int, history: int) -> None:
        """Chunks of devices, each in its own short transaction (never one huge delete)."""
        after = ""
        while True:
            async with self._write() as conn:
                ids = (
                    (
                        await conn.execute(
                            sa.select(devices.c.id)
                            .where(devices.c.id > after)
                            .order_by(devices.c.id)
                            .limit(_PURGE_CHUNK)
                        )
                    )
                    .scalars()
                    .all()
                )
                if not ids:
                    return
                await conn.execute(
                    telemetry.delete().where(
                        self._ids_in(telemetry.c.device_id, ids), telemetry.c.ts < telemetry_before_ms
                    )
                )
                await self._trim_events(conn, ids, max(history, 0))
            after = ids[-1]

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
        """Points with from_ms <= ts <= to_ms (both inclusive), newest first by (ts, seq, key).

        Every key is one range of ix_telemetry_key_ts; all keys are a merge of those ranges
        (each cut at `limit`), so no query ever sorts a device's whole history.
        """
        if limit <= 0:
            return []
        async with self._read() as conn:
            keys = [key] if key is not None else await self._keys(conn, device_id)
            found: list[TelemetryPoint] = []
            for start in range(0, len(keys), _MERGE_ARMS):
                arms = [
                    self._key_range(device_id, k, from_ms, to_ms, before, limit)
                    for k in keys[start : start + _MERGE_ARMS]
                ]
                if len(arms) == 1:
                    query = arms[0]
                else:
                    merged = sa.union_all(*(arm.subquery().select() for arm in arms)).subquery()
                    query = (
                        sa.select(merged)
                        .order_by(merged.c.ts.desc(), merged.c.seq.desc(), merged.c.key.desc())
                        .limit(limit)
                    )
                rows = (await conn.execute(query)).all()
                found += (TelemetryPoint(r.key, r.ts, r.seq, _value(r.kind, r.num, r.txt)) for r in rows)
        if len(keys) > _MERGE_ARMS:
            found.sort(key=lambda p: (p.ts_ms, p.seq, p.key), reverse=True)
        return found[:limit]

    @staticmethod
    def _key_range(
        device_id: str,
        key: str,
        from_ms: int | None,
        to_ms: int | None,
        before: tuple[int, int, str] | None,
        limit: int,
    ) -> sa.Select[Any]:
        t = telemetry.c
        query = (
            sa.select(t.key, t.ts, t.seq, t.kind, t.num, t.txt)
            .where(t.device_id == device_id, t.key == key)
            .order_by(t.ts.desc(), t.seq.desc())
            .limit(limit)
        )
        if from_ms is not None:
            query = query.where(t.ts >= from_ms)
        if to_ms is not None:
            query = query.where(t.ts <= to_ms)
        if before is not None:
            # (ts, seq, key) < before, with the key fixed: a range of (ts, seq) in the index.
            ts_seq = sa.tuple_(t.ts, t.seq)
            bound = sa.tuple_(sa.literal(before[0]), sa.literal(before[1]))
            query = query.where(ts_seq <= bound if key < before[2] else ts_seq < bound)
        return query

    async def _keys(self, conn: AsyncConnection, device_id: str) -> list[str]:
        """The device's distinct telemetry keys by a loose index scan (one probe per key)."""
        rows = await conn.execute(_KEYS, {"d": device_id})
        return [row[0] for row in rows if row[0] is not None]

    async def latest_telemetry(self, device_id: str) -> dict[str, TelemetryPoint]:
        """The newest point of every key: one index probe per key, never a scan of all rows."""
        async with self._read() as conn:
            rows = (await conn.execute(_LATEST, {"d": device_id})).all()
        return {r.key: TelemetryPoint(r.key, r.ts, r.seq, _value(r.kind, r.num, r.txt)) for r in rows}

    # -- commands ------------------------------------------------------------------------

    async def create_command(self, command: Command) -> Command:
        """Insert; DuplicateError for an existing id, LookupError if the device is absent."""
        statement = commands.insert().values(
            id=command.id,
            device_id=command.device_id,
            name=command.name,
            params=command.params,
            state=command.state.value,
            issued_at=command.issued_at_ms,
            sent_at=command.sent_at_ms,
            completed_at=command.completed_at_ms,
            expires_at=command.expires_at_ms,
            timeout_s=command.timeout_s,
            issuer=command.issuer,
            issuer_node=command.issuer_node,
            issuer_session=command.issuer_session,
            idempotency_key=command.idempotency_key,
            result=command.result,
            error=command.error,
            extra=command.extra,
        )
        try:
            async with self._write() as conn:
                await conn.execute(statement)
        except sa.exc.IntegrityError as exc:  # not unique: the device's foreign key
            raise LookupError(f"device {command.device_id!r} does not exist") from exc
        return command

    async def get_command(self, command_id: str) -> Command | None:
        async with self._read() as conn:
            row = (await conn.execute(commands.select().where(commands.c.id == command_id))).first()
        return None if row is None else _command(row)

    async def find_command(self, issuer: str, idempotency_key: str, since_ms: int) -> Command | None:
        c = commands.c
        query = (
            commands.select()
            .where(c.issuer == issuer, c.idempotency_key == idempotency_key, c.issued_at >= since_ms)
            .order_by(c.issued_at.desc(), c.id.desc())
            .limit(1)
        )
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else _command(row)

    async def transition_command(
        self,
        command_id: str,
        state: CommandState,
        at_ms: int,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> Command | None:
        allowed = ALLOWED_FROM.get(state)
        if not allowed:
            return None  # nothing ever moves back to pending
        values: dict[str, Any] = {"state": state.value}
        if state is CommandState.SENT:
            values["sent_at"] = at_ms
        if state.final:
            values["completed_at"] = at_ms
        if result is not None:
            values["result"] = result
        if error is not None:
            values["error"] = error
        statement = (
            commands.update()
            .where(commands.c.id == command_id, commands.c.state.in_(sorted(s.value for s in allowed)))
            .values(values)
            .returning(*commands.c)
        )
        async with self._write() as conn:
            row = (await conn.execute(statement)).first()
        return None if row is None else _command(row)

    async def pending_commands(self, device_id: str, now_ms: int) -> list[Command]:
        c = commands.c
        query = (
            commands.select()
            .where(c.device_id == device_id, c.state == CommandState.PENDING.value, c.expires_at > now_ms)
            .order_by(c.issued_at, c.id)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [_command(row) for row in rows]

    async def list_commands(
        self, device_id: str, state: CommandState | None, limit: int, after: str | None = None
    ) -> list[Command]:
        c = commands.c
        query = commands.select().where(c.device_id == device_id).order_by(c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(c.state == state.value)
        if after is not None:
            query = query.where(c.id < after)
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [_command(row) for row in rows]

    async def due_commands(self, now_ms: int, limit: int) -> list[Command]:
        c = commands.c
        query = (
            commands.select()
            .where(c.state.in_(_NOT_FINAL), c.expires_at <= now_ms)
            .order_by(c.expires_at, c.id)
            .limit(limit)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [_command(row) for row in rows]
