"""Telemetry ingest through GroupWriter → SqlStore: records per second on one core.

    uv run python benchmarks/store_ingest.py                       # SQLite in a temp dir
    uv run python benchmarks/store_ingest.py --url postgresql://postgres@127.0.0.1:5432/bench
    uv run python benchmarks/store_ingest.py --url sqlite:///tmp/b.db?synchronous=normal
    uv run python benchmarks/store_ingest.py --null   # GroupWriter alone, a store that does nothing

Two scenarios, each with many concurrent submitters (one per simulated connection):
- batch:  TelemetryWrite of 100 records with 4 keys each (a `telemetry_batch` message);
- single: TelemetryWrite of 1 record with 4 keys (a `telemetry` message).
The target database should be empty (a fresh file or database); devices bench-0… are created.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fleetwire.domain.devices import Device
from fleetwire.domain.events import Event, RecordRun
from fleetwire.domain.telemetry import Record
from fleetwire.events.writer import GroupWriter
from fleetwire.store.base import TelemetryWrite, WriteOp, WriteResult
from fleetwire.store.sql import SqlStore


class CountingStore(SqlStore):
    """Counts transactions so that the report can show the group-commit batch size."""

    transactions = 0

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        self.transactions += 1
        return await super().write(ops)


class NullStore(CountingStore):
    """Writes nothing: one event per record, as SqlStore returns, to time GroupWriter alone."""

    dialect = "null"

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        self.transactions += 1
        await asyncio.sleep(0)  # a transaction always yields to the loop at least once
        return [
            WriteResult(events=[Event(op.device_id, 0, "device.telemetry", r.ts_ms, {}) for r in op.records])
            for op in ops
            if isinstance(op, TelemetryWrite)
        ]

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def create_device(self, device: Device) -> Device:
        return device


def _records(n: int, start_ts: int) -> list[Record]:
    return [
        Record(start_ts + i, {"temp": 20.0 + i * 0.01, "hum": 41.5, "on": i % 2 == 0, "count": i})
        for i in range(n)
    ]


async def _scenario(
    store: CountingStore, name: str, devices: int, per_op: int, total: int, submitters: int
) -> None:
    published = 0

    def on_committed(events: list[Event | RecordRun]) -> None:
        nonlocal published
        published += sum(len(e.records) if isinstance(e, RecordRun) else 1 for e in events)

    writer = GroupWriter(store, on_committed)
    writer.start()
    ops_total = total // per_op
    ops_each = ops_total // submitters
    base_ts = 1_700_000_000_000

    async def submitter(index: int) -> None:
        device = f"bench-{index % devices}"
        for i in range(ops_each):
            await writer.submit(TelemetryWrite(device, _records(per_op, base_ts + i * per_op)))

    store.transactions = 0
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(submitter(i) for i in range(submitters))), 600)
    elapsed = time.perf_counter() - started
    await writer.stop()
    records = ops_each * submitters * per_op
    assert published == records, (published, records)
    print(
        f"{store.dialect:10} {name:6} {records:>8} records in {elapsed:6.2f} s = {records / elapsed:>9,.0f}"
        f" records/s ({ops_each * submitters / elapsed:>8,.0f} msgs/s, {submitters} submitters,"
        f" {ops_each * submitters / max(store.transactions, 1):.0f} ops/transaction)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="database URL (default: a SQLite file in a temp dir)")
    parser.add_argument("--records", type=int, default=200_000, help="records per scenario")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--submitters", type=int, default=1000)
    parser.add_argument("--scenario", choices=("batch", "single", "both"), default="both")
    parser.add_argument("--null", action="store_true", help="time GroupWriter with a store that does nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        store = NullStore(url) if args.null else CountingStore(url)
        await store.open()
        try:
            for i in range(args.devices):
                await store.create_device(Device(f"bench-{i}"))
            if args.scenario in ("batch", "both"):
                await _scenario(
                    store, "batch", args.devices, 100, args.records, min(args.submitters, args.devices)
                )
            if args.scenario in ("single", "both"):
                await _scenario(store, "single", args.devices, 1, args.records // 2, args.submitters)
        finally:
            await store.close()


if __name__ == "__main__":
    asyncio.run(main())
