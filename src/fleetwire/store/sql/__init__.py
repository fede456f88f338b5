"""The Store on SQLite or PostgreSQL, split by concern.

driver (raw sqlite3 in threads, asyncpg: the Tx API every module uses), engine (URLs,
pragmas, Alembic migrations through SQLAlchemy), errors (driver errors as Store errors), dialect (what
differs between the databases), globs, rows, registry, events (the write group and history),
telemetry, commands, twin, and store (SqlStore, which composes them).
"""

from fleetwire.store.sql.engine import async_url, create_engine, lock_for_migrations
from fleetwire.store.sql.store import SqlStore

__all__ = ["SqlStore", "async_url", "create_engine", "lock_for_migrations"]
