"""The database drivers under SqlStore: raw `sqlite3` in threads, `asyncpg` on the loop.

Chosen by measurement (issue 12): through SQLAlchemy + aiosqlite a get_device cost 578 µs of
CPU, raw sqlite3 in its thread 10.7 µs; create_command 1,143 against 86 µs; asyncpg with
prepared statements 35 µs against 671 µs through SQLAlchemy. SQLAlchemy stays for what is
not hot: URL parsing and the Alembic migrations at open() (engine.py).

One API for every concern module (registry, events, telemetry, commands, …): a transaction
function ``async def f(tx: Tx, …)`` that calls ``await tx.fetch(sql, *args)`` and friends,
run by ``Database.read(f)`` or ``Database.write(f)``. SQL is written once with ``?``
placeholders; PostgreSQL's Tx rewrites them to ``$1, $2, …`` (once per statement text).
Rows are tuples by position (sqlite3 tuples, asyncpg Records): columns are named in the SQL.

- SQLite: ONE write connection in its own thread (WAL, ``synchronous=FULL`` by default,
  ``BEGIN IMMEDIATE``), and one read connection in a second thread, so reads never wait for
  an fsync. A transaction function runs *inside* the thread: its Tx calls return without
  suspending, so the coroutine is driven to completion by a single ``send(None)`` — the
  whole write group costs one thread hop, not one per statement.
- PostgreSQL: an asyncpg pool; asyncpg prepares and caches every statement per connection,
  and bulk inserts are COPY.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final, NoReturn, Protocol, TypeVar

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

from fleetwire.store.base import StoreUnavailableError
from fleetwire.store.sql.engine import create_private, sqlite_pragmas
from fleetwire.store.sql.errors import translate

log = logging.getLogger(__name__)
T = TypeVar("T")
Row = Sequence[Any]


class Tx(Protocol):
    """One open transaction (or, for a plain read, one connection)."""

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert many rows the fastest way the driver has (executemany / COPY)."""


TxFunction = Callable[[Tx], Coroutine[Any, Any, T]]


