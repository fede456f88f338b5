"""Process CPU per Store call (all threads, µs), one call at a time: what a handshake, a
command or a telemetry write costs in the storage layer alone.

    uv run python benchmarks/store_ops.py                      # SQLite in a temp dir
    uv run python benchmarks/store_ops.py --url postgresql://postgres@127.0.0.1:5432/bench_ops

For PostgreSQL the figure is this process only; the backend's CPU is not in it. The target
database should be empty (a fresh file, or a database this script may fill).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fleetwire.domain.commands import Command, CommandState
from fleetwire.domain.devices import Device
from fleetwire.domain.telemetry import Record, Value
from fleetwire.store.base import CreateCommand, TelemetryWrite, TransitionCommand
from fleetwire.store.sql import SqlStore


async def _cpu_per_call(n: int, call: Callable[[int], Awaitable[object]]) -> float:
    """Median of 3 runs of `n` sequential calls: process CPU µs per call."""
    runs = []
    for run in range(3):
        start = time.process_time()
        for i in range(n):
            await call(run * n + i)
        runs.append((time.process_time() - start) / n * 1e6)
    return statistics.median(runs)


def _command(i: int, prefix: str) -> Command:
    return Command(
        id=f"{prefix}{i:08d}",
        device_id="dev-0",
        name="reboot",
        params={"delay": 5},
        state=CommandState.PENDING,
        issued_at_ms=1000,
        expires_at_ms=10**13,
        issuer="bench",
    )


async def main(url: str, n: int) -> None:
    store = SqlStore(url, history=100_000)
    await store.open()
    try:
        await store.create_device(Device("dev-0", created_at_ms=1, updated_at_ms=1))
        values: dict[str, Value] = {"t": 21.5, "h": 40, "on": True, "mode": "eco"}
        figures = {
            "get_device": await _cpu_per_call(n, lambda i: store.get_device("dev-0")),
            "create_command (Store)": await _cpu_per_call(
                n, lambda i: store.create_command(_command(i, "a"))
            ),
            "CreateCommand (write op)": await _cpu_per_call(
                n, lambda i: store.write([CreateCommand(_command(i, "b"))])
            ),
            "TransitionCommand (write op)": await _cpu_per_call(
                n, lambda i: store.write([TransitionCommand("dev-0", f"b{i:08d}", CommandState.SENT, 2000)])
            ),
            "pending_commands (none)": await _cpu_per_call(n, lambda i: store.pending_commands("ghost", 0)),
            "telemetry, 1 record x 4 keys": await _cpu_per_call(
                n, lambda i: store.write([TelemetryWrite("dev-0", [Record(10_000 + i, values)])])
            ),
        }
        batch = [Record(1_000_000 + j, values) for j in range(100)]
        per_batch = await _cpu_per_call(
            max(n // 20, 10), lambda i: store.write([TelemetryWrite("dev-0", batch)])
        )
        figures["telemetry per record, batch of 100 x 4 keys"] = per_batch / 100
        print(f"{store.dialect}: process CPU per call, µs (median of 3 x {n})")
        for name, micros in figures.items():
            print(f"  {name:46s} {micros:8.1f}")
    finally:
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="database URL (default: SQLite in a temp dir)")
    parser.add_argument("-n", type=int, default=2000, help="calls per run (default 2000)")
    args = parser.parse_args()
    if args.url:
        asyncio.run(main(args.url, args.n))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"sqlite:///{Path(tmp) / 'ops.db'}", args.n))
