"""Engines as fleetwire needs them: driver URLs, SQLite pragmas, transactions, migrations.

Durability on SQLite: WAL with ``synchronous=FULL`` (the default here) fsyncs the WAL at every
commit, so an acked write survives power loss (contract §2.2: "an acked record is never
lost"). ``synchronous=NORMAL`` survives a process kill but may lose the last commits on power
loss; it can be chosen with ``sqlite:///path.db?synchronous=normal``. Write transactions are
``BEGIN IMMEDIATE`` (one writer at a time, no upgrade deadlocks between processes) and wait up
to ``busy_timeout`` ms (default 10000, ``?busy_timeout=`` in the URL) for the lock.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

MIGRATIONS_DIR: Final = Path(__file__).parent.parent / "migrations"
# pg_advisory_xact_lock key serialising schema upgrades of processes starting together.
_MIGRATION_LOCK: Final = 0x666C_6565_7477_6972  # "fleetwir"
_SQLITE_OPTIONS: Final = ("synchronous", "busy_timeout")
_SYNCHRONOUS: Final = frozenset({"off", "normal", "full", "extra"})


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


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
    """An async engine configured as fleetwire needs it (pragmas, JSON codec, transactions).

    `hide_parameters`: SQL parameters (telemetry values, command params, metadata) never
    reach exception text, so neither logs nor a StoreUnavailableError message carry them.
    """
    if is_sqlite(url):
        return _sqlite_engine(url)
    return create_async_engine(
        async_url(url),
        json_serializer=dumps,
        json_deserializer=orjson.loads,
        hide_parameters=True,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        connect_args={"timeout": 10},
    )


def sqlite_options(url: str) -> tuple[str, int]:
    """(synchronous, busy_timeout ms) from fleetwire's own query options of a SQLite URL."""
    query = make_url(url).query
    synchronous = query.get("synchronous", "full")
    busy_timeout = query.get("busy_timeout", "10000")
    if not isinstance(synchronous, str) or synchronous.lower() not in _SYNCHRONOUS:
        raise ValueError("synchronous must be one of off, normal, full, extra")
    if not isinstance(busy_timeout, str) or not busy_timeout.isdigit():
        raise ValueError("busy_timeout must be a number of milliseconds")
    return synchronous.upper(), int(busy_timeout)


def create_private(database: Path) -> None:
    """A new database (and a new directory for it) only its owner can read (SECURITY.md):
    SQLite gives its -wal and -shm files the mode of the database file."""
    database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not database.exists():
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))


def sqlite_pragmas(synchronous: str, busy_timeout_ms: int) -> tuple[str, ...]:
    """What every SQLite connection runs first (the migration engine's and the driver's)."""
    return (
        f"PRAGMA busy_timeout={busy_timeout_ms}",  # first: the others may need the lock
        "PRAGMA journal_mode=WAL",
        f"PRAGMA synchronous={synchronous}",
        "PRAGMA foreign_keys=ON",
        "PRAGMA cache_size=-65536",  # 64 MiB: the index pages of a busy telemetry table
        # Checkpoint every ~40 MiB of WAL instead of 4 MiB: a busy device's index pages are
        # rewritten by most commits and are copied back once per checkpoint (2x ingest, measured).
        "PRAGMA wal_autocheckpoint=10000",
        "PRAGMA journal_size_limit=67108864",
    )


def _sqlite_engine(url: str) -> AsyncEngine:
    synchronous, busy_timeout = sqlite_options(url)
    database = make_url(url).database
    assert database is not None  # async_url refuses URLs without a file
    create_private(Path(database).expanduser())
    engine = create_async_engine(
        async_url(url),
        json_serializer=dumps,
        json_deserializer=orjson.loads,
        hide_parameters=True,
        pool_size=5,
        max_overflow=5,
        pool_use_lifo=True,
    )
    pragmas = sqlite_pragmas(synchronous, busy_timeout)

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


def upgrade_to_head(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
