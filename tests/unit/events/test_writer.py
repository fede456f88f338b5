"""GroupWriter on a real SQLite SqlStore: grouping, ordering, backpressure, failures, stop."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import pytest

from fleetwire.domain.devices import Device
from fleetwire.domain.events import Event
from fleetwire.domain.telemetry import Record
from fleetwire.events.writer import GroupWriter
from fleetwire.store.base import (
    DeleteDevice,
    EventWrite,
    RegisterDevice,
    StoreUnavailableError,
    TelemetryWrite,
    WriteOp,
    WriteResult,
)
from fleetwire.store.sql import SqlStore

pytestmark = pytest.mark.anyio

LIMIT_S = 10


class GatedStore(SqlStore):
    """A real SqlStore that records each write() call and can hold writes at a gate.

    While `gate` is clear, write() waits before touching the database, so that tests can
    pile submissions up behind a transaction in flight. `entered` is set on each call.
    """

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls: list[list[WriteOp]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        self.calls.append(list(ops))
        self.entered.set()
        await self.gate.wait()
        return await super().write(ops)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[GatedStore]:
    gated = GatedStore(f"sqlite:///{tmp_path / 'w.db'}?busy_timeout=50")
    with anyio.fail_after(LIMIT_S):
        await gated.open()
        for device_id in ("d1", "d2"):
            await gated.create_device(Device(device_id, created_at_ms=1, updated_at_ms=1))
    try:
        yield gated
    finally:
        with anyio.fail_after(LIMIT_S):
            await gated.close()


def _event(i: int, device_id: str = "d1") -> EventWrite:
    return EventWrite(device_id, "device.connected", i, {"i": i})


async def _until(condition: object, *, spins: int = 1000) -> None:
    """Let other tasks run until `condition()` holds (no wall-clock sleeps)."""
    for _ in range(spins):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def _hold_first_transaction(store: GatedStore, writer: GroupWriter) -> asyncio.Task[WriteResult]:
    """Submit one op and wait until its write() is in flight, held at the closed gate."""
    store.gate.clear()
    store.entered.clear()
    first = asyncio.create_task(writer.submit(_event(0)))
    await store.entered.wait()
    return first


async def test_concurrent_submits_share_one_transaction(store: GatedStore) -> None:
    """Ops submitted while a transaction is in flight are written together in the next one."""
    published: list[Event] = []
    writer = GroupWriter(store, published.extend)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        first = await _hold_first_transaction(store, writer)
        rest = [asyncio.create_task(writer.submit(_event(i, "d1" if i % 2 else "d2"))) for i in range(1, 11)]
        await _until(lambda: writer.queued == 10)
        store.gate.set()
        results = await asyncio.gather(first, *rest)
        await writer.stop()
    assert [len(call) for call in store.calls] == [1, 10]
    assert [r.events[0].data["i"] for r in results] == list(range(11))
    assert [(e.device_id, e.seq) for e in published] == [
        ("d1", 1),
        *[
            ("d1", 2),
            ("d2", 1),
            ("d1", 3),
            ("d2", 2),
            ("d1", 4),
            ("d2", 3),
            ("d1", 5),
            ("d2", 4),
            ("d1", 6),
            ("d2", 5),
        ],
    ]


async def test_events_are_published_before_any_ack_and_in_commit_order(store: GatedStore) -> None:
    """on_committed runs once per transaction, before the futures of that transaction resolve."""
    log: list[str] = []
    writer = GroupWriter(
        store, lambda events: log.append("published " + ",".join(str(e.seq) for e in events))
    )
    writer.start()

    async def submit(i: int) -> None:
        result = await writer.submit(_event(i))
        log.append(f"acked {result.events[0].seq}")

    with anyio.fail_after(LIMIT_S):
        store.gate.clear()
        store.entered.clear()
        first = asyncio.create_task(submit(0))
        await store.entered.wait()
        rest = [asyncio.create_task(submit(i)) for i in range(1, 4)]
        await _until(lambda: writer.queued == 3)
        store.gate.set()
        await asyncio.gather(first, *rest)
        await writer.stop()
    assert log == ["published 1", "acked 1", "published 2,3,4", "acked 2", "acked 3", "acked 4"]


async def test_batches_are_capped_by_ops_and_by_records(store: GatedStore) -> None:
    """A batch takes at most max_batch ops and stops once it holds max_records records."""
    writer = GroupWriter(store, lambda events: None, max_batch=3, max_records=250)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        first = await _hold_first_transaction(store, writer)
        small = [asyncio.create_task(writer.submit(_event(i))) for i in range(1, 8)]
        await _until(lambda: writer.queued == 7)
        store.gate.set()
        await asyncio.gather(first, *small)
        assert [len(call) for call in store.calls] == [1, 3, 3, 1]

        store.calls.clear()
        first = await _hold_first_transaction(store, writer)
        records = [Record(i, {"v": i}) for i in range(100)]
        big = [asyncio.create_task(writer.submit(TelemetryWrite("d1", records))) for _ in range(4)]
        await _until(lambda: writer.queued == 4)
        store.gate.set()
        await asyncio.gather(first, *big)
        await writer.stop()
    assert [len(call) for call in store.calls] == [1, 3, 1]  # 300 records reached the 250 cap


async def test_a_full_queue_makes_submit_wait(store: GatedStore) -> None:
    """With max_queue=2, the third waiting submit blocks until the writer takes a batch."""
    writer = GroupWriter(store, lambda events: None, max_queue=2)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        first = await _hold_first_transaction(store, writer)
        queued = [asyncio.create_task(writer.submit(_event(i))) for i in (1, 2)]
        blocked = asyncio.create_task(writer.submit(_event(3)))
        await _until(lambda: writer.queued == 2)
        for _ in range(50):
            await asyncio.sleep(0)
        assert writer.queued == 2  # bounded: the third op is not in the queue
        assert not blocked.done()
        store.gate.set()
        results = await asyncio.gather(first, *queued, blocked)
        await writer.stop()
    assert [r.events[0].seq for r in results] == [1, 2, 3, 4]
    assert sum(len(call) for call in store.calls) == 4


async def test_a_failed_transaction_fails_every_op_of_it_and_the_writer_goes_on(
    store: GatedStore, tmp_path: Path
) -> None:
    """A locked database (StoreUnavailableError): every op of that batch fails, none is stored."""
    published: list[Event] = []
    writer = GroupWriter(store, published.extend)
    writer.start()
    locker = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    try:
        with anyio.fail_after(LIMIT_S):
            first = await _hold_first_transaction(store, writer)
            rest = [asyncio.create_task(writer.submit(_event(i))) for i in (1, 2)]
            await _until(lambda: writer.queued == 2)
            locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            store.gate.set()
            outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
            assert [type(o) for o in outcomes] == [
                StoreUnavailableError,
                StoreUnavailableError,
                StoreUnavailableError,
            ]
            assert published == []
            locker.execute("ROLLBACK")
            result = await writer.submit(_event(9))
            await writer.stop()
    finally:
        locker.close()
    assert result.events[0].seq == 1  # nothing of the failed batches was written
    assert [e.data["i"] for e in published] == [9]
    assert [e.seq for e in await store.events("d1", 0, 10)] == [1]


async def test_a_poisoned_op_fails_alone_and_the_rest_of_its_batch_commits(store: GatedStore) -> None:
    """A dict where a telemetry value belongs (a bug upstream) fails only its own op.

    The batch's transaction fails with TypeError; the writer then writes the ops one at a
    time, so the good ones commit, are published in order and are acked.
    """
    published: list[Event] = []
    writer = GroupWriter(store, published.extend)
    writer.start()
    poisoned = TelemetryWrite("d1", [Record(5, {"t": {"nested": 1}})])  # type: ignore[dict-item]  # the bug under test
    with anyio.fail_after(LIMIT_S):
        first = await _hold_first_transaction(store, writer)
        good_before = asyncio.create_task(writer.submit(_event(1)))
        bad = asyncio.create_task(writer.submit(poisoned))
        good_after = asyncio.create_task(writer.submit(_event(2, "d2")))
        await _until(lambda: writer.queued == 3)
        store.gate.set()
        outcomes = await asyncio.gather(first, good_before, bad, good_after, return_exceptions=True)
        await writer.stop()
    assert isinstance(outcomes[2], TypeError)
    assert str(outcomes[2]) == "telemetry value of 't' must be a number, a boolean or a string, not dict"
    assert [(e.device_id, e.seq, e.data) for e in published] == [
        ("d1", 1, {"i": 0}),
        ("d1", 2, {"i": 1}),
        ("d2", 1, {"i": 2}),
    ]
    assert [[e.seq for e in o.events] for o in outcomes if isinstance(o, WriteResult)] == [[1], [2], [1]]
    # The batch of three, then each op of it alone.
    assert [len(call) for call in store.calls] == [1, 3, 1, 1, 1]
    assert [e.seq for e in await store.events("d1", 0, 10)] == [1, 2]
    assert await store.telemetry("d1", key=None, from_ms=None, to_ms=None, limit=10) == []


async def test_an_outage_still_fails_the_whole_batch_without_retries(
    store: GatedStore, tmp_path: Path
) -> None:
    """StoreUnavailableError is no poisoned op: the batch fails at once, nothing is retried."""
    writer = GroupWriter(store, lambda events: None)
    writer.start()
    locker = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    try:
        with anyio.fail_after(LIMIT_S):
            first = await _hold_first_transaction(store, writer)
            rest = [asyncio.create_task(writer.submit(_event(i))) for i in (1, 2)]
            await _until(lambda: writer.queued == 2)
            locker.execute("BEGIN IMMEDIATE")
            store.gate.set()
            outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
            locker.execute("ROLLBACK")
            await writer.stop()
    finally:
        locker.close()
    assert [type(o) for o in outcomes] == [StoreUnavailableError] * 3
    assert [len(call) for call in store.calls] == [1, 2]  # the batch of two, not retried alone


async def test_a_closed_store_fails_submits_until_reopened(store: GatedStore) -> None:
    """After store.close() submits raise StoreUnavailableError; after open() they succeed."""
    writer = GroupWriter(store, lambda events: None)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        await store.close()
        with pytest.raises(StoreUnavailableError):
            await writer.submit(_event(1))
        await store.open()
        result = await writer.submit(_event(2))
        await writer.stop()
    assert result.events[0].seq == 1


async def test_stop_drains_the_queue_then_refuses(store: GatedStore) -> None:
    """stop() writes everything queued before it returns; later submits are refused."""
    writer = GroupWriter(store, lambda events: None)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        first = await _hold_first_transaction(store, writer)
        rest = [asyncio.create_task(writer.submit(_event(i))) for i in range(1, 6)]
        await _until(lambda: writer.queued == 5)
        stopping = asyncio.create_task(writer.stop())
        await asyncio.sleep(0)  # one turn: stop() marks the writer as closing, then waits
        with pytest.raises(StoreUnavailableError):
            await writer.submit(_event(99))
        store.gate.set()
        results = await asyncio.gather(first, *rest)
        await stopping
        with pytest.raises(StoreUnavailableError):
            await writer.submit(_event(100))
    assert [r.events[0].seq for r in results] == [1, 2, 3, 4, 5, 6]
    assert writer.queued == 0


async def test_stop_of_an_idle_writer_returns(store: GatedStore) -> None:
    """An empty, waiting writer stops at once; stopping twice is harmless."""
    writer = GroupWriter(store, lambda events: None)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        assert (await writer.submit(_event(1))).events[0].seq == 1
        await writer.stop()
        await writer.stop()
    assert store.calls == [[_event(1)]]


async def test_a_cancelled_submitter_does_not_disturb_its_batch(store: GatedStore) -> None:
    """Cancelling one waiting submit leaves the others' results intact (its op is still written)."""
    writer = GroupWriter(store, lambda events: None)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        first = await _hold_first_transaction(store, writer)
        doomed = asyncio.create_task(writer.submit(_event(1)))
        kept = asyncio.create_task(writer.submit(_event(2)))
        await _until(lambda: writer.queued == 2)
        doomed.cancel()
        store.gate.set()
        assert (await first).events[0].seq == 1
        assert (await kept).events[0].seq == 3
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await writer.stop()


