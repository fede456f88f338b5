"""What differs between SQLite and PostgreSQL, in one object per database.

Everything else in store/sql is one code path with `?` placeholders (driver.Tx); a fragment
that must differ asks the store's Dialect (`SQLITE` or `POSTGRESQL`, chosen by `for_url`)
instead of testing the backend. A fragment method returns SQL with exactly one `?`, and the
matching `*_param` method turns the Python value into that parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

from fleetwire.store.sql.driver import Tx
from fleetwire.store.sql.engine import dumps, is_sqlite
from fleetwire.store.sql.globs import glob_regex, glob_sqlite

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

    def ids_in(self, column: str) -> str:
        """`column IN ids` with the ids as ONE parameter (`ids_param`): any number fits."""

    def ids_param(self, ids: Iterable[str]) -> Any: ...

    def has_tag(self, column: str) -> str:
        """The JSON array `column` holds the tag given as the one parameter."""

    def globs_any(self, column: str) -> str:
        """`column` matches one of the globs of `globs_param` (one parameter, any number)."""

    def globs_param(self, patterns: Iterable[str]) -> Any:
        """The patterns that can match some id, translated; empty if none can."""

    def has_key(self, column: str) -> str:
        """The JSON object `column` has the key given as the one parameter."""

    async def lock_devices(self, tx: Tx, ids: Iterable[str]) -> dict[str, str | None]:
        """{id: status} of the devices that exist (PostgreSQL locks them in id order)."""

    def rows_from(self, columns: Sequence[tuple[str, str]]) -> str:
        """A FROM source of rows given as parameters (`rows_params`): `columns` are (name,
        PostgreSQL type) pairs; the names must differ from the other table's columns (SQLite's
        RETURNING takes no table prefix)."""

    def rows_params(self, rows: Sequence[Sequence[Any]], width: int) -> list[Any]: ...

    async def advance(
        self, tx: Tx, counts: Mapping[str, int], final_status: Mapping[str, tuple[str, int]]
    ) -> dict[str, int]:
        """Add each device's event count to its seq (and set changed statuses); the new seqs."""


class _Sqlite:
    name: Final = "sqlite"
    locks_every_device: Final = False

    def ids_in(self, column: str) -> str:
        return f"{column} IN (SELECT value FROM json_each(?))"

    def ids_param(self, ids: Iterable[str]) -> Any:
        return dumps(sorted(ids))

    def has_tag(self, column: str) -> str:
        return f"EXISTS (SELECT 1 FROM json_each({column}) AS tag WHERE tag.value = ?)"

    def globs_any(self, column: str) -> str:
        return f"EXISTS (SELECT 1 FROM json_each(?) AS g WHERE {column} GLOB g.value)"

    def globs_param(self, patterns: Iterable[str]) -> Any:
        globs = sorted({g for g in map(glob_sqlite, patterns) if g is not None})
        return dumps(globs) if globs else None

    def has_key(self, column: str) -> str:
        return f"EXISTS (SELECT 1 FROM json_each({column}) AS k WHERE k.key = ?)"

    async def lock_devices(self, tx: Tx, ids: Iterable[str]) -> dict[str, str | None]:
        found = await tx.fetch(
            "SELECT id, status FROM devices WHERE id IN (SELECT value FROM json_each(?))", dumps(sorted(ids))
        )
        return {row[0]: row[1] for row in found}

    def rows_from(self, columns: Sequence[tuple[str, str]]) -> str:
        picked = ", ".join(f"value ->> {i} AS {name}" for i, (name, _) in enumerate(columns))
        return f"(SELECT {picked} FROM json_each(?))"

    def rows_params(self, rows: Sequence[Sequence[Any]], width: int) -> list[Any]:
        return [dumps(rows)]  # one JSON array of row arrays

    async def advance(
        self, tx: Tx, counts: Mapping[str, int], final_status: Mapping[str, tuple[str, int]]
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
            found = await tx.fetch(
                f"WITH v(id, n, st, sat) AS (VALUES {values})"
                " UPDATE devices SET seq = devices.seq + v.n,"
                " status = COALESCE(v.st, devices.status),"
                " status_at = CASE WHEN v.st IS NULL THEN devices.status_at ELSE v.sat END"
                " FROM v WHERE devices.id = v.id RETURNING id, seq",
                *params,
            )
            last.update((row[0], row[1]) for row in found)
        return last


class _Postgresql:
    name: Final = "postgresql"
    locks_every_device: Final = True

    def ids_in(self, column: str) -> str:
        return f"{column} = ANY(?::text[])"

    def ids_param(self, ids: Iterable[str]) -> Any:
        return sorted(ids)

    def has_tag(self, column: str) -> str:
        # The column is json (exact numbers, see schema); containment needs jsonb.
        return f"{column}::jsonb @> jsonb_build_array(?::text)"

    def globs_any(self, column: str) -> str:
        return f"{column} ~ ANY(?::text[])"

    def globs_param(self, patterns: Iterable[str]) -> Any:
        regexes = sorted({r for r in map(glob_regex, patterns) if r is not None})
        return regexes or None

    def has_key(self, column: str) -> str:
        return f"({column} -> ?::text) IS NOT NULL"

    async def lock_devices(self, tx: Tx, ids: Iterable[str]) -> dict[str, str | None]:
        found = await tx.fetch(
            "SELECT id, status FROM devices WHERE id = ANY(?::text[]) ORDER BY id FOR NO KEY UPDATE",
            sorted(ids),
        )
        return {row[0]: row[1] for row in found}

    def rows_from(self, columns: Sequence[tuple[str, str]]) -> str:
        arrays = ", ".join(f"?::{kind}[]" for _, kind in columns)
        return f"unnest({arrays}) AS v({', '.join(name for name, _ in columns)})"

    def rows_params(self, rows: Sequence[Sequence[Any]], width: int) -> list[Any]:
        return [[row[i] for row in rows] for i in range(width)]  # one array per column

    async def advance(
        self, tx: Tx, counts: Mapping[str, int], final_status: Mapping[str, tuple[str, int]]
    ) -> dict[str, int]:
        ids = list(counts)
        found = await tx.fetch(
            "UPDATE devices AS d SET seq = d.seq + v.n,"
            " status = COALESCE(v.st, d.status),"
            " status_at = CASE WHEN v.st IS NULL THEN d.status_at ELSE v.sat END"
            " FROM unnest(?::text[], ?::bigint[], ?::text[], ?::bigint[]) AS v(id, n, st, sat)"
            " WHERE d.id = v.id RETURNING d.id, d.seq",
            ids,
            [counts[d] for d in ids],
            [final_status[d][0] if d in final_status else None for d in ids],
            [final_status[d][1] if d in final_status else None for d in ids],
        )
        return {row[0]: row[1] for row in found}


SQLITE: Final[Dialect] = _Sqlite()
POSTGRESQL: Final[Dialect] = _Postgresql()


def for_url(url: str) -> Dialect:
    return SQLITE if is_sqlite(url) else POSTGRESQL
