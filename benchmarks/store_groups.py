"""CPU of one write group on SQLite, split by statement: what the writer thread spends.

    uv run python benchmarks/store_groups.py                  # commands and telemetry groups
    uv run python benchmarks/store_groups.py --sync FULL      # with the fsync of each COMMIT

The group runs inline on one sqlite3 connection (no thread, no event loop), exactly as the
writer thread runs it: `events.write` inside BEGIN IMMEDIATE … COMMIT. Each figure is thread
CPU (time.thread_time_ns); the run's figure is the minimum over `--runs` runs, the least
disturbed by other load on the machine. Statements are timed by a sqlite3.Connection
subclass (the call that binds and takes the first step); the rest of the group is the Python
of `events.write`, the rows of a RETURNING fetched after that first step, and the subclass's
own wrapper (~1 µs per statement). With every statement answered at once, the Python of a
command group of 4 ops alone measured 68 µs on the machine of benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fleetwire.cli import tune_serving_process
from fleetwire.domain.commands import Command, CommandState
from fleetwire.domain.devices import Device
from fleetwire.domain.telemetry import Record, Value
from fleetwire.store.base import CreateCommand, TelemetryWrite, TransitionCommand, WriteOp
from fleetwire.store.sql import SqlStore, driver, events
from fleetwire.store.sql.dialect import for_url

_STATEMENTS: collections.defaultdict[str, list[int]] = collections.defaultdict(lambda: [0, 0])


class _TimedConnection(sqlite3.Connection):
    """Thread CPU per statement text (its first 48 characters)."""

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        started = time.thread_time_ns()
        try:
            return super().execute(sql, parameters)
        finally:
            _count(sql, started)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        started = time.thread_time_ns()
        try:
            return super().executemany(sql, parameters)
        finally:
            _count("many: " + sql, started)


def _count(sql: str, started: int) -> None:
    figure = _STATEMENTS[sql[:48]]
    figure[0] += 1
    figure[1] += time.thread_time_ns() - started


def _command(i: int, devices: int) -> Command:
    return Command(
        id=f"c{i:010d}",
        device_id=f"dev-{i % devices}",
        name="bench.echo",
        params={"n": i},
        state=CommandState.SENT,  # as issued to a connected device
        issued_at_ms=1000 + i,
        expires_at_ms=10**13,
        issuer="bench",
        issuer_node="node-1",
        issuer_session="session-1",
        sent_at_ms=1000 + i,
        timeout_s=30,
    )


def command_groups(devices: int) -> Callable[[int], list[WriteOp]]:
    """Two creates and the results of the two commands created one group before (what a
    group holds at ~1,000 round trips/s)."""

    def group(g: int) -> list[WriteOp]:
        ops: list[WriteOp] = [
            CreateCommand(_command(2 * g, devices)),
            CreateCommand(_command(2 * g + 1, devices)),
        ]
        for i in (2 * g - 2, 2 * g - 1):
            if i >= 0:
                ops.append(
                    TransitionCommand(
                        f"dev-{i % devices}", f"c{i:010d}", CommandState.SUCCEEDED, 5000, {"n": i}
                    )
                )
        return ops

    return group


def telemetry_groups(devices: int, ops: int = 20, records: int = 100) -> Callable[[int], list[WriteOp]]:
    """`ops` batches of `records` records of 4 keys (the ingest benchmark's record)."""
    values: dict[str, Value] = {"temp": 21.5, "hum": 40.25, "on": True, "count": 7}

    def group(g: int) -> list[WriteOp]:
        ts = 1_700_000_000_000 + g
        return [
            TelemetryWrite(
                f"dev-{(g * ops + j) % devices}", [Record(ts, dict(values)) for _ in range(records)]
            )
            for j in range(ops)
        ]

    return group


async def _fresh_database(path: Path, devices: int) -> None:
    store = SqlStore(f"sqlite:///{path}?synchronous=OFF")
    await store.open()
    try:
        for k in range(devices):
            await store.create_device(Device(f"dev-{k}", created_at_ms=1, updated_at_ms=1))
    finally:
        await store.close()


def measure(
    name: str, make: Callable[[int], list[WriteOp]], unit: int, *, sync: str, groups: int, runs: int
) -> None:
    """Print thread CPU per `unit` (ops or points) of the groups `make` builds, by statement."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "groups.db"
        devices = 200
        asyncio.run(_fresh_database(path, devices))
        database = driver.SqliteDatabase(str(path), synchronous=sync, busy_timeout_ms=1000, slow_write_ms=1e9)
        connect = sqlite3.connect
        # Statements timed: the driver's connect, with this connection class (this process only).
        sqlite3.connect = lambda *a, **k: connect(*a, factory=_TimedConnection, **k)  # type: ignore[assignment]  # the same signature, a lambda
        try:
            conn = database._connect()  # the writer thread's own configuration
        finally:
            sqlite3.connect = connect
        dialect = for_url(f"sqlite:///{path}")
        counter = iter(range(1 << 62))

        def write(ops: Sequence[WriteOp]) -> None:
            driver._run_write(conn, lambda tx: events.write(tx, dialect, ops, 1000), 1e9)

        for _ in range(50):  # warm the caches (pages, prepared statements)
            write(make(next(counter)))
        tune_serving_process(100_000)  # as `fleetwire serve` runs
        per_run: list[float] = []
        statements: dict[str, tuple[int, int]] = {}
        for _ in range(runs):
            _STATEMENTS.clear()
            batches = [make(next(counter)) for _ in range(groups)]
            started = time.thread_time_ns()
            for ops in batches:
                write(ops)
            per_run.append((time.thread_time_ns() - started) / groups)
            if per_run[-1] == min(per_run):
                statements = {sql: (n, ns) for sql, (n, ns) in _STATEMENTS.items()}
        conn.close()
    best = min(per_run)
    in_statements = sum(ns for _, ns in statements.values()) / groups
    print(
        f"{name} (synchronous={sync}): {best / unit / 1000:.2f} µs CPU per {unit_name(name)},"
        f" minimum of {runs}"
    )
    for sql, (n, ns) in sorted(statements.items(), key=lambda kv: -kv[1][1]):
        print(f"  {ns / groups / unit / 1000:8.2f}  {n / groups:5.1f}/group  {sql}")
    print(f"  {(best - in_statements) / unit / 1000:8.2f}  the rest: Python, rows after the first step")


def unit_name(name: str) -> str:
    return "point" if name.startswith("telemetry") else "op"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sync", default="OFF", choices=("OFF", "NORMAL", "FULL"), help="PRAGMA synchronous")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    measure(
        "commands, 2 creates + 2 results", command_groups(200), 4, sync=args.sync, groups=300, runs=args.runs
    )
    measure(
        "telemetry, 20 batches x 100 records",
        telemetry_groups(200),
        2000,
        sync=args.sync,
        groups=10,
        runs=args.runs,
    )


if __name__ == "__main__":
    main()
