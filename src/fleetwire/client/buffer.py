"""The device's outbox: telemetry records waiting for their durable ack.

Every record `DeviceClient.send` takes goes here first and leaves only when the server acked
it (or refused it as invalid), so a record is sent at least once however the connection
behaves; records leave in the order they came. Bounded by count and by bytes (the compact
JSON of the records); a record over either bound is refused at once with `BufferFull`, and
nothing taken is ever dropped. `SqliteBuffer` keeps the records in a file, so they also
survive a restart of the device process.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections import deque
from pathlib import Path
from typing import Protocol

from fleetwire.client.errors import BufferFull


class TelemetryBuffer(Protocol):
    max_records: int
    max_bytes: int

    def append(self, record: bytes) -> int:
        """Take one record (its compact JSON); returns its key. BufferFull past a bound."""
        ...

    def head(self, limit: int) -> list[tuple[int, bytes]]:
        """The oldest `limit` records, oldest first (they stay until `remove`)."""
        ...

    def remove(self, keys: list[int]) -> None:
        """Drop acked (or refused) records."""
        ...

    def __len__(self) -> int: ...

    @property
    def bytes(self) -> int: ...

    def close(self) -> None: ...


class MemoryBuffer:
    def __init__(self, max_records: int = 10_000, max_bytes: int = 8 << 20) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._records: deque[tuple[int, bytes]] = deque()
        self._keys = itertools.count(1)
        self._bytes = 0

    def append(self, record: bytes) -> int:
        _check_room(self, len(record))
        key = next(self._keys)
        self._records.append((key, record))
        self._bytes += len(record)
        return key

    def head(self, limit: int) -> list[tuple[int, bytes]]:
        return list(itertools.islice(self._records, limit))

    def remove(self, keys: list[int]) -> None:
        gone = set(keys)
        kept = deque(item for item in self._records if item[0] not in gone)
        self._bytes = sum(len(r) for _, r in kept)
        self._records = kept

    def __len__(self) -> int:
        return len(self._records)

    @property
    def bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        pass


class SqliteBuffer:
    """The outbox in an SQLite file (WAL; one row per record). Records left by an earlier run
    are sent first. Writes are synchronous and small (one insert per record, one delete per
    acked batch): an embedded file is faster than a thread hop for rows this size."""

    def __init__(self, path: str | Path, max_records: int = 100_000, max_bytes: int = 64 << 20) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # survives a process crash, not power loss
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (key INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)"
        )
        count, size = self._db.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM outbox"
        ).fetchone()
        self._count, self._bytes = int(count), int(size)

    def append(self, record: bytes) -> int:
        _check_room(self, len(record))
        cursor = self._db.execute("INSERT INTO outbox (body) VALUES (?)", (record,))
        self._count += 1
        self._bytes += len(record)
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def head(self, limit: int) -> list[tuple[int, bytes]]:
        rows = self._db.execute("SELECT key, body FROM outbox ORDER BY key LIMIT ?", (limit,)).fetchall()
        return [(int(key), bytes(body)) for key, body in rows]

    def remove(self, keys: list[int]) -> None:
        if not keys:
            return
        self._db.execute("BEGIN")
        removed = 0
        for start in range(0, len(keys), 500):  # below SQLite's bound-parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            size = self._db.execute(
                f"SELECT coalesce(sum(length(body)), 0) FROM outbox WHERE key IN ({marks})", chunk
            ).fetchone()[0]
            removed += self._db.execute(f"DELETE FROM outbox WHERE key IN ({marks})", chunk).rowcount
            self._bytes -= int(size)
        self._db.execute("COMMIT")
        self._count -= removed

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        self._db.close()


def _check_room(buffer: TelemetryBuffer, size: int) -> None:
    if len(buffer) >= buffer.max_records:
        raise BufferFull(f"offline buffer full: {len(buffer)} records (max {buffer.max_records})")
    if buffer.bytes + size > buffer.max_bytes:
        raise BufferFull(f"offline buffer full: {buffer.bytes} + {size} bytes (max {buffer.max_bytes})")


_memory: type[TelemetryBuffer] = MemoryBuffer
_sqlite: type[TelemetryBuffer] = SqliteBuffer
