"""The Store on SQLite or PostgreSQL, split by concern.

engine (URLs, pragmas, migrations), errors (driver errors as Store errors), dialect (what
differs between the databases), globs, rows, registry, events (the write group and history),
telemetry, commands, and store (SqlStore, which composes them).
"""

from fleetwire.store.sql.engine import async_url, create_engine, lock_for_migrations
from fleetwire.store.sql.store import SqlStore

__all__ = ["SqlStore", "async_url", "create_engine", "lock_for_migrations"]