class Database(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def read(self, fn: TxFunction[T], *, snapshot: bool = False) -> T:
        """Run `fn` on a read connection; `snapshot`: all its statements see one state."""

    async def write(self, fn: TxFunction[T]) -> T:
        """Run `fn` in one write transaction, committed when it returns, rolled back if it raises."""


def _raise_translated(exc: BaseException) -> NoReturn:
    translated = translate(exc)
    if translated is not None:
        raise translated from exc
    raise exc


# -- SQLite --------------------------------------------------------------------------------


class _SqliteTx:
    """A Tx on a sqlite3 connection in the calling thread: every call completes at once."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        self._conn.execute(sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return self._conn.execute(sql, args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = self._conn.execute(sql, args).fetchone()
        return row

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    async def copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        marks = ",".join("?" * len(columns))
        self._conn.executemany(f"INSERT INTO {table} ({','.join(columns)}) VALUES ({marks})", rows)


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (a transaction function on a _SqliteTx)."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a SQLite transaction function awaited something other than its Tx")


_Job = tuple["asyncio.Future[Any]", Callable[[sqlite3.Connection], Any]]
_Done = list[tuple["asyncio.Future[Any]", Any, BaseException | None]]


class _Worker:
    """One thread owning one sqlite3 connection, running jobs in arrival order.

    Cheaper than `run_in_executor` (measured 45 against ~100 µs of CPU per call on the
    2-vCPU VM): the thread takes every job queued while it was busy and hands all their
    results back to the loop in ONE `call_soon_threadsafe`, so concurrent calls share the
    cost of waking either side (~8 µs per call at 16 in flight).
    """

    def __init__(self, name: str, connect: Callable[[], sqlite3.Connection]) -> None:
        self._loop = asyncio.get_running_loop()
        self._jobs: queue.SimpleQueue[
            tuple[asyncio.Future[Any], Callable[[sqlite3.Connection], Any]] | None
        ] = queue.SimpleQueue()
        self._connect = connect
        self._opened: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def opened(self) -> None:
        await self._opened

    def submit(self, job: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((future, job))
        return future

    def stop(self) -> None:
        """Close the connection after the jobs queued before this call (returns at once)."""
        self._jobs.put(None)

    def _run(self) -> None:
        try:
            conn = self._connect()
        except Exception as exc:  # handed to open(); the thread ends
            failed: _Done = [(self._opened, None, exc)]
            self._loop.call_soon_threadsafe(_settle, failed)
            return
        opened: _Done = [(self._opened, None, None)]
        self._loop.call_soon_threadsafe(_settle, opened)
        jobs = self._jobs
        try:
            while True:
                batch = [jobs.get()]
                while not jobs.empty():
                    batch.append(jobs.get_nowait())
                done: _Done = []
                stop = False
                for item in batch:
                    if item is None:
                        stop = True
                        continue
                    future, job = item
                    try:
                        done.append((future, job(conn), None))
                    except BaseException as exc:  # handed to the caller
                        done.append((future, None, exc))
                if done:
                    self._loop.call_soon_threadsafe(_settle, done)
                if stop:
                    return
        finally:
            conn.close()


def _settle(done: _Done) -> None:
    for future, result, exc in done:
        if future.done():  # the caller was cancelled
            continue
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)


class SqliteDatabase:
    """Two sqlite3 connections, each owned by its own thread (module docstring)."""

    def __init__(self, path: str, *, synchronous: str, busy_timeout_ms: int, slow_write_ms: float) -> None:
        """`slow_write_ms`: a write transaction that takes longer is logged (a warning)."""
        self._path = path
        self._slow_write_s = slow_write_ms / 1000
        self._pragmas = sqlite_pragmas(synchronous, busy_timeout_ms)
        self._busy_timeout_s = busy_timeout_ms / 1000
        self._writer: _Worker | None = None
        self._reader: _Worker | None = None

    def _connect(self) -> sqlite3.Connection:
        """A configured connection (in the worker's thread). Processes opening a new file at
        once: `journal_mode=WAL` needs the file to itself, and when two connections both want
        it SQLite answers SQLITE_BUSY at once, without the busy handler (waiting could
        deadlock them). WAL mode is persistent, so a retry finds it set; retried for up to
        busy_timeout, as any other lock wait."""
        deadline = time.monotonic() + self._busy_timeout_s
        delay = 0.002
        while True:
            # isolation_level None: no implicit BEGIN; transactions are explicit below.
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
            try:
                for pragma in self._pragmas:
                    conn.execute(pragma)
            except sqlite3.OperationalError as exc:
                conn.close()
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            except BaseException:
                conn.close()
                raise
            else:
                return conn
            time.sleep(delay)  # this worker's own thread: nothing else waits on it yet
            delay = min(delay * 2, 0.1)

    async def open(self) -> None:
        if self._writer is not None:
            return
        create_private(Path(self._path))  # before sqlite3 makes the file with the umask's mode
        # One after the other: the writer's `journal_mode=WAL` on a new file needs the file
        # to itself, and a racing connect got SQLITE_BUSY without the busy handler (measured).
        writer = _Worker("fleetwire-sqlite-writer", self._connect)
        try:
            await writer.opened()
        except Exception as exc:
            _raise_translated(exc)
        reader = _Worker("fleetwire-sqlite-reader", self._connect)
        try:
            await reader.opened()
        except Exception as exc:
            writer.stop()
            _raise_translated(exc)
        self._writer, self._reader = writer, reader

    async def close(self) -> None:
        writer, reader, self._writer, self._reader = self._writer, self._reader, None, None
        for worker in (writer, reader):
            if worker is not None:
                worker.stop()

    async def read(self, fn: TxFunction[T], *, snapshot: bool = False) -> T:
        reader = self._reader
        if reader is None:
            raise StoreUnavailableError("the store is closed")
        try:
            return await reader.submit(partial(_run_read, fn=fn, snapshot=snapshot))
        except Exception as exc:
            _raise_translated(exc)

    async def write(self, fn: TxFunction[T]) -> T:
        writer = self._writer
        if writer is None:
            raise StoreUnavailableError("the store is closed")
        try:
            return await writer.submit(partial(_run_write, fn=fn, slow_s=self._slow_write_s))
        except Exception as exc:
            _raise_translated(exc)


def _run_read(conn: sqlite3.Connection, fn: TxFunction[T], snapshot: bool) -> T:
    if not snapshot:  # one statement is a snapshot by itself (autocommit)
        return drive(fn(_SqliteTx(conn)))
    conn.execute("BEGIN")
    try:
        return drive(fn(_SqliteTx(conn)))
    finally:
        conn.execute("COMMIT")


def _run_write(conn: sqlite3.Connection, fn: TxFunction[T], slow_s: float) -> T:
    # IMMEDIATE: take the write lock now (one writer at a time, no upgrade deadlock between
    # processes), waiting up to busy_timeout for another process's transaction.
    started = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = drive(fn(_SqliteTx(conn)))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    statements = time.perf_counter()
    conn.execute("COMMIT")
    _log_if_slow(started, slow_s, statements)
    return result


def _log_if_slow(started: float, slow_s: float, statements: float | None = None) -> None:
    """A write transaction over `slow_s` is logged: every write waits behind it (a stall of
    the event-history trim, 5-25 ms, was found this way: issue 12). `statements`: when the
    statements ended, so that the COMMIT (the fsync, a checkpoint) shows apart."""
    ended = time.perf_counter()
    if ended - started < slow_s:
        return
    if statements is None:
        log.warning("slow write transaction: %.1f ms", (ended - started) * 1000)
    else:
        log.warning(
            "slow write transaction: %.1f ms (statements %.1f ms, COMMIT %.1f ms)",
            (ended - started) * 1000,
            (statements - started) * 1000,
            (ended - statements) * 1000,
        )


# -- PostgreSQL ----------------------------------------------------------------------------

_NUMBERED: Final[dict[str, str]] = {}  # `?` SQL -> `$n` SQL, per statement text


def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, …` (the SQL never holds a literal `?`)."""
    found = _NUMBERED.get(sql)
    if found is None:
        parts = sql.split("?")
        found = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
        _NUMBERED[sql] = found
    return found


class _PgTx:
    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute(numbered(sql), *args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        rows: list[Row] = await self._conn.fetch(numbered(sql), *args)
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = await self._conn.fetchrow(numbered(sql), *args)
        return row

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(numbered(sql), rows)

    async def copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        # COPY beats executemany at every size measured (4 to 40 000 rows, 2-2.5x from 400 on).
        await self._conn.copy_records_to_table(table, records=rows, columns=list(columns))


async def _keep_session(_conn: Any) -> None:
    """No RESET ALL round trip when a connection goes back to the pool (~250 µs of CPU per
    acquire, measured): SqlStore never changes session state (no SET, LISTEN or session
    locks), and every transaction is closed by its context manager."""


class PostgresDatabase:
    """An asyncpg pool; statements are prepared and cached per connection by asyncpg."""

    def __init__(
        self, dsn: str, *, slow_write_ms: float, pool_size: int = 10, timeout_s: float = 10.0
    ) -> None:
        self._dsn = dsn
        self._slow_write_s = slow_write_ms / 1000
        self._pool_size = pool_size
        self._timeout_s = timeout_s
        self._pool: Any = None

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self._pool_size, timeout=self._timeout_s, reset=_keep_session
            )
        except Exception as exc:
            _raise_translated(exc)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def read(self, fn: TxFunction[T], *, snapshot: bool = False) -> T:
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError("the store is closed")
        try:
            async with pool.acquire(timeout=self._timeout_s) as conn:
                if not snapshot:
                    return await fn(_PgTx(conn))
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    return await fn(_PgTx(conn))
        except Exception as exc:
            _raise_translated(exc)

    async def write(self, fn: TxFunction[T]) -> T:
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError("the store is closed")
        started = time.perf_counter()
        try:
            async with pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
                result = await fn(_PgTx(conn))
        except Exception as exc:
            _raise_translated(exc)
        _log_if_slow(started, self._slow_write_s)  # waiting for a connection included
        return result
