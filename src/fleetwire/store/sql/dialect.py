"""What differs between SQLite and PostgreSQL, in one object per database.

Everything else in store/sql is one code path; a query that must differ asks the store's
Dialect (`SQLITE` or `POSTGRESQL`, chosen by `for_url`) instead of testing the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from fleetwire.store.sql.engine import dumps, is_sqlite
from fleetwire.store.sql.globs import glob_regex, glob_sqlite
from fleetwire.store.sql.rows import pairs

_SQLITE_VALUES_ROWS: Final = 8000  # 4 parameters a row, under SQLite's 32766 limit


class Dialect(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def locks_every_device(self) -> bool:
        """Lock every device row of a write group, in id order, before writing.

        PostgreSQL: two nodes writing overlapping groups must not deadlock. SQLite has one
        writer at a time (BEGIN IMMEDIATE), so it reads device rows only when it needs them.
        """

    @property
    def snapshot_isolation(self) -> str | None:
        """The isolation level for reads of several statements that must agree."""

    def write_lock(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A lock that queues this process's write transactions (a new one per store)."""

    def ids_in(self, column: sa.ColumnElement[str], ids: Iterable[str]) -> sa.ColumnElement[bool]:
        """`column IN ids` as ONE parameter, so that any number of ids fits."""

    def has_tag(self, tags: sa.ColumnElement[Any], tag: str) -> sa.ColumnElement[bool]:
        """The JSON array column `tags` holds `tag`."""

    def glob(self, column: sa.ColumnElement[str], pattern: str) -> sa.ColumnElement[bool] | None:
        """`column` matches the glob (fnmatchcase); None if no device id can match."""

    def globs_any(self, column: sa.ColumnElement[str], patterns: Iterable[str]) -> sa.ColumnElement[bool]:
        """`column` matches one of the globs, as ONE parameter: a thousand patterns are one
        term, not a thousand ORs (SQLite's expression tree has a depth limit)."""

    def insert_new(self, table: sa.Table) -> Any:
        """INSERT … ON CONFLICT DO NOTHING: a duplicate key inserts nothing and fails nothing."""

    async def lock_devices(self, conn: AsyncConnection, ids: Iterable[str]) -> dict[str, str | None]:
        """{id: status} of the devices that exist (PostgreSQL locks them in id order)."""

    async def advance(
        self, conn: AsyncConnection, counts: Mapping[str, int], final_status: Mapping[str, tuple[str, int]]
    ) -> dict[str, int]:
        """Add each device's event count to its seq (and set changed statuses); the new seqs."""

    async def bulk_insert(
        self, conn: AsyncConnection, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        """Insert through the driver itself, inside the connection's open transaction."""


class _Sqlite:
    name: Final = "sqlite"
    locks_every_device: Final = False
    snapshot_isolation: Final = None  # one SQLite read transaction is a snapshot already

    def write_lock(self) -> contextlib.AbstractAsyncContextManager[Any]:
        # SQLite has one writer at a time. Queue this process's writers here, in order,
        # instead of letting them contend for the file lock: SQLite's busy handler sleeps
        # and retries, which collapsed throughput under concurrent command writes.
        return asyncio.Lock()

    def ids_in(self, column: sa.ColumnElement[str], ids: Iterable[str]) -> sa.ColumnElement[bool]:
        each = sa.func.json_each(sa.bindparam(None, dumps(sorted(ids)), type_=sa.Text)).table_valued("value")
        return column.in_(sa.select(each.c.value))

    def has_tag(self, tags: sa.ColumnElement[Any], tag: str) -> sa.ColumnElement[bool]:
        each = sa.func.json_each(tags).table_valued("value")
        return sa.exists(sa.select(1).select_from(each).where(each.c.value == tag))

    def glob(self, column: sa.ColumnElement[str], pattern: str) -> sa.ColumnElement[bool] | None:
        glob = glob_sqlite(pattern)
        return None if glob is None else column.op("GLOB")(glob)

    def globs_any(self, column: sa.ColumnElement[str], patterns: Iterable[str]) -> sa.ColumnElement[bool]:
        globs = sorted({g for g in map(glob_sqlite, patterns) if g is not None})
        each = sa.func.json_each(sa.bindparam(None, dumps(globs), type_=sa.Text)).table_valued("value")
        return sa.exists(sa.select(1).select_from(each).where(column.op("GLOB")(each.c.value)))

    def insert_new(self, table: sa.Table) -> Any:
        return sqlite.insert(table).on_conflict_do_nothing()

    async def lock_devices(self, conn: AsyncConnection, ids: Iterable[str]) -> dict[str, str | None]:
        result = await conn.exec_driver_sql(
            "SELECT id, status FROM devices WHERE id IN (SELECT value FROM json_each(?))",
            (dumps(sorted(ids)),),
        )
        return pairs(result)

    async def advance(
        self, conn: AsyncConnection, counts: Mapping[str, int], final_status: Mapping[str, tuple[str, int]]
    ) -> dict[str, int]:
        ids = list(counts)
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
            last.update(pairs(result))
        return last

    async def bulk_insert(
        self, conn: AsyncConnection, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        # The driver's executemany: one call into its thread for the whole group.
        driver: Any = (await conn.get_raw_connection()).driver_connection
        marks = ",".join("?" * len(columns))
        await driver.executemany(f"INSERT INTO {table} ({','.join(columns)}) VALUES ({marks})", rows)


class _Postgresql:
    name: Final = "postgresql"
    locks_every_device: Final = True
    snapshot_isolation: Final = "REPEATABLE READ"

    def write_lock(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return contextlib.nullcontext()  # row locks order concurrent writers

    def ids_in(self, column: sa.ColumnElement[str], ids: Iterable[str]) -> sa.ColumnElement[bool]:
        return column == sa.any_(sa.bindparam(None, sorted(ids), type_=postgresql.ARRAY(sa.Text)))

    def has_tag(self, tags: sa.ColumnElement[Any], tag: str) -> sa.ColumnElement[bool]:
        # The column is json (exact numbers, see schema); containment needs jsonb.
        wanted = sa.bindparam(None, dumps([tag]), type_=sa.Text)
        return sa.cast(tags, postgresql.JSONB).op("@>")(sa.cast(wanted, postgresql.JSONB))

    def glob(self, column: sa.ColumnElement[str], pattern: str) -> sa.ColumnElement[bool] | None:
        regex = glob_regex(pattern)
        return None if regex is None else column.op("~")(regex)

    def globs_any(self, column: sa.ColumnElement[str], patterns: Iterable[str]) -> sa.ColumnElement[bool]:
        regexes = sorted({r for r in map(glob_regex, patterns) if r is not None})
        return column.op("~")(sa.any_(sa.bindparam(None, regexes, type_=postgresql.ARRAY(sa.Text))))

    def insert_new(self, table: sa.Table) -> Any:
        return postgresql.insert(table).on_conflict_do_nothing()

    async def lock_devices(self, conn: AsyncConnection, ids: Iterable[str]) -> dict[str, str | None]:
        result = await conn.exec_driver_sql(
            "SELECT id, status FROM devices WHERE id = ANY($1::text[]) ORDER BY id FOR NO KEY UPDATE",
            (sorted(ids),),
        )
        return pairs(result)

    async def advance(
        self, conn: AsyncConnection, counts: Mapping[str, int], final_status: Mapping[str, tuple[str, int]]
    ) -> dict[str, int]:
        ids = list(counts)
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
        return pairs(result)

    async def bulk_insert(
        self, conn: AsyncConnection, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        # COPY beats executemany at every size measured (4 to 40 000 rows, 2-2.5x from 400
        # rows on). The transaction is open already: lock_devices ran on this connection.
        driver: Any = (await conn.get_raw_connection()).driver_connection
        await driver.copy_records_to_table(table, records=rows, columns=columns)


SQLITE: Final[Dialect] = _Sqlite()
POSTGRESQL: Final[Dialect] = _Postgresql()


def for_url(url: str) -> Dialect:
    return SQLITE if is_sqlite(url) else POSTGRESQL
