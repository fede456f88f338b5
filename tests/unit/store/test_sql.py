"""The pure parts of store/sql/: URLs, glob translation, value encoding, error mapping."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Awaitable, Callable
from fnmatch import fnmatchcase
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetwire.domain.clock import Timestamps, format_ms
from fleetwire.domain.telemetry import Record
from fleetwire.store.base import DuplicateError, StoreUnavailableError
from fleetwire.store.sql import SqlStore, async_url
from fleetwire.store.sql.driver import PostgresDatabase, Tx, drive, numbered
from fleetwire.store.sql.errors import translate
from fleetwire.store.sql.globs import glob_regex, glob_sqlite
from fleetwire.store.sql.telemetry import decode, decode_value, encode, encode_value

ID_CHARS = "abAB09_.:-"
PATTERN_CHARS = ID_CHARS + "*?[]!^\\"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:////var/lib/fw/fleetwire.db", "sqlite+aiosqlite:////var/lib/fw/fleetwire.db"),
        ("sqlite:///rel/fw.db", "sqlite+aiosqlite:///rel/fw.db"),
        ("sqlite:////x/fw.db?synchronous=normal&busy_timeout=50", "sqlite+aiosqlite:////x/fw.db"),
        ("sqlite+aiosqlite:////x/fw.db", "sqlite+aiosqlite:////x/fw.db"),
        ("postgresql://fw@db.example:5433/fleet", "postgresql+asyncpg://fw@db.example:5433/fleet"),
        ("postgresql://fw:s3cret@db/fleet", "postgresql+asyncpg://fw:s3cret@db/fleet"),
        ("postgres://fw@db/fleet", "postgresql+asyncpg://fw@db/fleet"),
        ("postgresql+psycopg://fw@db/fleet", "postgresql+asyncpg://fw@db/fleet"),
    ],
)
def test_urls_as_users_write_them_get_the_async_driver(url: str, expected: str) -> None:
    """Plain sqlite:/// and postgresql:// URLs are accepted; fleetwire picks the driver."""
    assert async_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "mysql://u@h/db",
        "sqlite:////x.db?synchronous=sometimes",
        "sqlite:////x.db?busy_timeout=soon",
    ],
)
def test_unusable_urls_are_refused_at_construction(url: str) -> None:
    """No in-memory SQLite (each pooled connection would see its own), no other databases."""
    with pytest.raises(ValueError, match=r"\S"):
        SqlStore(url)


def test_history_must_be_positive() -> None:
    """history=0 would trim every event at once."""
    with pytest.raises(ValueError, match="history"):
        SqlStore("sqlite:////tmp/x.db", history=0)


@pytest.mark.anyio
async def test_an_unreachable_postgresql_is_unavailable() -> None:
    """A refused connection at open() is StoreUnavailableError, not a driver exception."""
    store = SqlStore("postgresql://postgres@127.0.0.1:1/nothing")
    with anyio.fail_after(15), pytest.raises(StoreUnavailableError):
        await store.open()


@settings(max_examples=500)
@given(
    st.text(ID_CHARS, min_size=1, max_size=8),
    st.text(PATTERN_CHARS, min_size=1, max_size=8),
)
def test_sqlite_glob_matches_like_fnmatchcase(device_id: str, pattern: str) -> None:
    """glob_sqlite evaluated by SQLite's own GLOB agrees with fnmatchcase."""
    glob = glob_sqlite(pattern)
    matched = False
    if glob is not None:  # None: no device id can match
        with sqlite3.connect(":memory:") as conn:
            (matched,) = conn.execute("SELECT ? GLOB ?", (device_id, glob)).fetchone()
    assert bool(matched) == fnmatchcase(device_id, pattern)


@settings(max_examples=500)
@given(
    st.text(ID_CHARS, min_size=1, max_size=8),
    st.text(PATTERN_CHARS, min_size=1, max_size=8),
)
def test_postgresql_regex_matches_like_fnmatchcase(device_id: str, pattern: str) -> None:
    """glob_regex agrees with fnmatchcase (checked with Python's re, whose syntax for this
    subset - anchors, `.`, `.*`, bracket sets, backslash + punctuation - is PostgreSQL's)."""
    regex = glob_regex(pattern)
    matched = regex is not None and re.search(regex, device_id) is not None
    assert matched == fnmatchcase(device_id, pattern)