async def test_a_failing_callback_does_not_lose_acks(store: GatedStore) -> None:
    """on_committed raising is logged; the committed ops are still acknowledged."""

    def explode(events: list[Event]) -> None:
        raise RuntimeError("subscriber bug")

    writer = GroupWriter(store, explode)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        result = await writer.submit(_event(1))
        await writer.stop()
    assert result.events[0].seq == 1


async def test_registry_ops_are_published_in_commit_order(store: GatedStore) -> None:
    """Register, event, delete in one batch: published in that order with consecutive seqs,
    the never-kept `device.deleted` included."""
    published: list[Event] = []
    writer = GroupWriter(store, published.extend)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        first = await _hold_first_transaction(store, writer)
        register = asyncio.create_task(writer.submit(RegisterDevice(Device("d3"), 100)))
        event = asyncio.create_task(writer.submit(_event(1, "d3")))
        delete = asyncio.create_task(writer.submit(DeleteDevice("d3", 200)))
        await _until(lambda: writer.queued == 3)
        store.gate.set()
        results = await asyncio.gather(first, register, event, delete)
        await writer.stop()
    assert [len(call) for call in store.calls] == [1, 3]
    assert [(e.device_id, e.seq, e.name) for e in published] == [
        ("d1", 1, "device.connected"),
        ("d3", 1, "device.registered"),
        ("d3", 2, "device.connected"),
        ("d3", 3, "device.deleted"),
    ]
    assert results[3].device == Device("d3", created_at_ms=100, updated_at_ms=100, seq=2)
    assert await store.get_device("d3") is None


def test_limits_must_be_positive(tmp_path: Path) -> None:
    """A queue or batch of zero would deadlock or never write: refused at construction."""
    store = SqlStore(f"sqlite:///{tmp_path / 'x.db'}")
    for kwargs in ({"max_queue": 0}, {"max_batch": 0}, {"max_records": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            GroupWriter(store, lambda events: None, **kwargs)
