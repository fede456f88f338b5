"""The device outbox (issue 17): bounded by count and bytes, oldest first, nothing dropped;
the SQLite file keeps its records across instances."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetwire.client.buffer import MemoryBuffer, SqliteBuffer, TelemetryBuffer
from fleetwire.client.errors import BufferFull


def buffers(tmp_path: Path, max_records: int, max_bytes: int) -> list[TelemetryBuffer]:
    return [
        MemoryBuffer(max_records=max_records, max_bytes=max_bytes),
        SqliteBuffer(tmp_path / "outbox.db", max_records=max_records, max_bytes=max_bytes),
    ]


@pytest.mark.parametrize("kind", [0, 1], ids=["memory", "sqlite"])
def test_order_and_removal(tmp_path: Path, kind: int) -> None:
    buffer = buffers(tmp_path, 100, 10_000)[kind]
    keys = [buffer.append(f"r{n}".encode()) for n in range(5)]
    assert [body for _, body in buffer.head(3)] == [b"r0", b"r1", b"r2"]
    buffer.remove([keys[1], keys[3]])
    assert [body for _, body in buffer.head(10)] == [b"r0", b"r2", b"r4"]
    assert (len(buffer), buffer.bytes) == (3, 6)
    buffer.remove([])
    assert len(buffer) == 3
    buffer.close()


@pytest.mark.parametrize("kind", [0, 1], ids=["memory", "sqlite"])
def test_bounds_refuse_the_newest_and_keep_the_rest(tmp_path: Path, kind: int) -> None:
    """At 3 records or 10 bytes the next append raises BufferFull; what was taken stays."""
    buffer = buffers(tmp_path, 3, 10)[kind]
    buffer.append(b"aaaa")
    buffer.append(b"bbbb")
    with pytest.raises(BufferFull, match="bytes"):
        buffer.append(b"ccc")  # 8 + 3 > 10
    buffer.append(b"cc")
    with pytest.raises(BufferFull, match="records"):
        buffer.append(b"")
    assert [body for _, body in buffer.head(10)] == [b"aaaa", b"bbbb", b"cc"]
    buffer.close()


def test_sqlite_file_survives_the_instance(tmp_path: Path) -> None:
    first = SqliteBuffer(tmp_path / "outbox.db")
    keys = [first.append(f"r{n}".encode()) for n in range(1200)]
    first.remove(keys[:600])  # more than one chunk of 500 keys
    first.close()
    second = SqliteBuffer(tmp_path / "outbox.db")
    assert (len(second), second.bytes) == (600, sum(len(f"r{n}") for n in range(600, 1200)))
    assert second.head(1) == [(keys[600], b"r600")]
    later = second.append(b"new")
    assert later > keys[-1]  # keys never go back: order holds across instances
    second.close()