@given(st.integers(min_value=0, max_value=253_402_300_799_999))
def test_timestamps_format_like_format_ms(ms: int) -> None:
    """The cached formatter writes exactly what Record.event_data() would."""
    stamp = Timestamps()
    assert stamp(ms) == format_ms(ms)
    assert stamp(ms + 1) == format_ms(ms + 1)  # the cached second, or the next one
    assert stamp(ms // 2) == format_ms(ms // 2)
    assert {"ts": stamp(ms), "values": {"a": 1}} == Record(ms, {"a": 1}).event_data()


@pytest.mark.parametrize(
    ("pattern", "regex", "glob"),
    [
        ("site-a.*", r"^site\-a\..*$", "site-a.*"),
        ("d?", "^d.$", "d?"),
        (
            "[!a-z]x",
            "^[ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\\_\\.\\:\\-]x$",
            "[ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-]x",
        ),
        ("[z-a]*", None, None),  # an empty range matches nothing
        ("[^]", None, None),  # a set holding only `^`, which no id contains
        ("a[", r"^a\[$", "a[[]"),
    ],
)
def test_glob_translations(pattern: str, regex: str | None, glob: str | None) -> None:
    """Examples of both translations, including sets that can match no device id."""
    assert (glob_regex(pattern), glob_sqlite(pattern)) == (regex, glob)


def test_telemetry_values_are_one_json_object_and_back() -> None:
    """A record is one JSON object; integers beyond 64 bits are a marker, never a float."""
    values = {
        "f": 1.5,
        "i": 7,
        "b": True,
        "s": "x {",
        "big": 2**70,
        "huge": 10**400,
        "neg": -(2**63),
        "f3": 3.0,
    }
    text = encode(values)  # type: ignore[arg-type]  # a literal of mixed values infers dict[str, object]
    big, huge, neg = 2**70, 10**400, -(2**63)
    assert text == (
        f'{{"f":1.5,"i":7,"b":true,"s":"x {{","big":{{"$int":"{big}"}},"huge":{{"$int":"{huge}"}}'
        f',"neg":{neg},"f3":3.0}}'
    )
    decoded = decode(text)
    assert {k: (type(v), v) for k, v in decoded.items()} == {k: (type(v), v) for k, v in values.items()}
    assert encode({"i": 1}) == '{"i":1}'  # the hot path: one orjson call
    for value in values.values():
        assert (type(decode_value(encode_value(value))), decode_value(encode_value(value))) == (
            type(value),
            value,
        )  # type: ignore[arg-type]  # values of the literal above
    with pytest.raises(TypeError, match="must be a number"):
        encode({"l": [1]})  # type: ignore[dict-item]  # what the store refuses


def test_placeholders_are_numbered_for_postgresql() -> None:
    """One SQL text for both drivers: `?` becomes $1, $2, … in order."""
    assert numbered("SELECT 1") == "SELECT 1"
    assert (
        numbered("UPDATE t SET a = ?, b = ? WHERE id IN (?,?)")
        == "UPDATE t SET a = $1, b = $2 WHERE id IN ($3,$4)"
    )


def test_a_transaction_function_that_suspends_is_refused() -> None:
    """SQLite runs transaction functions in its thread without a loop: they must not suspend."""

    async def finishes() -> int:
        return 7

    async def suspends() -> None:
        await asyncio.sleep(0)

    assert drive(finishes()) == 7
    with pytest.raises(RuntimeError, match="awaited something other than its Tx"):
        drive(suspends())


def test_driver_errors_become_store_errors() -> None:
    """Lost connections and locks are retryable; unique violations are duplicates; bugs pass."""
    locked = translate(sqlite3.OperationalError("database is locked"))
    assert isinstance(locked, StoreUnavailableError)
    assert isinstance(translate(ConnectionRefusedError(111, "refused")), StoreUnavailableError)
    assert isinstance(translate(TimeoutError()), StoreUnavailableError)
    with sqlite3.connect(":memory:") as conn:
        conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, v TEXT NOT NULL)")
        conn.execute("INSERT INTO t VALUES ('a', 'x')")
        with pytest.raises(sqlite3.IntegrityError) as unique:
            conn.execute("INSERT INTO t VALUES ('a', 'y')")
        with pytest.raises(sqlite3.IntegrityError) as not_null:
            conn.execute("INSERT INTO t VALUES ('b', NULL)")
    assert isinstance(translate(unique.value), DuplicateError)
    assert translate(not_null.value) is None
    assert translate(ValueError("a bug")) is None


@pytest.mark.anyio
async def test_a_new_sqlite_database_is_private(tmp_path: Path) -> None:
    """Issue 13.16: a new data directory is 0700 and the database with its WAL files 0600."""
    import stat

    from fleetwire.domain.devices import Device
    from fleetwire.store.base import RegisterDevice
    from fleetwire.store.sql import SqlStore

    database = tmp_path / "fresh" / "fleetwire.db"
    store = SqlStore(f"sqlite:///{database}", history=10)
    await store.open()
    try:
        await store.write([RegisterDevice(Device(id="d1"), 1)])
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in database.parent.iterdir()}
    finally:
        await store.close()
    assert stat.S_IMODE(database.parent.stat().st_mode) == 0o700
    assert modes["fleetwire.db"] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes


def test_pool_size_must_be_positive() -> None:
    """FLEETWIRE_DB_POOL_SIZE reaches SqlStore; a pool of no connection is refused."""
    with pytest.raises(ValueError, match="pool_size"):
        SqlStore("postgresql://fw@db/fleet", pool_size=0)


@pytest.mark.anyio
async def test_the_postgresql_pool_opens_at_most_pool_size_connections(postgres_url: str) -> None:
    """With two connections both held, a third caller waits and gets the first one back when
    it is let go (the same backend pid), instead of opening a third connection."""
    database = PostgresDatabase(postgres_url, pool_size=2, slow_write_ms=200)
    held = [asyncio.Event(), asyncio.Event()]
    entered: list[asyncio.Event] = [asyncio.Event(), asyncio.Event()]
    pids: list[int] = []

    def holder(index: int) -> Callable[[Tx], Awaitable[int]]:
        async def hold(tx: Tx) -> int:
            row = await tx.fetchrow("SELECT pg_backend_pid()")
            assert row is not None
            entered[index].set()
            await held[index].wait()
            return int(row[0])

        return hold

    async def pid(tx: Tx) -> int:
        row = await tx.fetchrow("SELECT pg_backend_pid()")
        assert row is not None
        return int(row[0])

    with anyio.fail_after(10):
        await database.open()
        try:
            first = asyncio.ensure_future(database.read(holder(0)))
            second = asyncio.ensure_future(database.read(holder(1)))
            await entered[0].wait()
            await entered[1].wait()
            third = asyncio.ensure_future(database.read(pid))
            held[0].set()
            pids = [await first, await third]
            held[1].set()
            await second
        finally:
            await database.close()
    assert pids[0] == pids[1]


def test_slow_write_ms_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="slow_write_ms"):
        SqlStore("sqlite:////tmp/x.db", slow_write_ms=-1)


def _slow_writes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow write transaction")]


@pytest.mark.anyio
async def test_a_write_slower_than_slow_write_ms_is_logged_with_its_commit_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """FLEETWIRE_SLOW_WRITE_MS: a store whose threshold no write reaches logs nothing, one with
    a threshold of 0 logs its write (the sentinel that proves the first one was quiet), on
    SQLite with the statements and the COMMIT apart."""
    from fleetwire.domain.devices import Device
    from fleetwire.store.base import RegisterDevice

    caplog.set_level("WARNING", logger="fleetwire.store.sql.driver")
    with anyio.fail_after(10):
        for name, threshold in (("quiet", 1e9), ("logged", 0.0)):
            store = SqlStore(f"sqlite:///{tmp_path / name}.db", slow_write_ms=threshold)
            await store.open()
            try:
                await store.write([RegisterDevice(Device(id="d1"), 1)])
            finally:
                await store.close()
    [message] = _slow_writes(caplog)
    assert re.fullmatch(
        r"slow write transaction: [\d.]+ ms \(statements [\d.]+ ms, COMMIT [\d.]+ ms\)", message
    )


@pytest.mark.anyio
async def test_a_slow_postgresql_write_is_logged(postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="fleetwire.store.sql.driver")
    database = PostgresDatabase(postgres_url, pool_size=1, slow_write_ms=0)

    async def one(tx: Tx) -> None:
        await tx.fetchrow("SELECT 1")

    with anyio.fail_after(10):
        await database.open()
        try:
            await database.write(one)
        finally:
            await database.close()
    [message] = _slow_writes(caplog)
    assert re.fullmatch(r"slow write transaction: [\d.]+ ms", message)
