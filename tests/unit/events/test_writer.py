"""GroupWriter on a real SQLite SqlStore: grouping, ordering, backpressure, failures, stop."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import cast

import anyio
import pytest

from fleetwire.domain.commands import Command, CommandState
from fleetwire.domain.devices import Device
from fleetwire.domain.events import Event
from fleetwire.domain.telemetry import Record
from fleetwire.events.writer import GroupWriter
from fleetwire.store.base import (
    CreateCommand,
    DeleteDevice,
    EventWrite,
    RegisterDevice,
    Store,
    StoreUnavailableError,
    TelemetryWrite,
    TransitionCommand,
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
    for kwargs in ({"max_queue": 0}, {"max_batch": 0}, {"max_records": 0}, {"max_pipeline": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            GroupWriter(store, lambda events: None, **kwargs)


def test_linger_limits_are_checked(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'x.db'}")
    for kwargs in ({"linger_turns": -1}, {"linger_ops": 0}):
        with pytest.raises(ValueError, match="linger_turns must be at least 0"):
            GroupWriter(store, lambda events: None, **kwargs)


async def _submit_over_turns(writer: GroupWriter, turns: int) -> list[WriteResult]:
    """One op per loop turn, from a task that yields between submits (connections whose
    requests arrive in successive turns of a busy loop)."""

    async def one_per_turn() -> list[asyncio.Future[WriteResult]]:
        futures = []
        for i in range(turns):
            future = writer.submit_nowait(_event(i, "d1" if i % 2 else "d2"))
            assert future is not None
            futures.append(future)
            await asyncio.sleep(0)
        return futures

    return list(await asyncio.gather(*await one_per_turn()))


@pytest.mark.parametrize("linger_turns", [0, 8])
async def test_lingering_turns_gather_the_ops_of_the_next_turns(store: GatedStore, linger_turns: int) -> None:
    """With lingering, ops submitted over the next few loop turns share one transaction;
    without, the first turn's op starts a group of its own at once. Counted in turns, never
    in time."""
    writer = GroupWriter(store, lambda events: None, linger_turns=linger_turns)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        results = await _submit_over_turns(writer, 6)
        await writer.stop()
    assert [r.events[0].data["i"] for r in results] == list(range(6))
    groups = [len(call) for call in store.calls]
    assert (groups[0], sum(groups)) == ((6, 6) if linger_turns else (1, 6))


async def test_lingering_ends_when_the_turns_are_spent_or_enough_ops_wait(store: GatedStore) -> None:
    """A lone op is written after `linger_turns` turns (nothing else comes); a queue of
    `linger_ops` starts its group at once."""
    writer = GroupWriter(store, lambda events: None, linger_turns=3, linger_ops=4)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        alone = await writer.submit(_event(0))
        burst = await asyncio.gather(*(writer.submit(_event(i)) for i in range(1, 9)))
        await writer.stop()
    assert alone.events[0].seq == 1
    assert [r.events[0].seq for r in burst] == list(range(2, 10))
    assert [len(call) for call in store.calls] == [1, 8]


# -- pipelining (max_pipeline > 1) ------------------------------------------------------------
# A Store whose write() calls each wait until the test commits or fails them: which groups
# are in flight at once, and in which order they finish, is the test's choice, not timing's.


class _Call:
    """One store.write call, held until the test settles it."""

    def __init__(self, ops: list[WriteOp]) -> None:
        self.ops = ops
        self.outcome: asyncio.Future[list[WriteResult]] = asyncio.get_running_loop().create_future()

    def commit(self) -> None:
        self.outcome.set_result([WriteResult(events=[_committed(op)]) for op in self.ops])

    def fail(self, exc: BaseException) -> None:
        self.outcome.set_exception(exc)


def _committed(op: WriteOp) -> Event:
    """The event a committed op reports (identified by its data; seqs are not this store's job)."""
    if isinstance(op, EventWrite):
        return Event(op.device_id, 0, op.name, op.at_ms, op.data)
    if isinstance(op, CreateCommand):
        return Event(op.command.device_id, 0, "command.updated", 0, {"i": op.command.id})
    if isinstance(op, TransitionCommand):
        return Event(op.device_id, 0, "command.updated", op.at_ms, {"i": op.command_id})
    assert isinstance(op, RegisterDevice)
    return Event(op.device.id, 0, "device.registered", op.at_ms, {"i": op.device.id})


class HeldStore:
    """The one Store method GroupWriter calls; every call is kept in `calls` and held."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        call = _Call(list(ops))
        self.calls.append(call)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await call.outcome
        finally:
            self.in_flight -= 1

    def ids(self, index: int) -> list[object]:
        """The `i` of each op of call `index` (device ids for RegisterDevice)."""
        return [_committed(op).data["i"] for op in self.calls[index].ops]


def _held_writer(store: HeldStore, on_committed: Callable[[list[Event]], None], **kwargs: int) -> GroupWriter:
    writer = GroupWriter(cast("Store", store), on_committed, **kwargs)  # HeldStore has only write()
    writer.start()
    return writer


def _own(i: int) -> EventWrite:
    """An event of a device of its own (devices never conflict)."""
    return _event(i, f"dev-{i}")


def _ids(events: list[Event]) -> list[object]:
    return [e.data["i"] for e in events]


async def _settled(futures: list[asyncio.Future[WriteResult]]) -> list[object]:
    """Each future's `i`, or its exception's type."""
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    return [type(o) if isinstance(o, BaseException) else o.events[0].data["i"] for o in outcomes]


def _submit_all(writer: GroupWriter, ops: list[WriteOp]) -> list[asyncio.Future[WriteResult]]:
    futures = [writer.submit_nowait(op) for op in ops]
    assert all(f is not None for f in futures)
    return cast("list[asyncio.Future[WriteResult]]", futures)


async def test_log_groups_overlap_up_to_max_pipeline() -> None:
    """With max_pipeline=2 two full log groups are in store.write at once, a third waits for
    a slot; when the first is delivered the third starts."""
    store, published = HeldStore(), []
    writer = _held_writer(store, published.extend, max_pipeline=2, max_batch=2)
    with anyio.fail_after(LIMIT_S):
        futures = _submit_all(writer, [_own(i) for i in range(6)])
        await _until(lambda: len(store.calls) == 2)
        assert store.in_flight == 2
        assert [store.ids(0), store.ids(1)] == [[0, 1], [2, 3]]
        assert writer.queued == 2
        for _ in range(50):  # the third group does not start while two are in flight
            await asyncio.sleep(0)
        assert len(store.calls) == 2
        store.calls[0].commit()
        await _until(lambda: len(store.calls) == 3)
        assert store.ids(2) == [4, 5]
        store.calls[1].commit()
        store.calls[2].commit()
        assert await _settled(futures) == [0, 1, 2, 3, 4, 5]
        await writer.stop()
    assert store.most_in_flight == 2
    assert _ids(published) == [0, 1, 2, 3, 4, 5]


async def test_a_group_that_commits_first_is_delivered_after_the_groups_started_before_it() -> None:
    """The second group commits first: nothing of it is published or acked until the first
    group is; on_committed runs in start order, each group's acks right after its events."""
    store = HeldStore()
    log: list[str] = []
    futures: list[asyncio.Future[WriteResult]] = []

    def on_committed(events: list[Event]) -> None:
        acked = [i for i, f in enumerate(futures) if f.done()]
        log.append(f"published {_ids(events)} with {acked} acked")

    writer = _held_writer(store, on_committed, max_pipeline=2, max_batch=2)
    with anyio.fail_after(LIMIT_S):
        futures.extend(_submit_all(writer, [_own(i) for i in range(4)]))
        await _until(lambda: len(store.calls) == 2)
        store.calls[1].commit()
        for _ in range(50):
            await asyncio.sleep(0)
        assert log == []
        assert not any(f.done() for f in futures)
        store.calls[0].commit()
        assert await _settled(futures) == [0, 1, 2, 3]
        await writer.stop()
    assert log == ["published [0, 1] with [] acked", "published [2, 3] with [0, 1] acked"]


async def test_a_device_is_never_in_two_groups_in_flight() -> None:
    """An op of a device whose group is in flight stays queued (other devices' ops go ahead),
    so concurrent transactions can never reorder one device's seqs."""
    store, published = HeldStore(), []
    writer = _held_writer(store, published.extend, max_pipeline=3, max_batch=2)
    ops: list[WriteOp] = [_event(0, "a"), _event(1, "b"), _event(2, "a"), _event(3, "c"), _event(4, "d")]
    with anyio.fail_after(LIMIT_S):
        futures = _submit_all(writer, ops)
        await _until(lambda: len(store.calls) == 2)
        assert [store.ids(0), store.ids(1)] == [[0, 1], [3, 4]]  # op 2 (device a) waits
        assert writer.queued == 1
        store.calls[0].commit()
        for _ in range(50):  # a is free now, but a group of one is not full: it waits
            await asyncio.sleep(0)
        assert len(store.calls) == 2
        store.calls[1].commit()
        await _until(lambda: len(store.calls) == 3)
        assert store.ids(2) == [2]
        store.calls[2].commit()
        assert await _settled(futures) == [0, 1, 2, 3, 4]
        await writer.stop()
    assert _ids(published) == [0, 1, 3, 4, 2]
    assert [e.data["i"] for e in published if e.device_id == "a"] == [0, 2]


async def test_a_group_with_a_non_log_op_never_overlaps_another() -> None:
    """A RegisterDevice waits until nothing is in flight (log ops before it may still go),
    and while its group runs nothing else starts, however many slots are free."""
    store, published = HeldStore(), []
    writer = _held_writer(store, published.extend, max_pipeline=3, max_batch=2)
    ops: list[WriteOp] = [_own(0), _own(1), RegisterDevice(Device("reg"), 100), _own(3), _own(4), _own(5)]
    with anyio.fail_after(LIMIT_S):
        futures = _submit_all(writer, ops)
        await _until(lambda: len(store.calls) == 1)
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(store.calls) == 1  # the registry op is at the head: nothing beside
        store.calls[0].commit()
        await _until(lambda: len(store.calls) == 2)
        assert store.ids(1) == ["reg", 3]
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(store.calls) == 2  # ops 4, 5 make a full log group, yet it waits
        assert writer.queued == 2
        store.calls[1].commit()
        await _until(lambda: len(store.calls) == 3)
        store.calls[2].commit()
        assert await _settled(futures) == [0, 1, "reg", 3, 4, 5]
        await writer.stop()
    assert store.most_in_flight == 1
    assert _ids(published) == [0, 1, "reg", 3, 4, 5]


async def test_a_log_group_waits_for_a_registry_group_in_flight() -> None:
    """The registry op is first: its group runs alone; the full log group behind it starts
    only once it is delivered."""
    store, published = HeldStore(), []
    writer = _held_writer(store, published.extend, max_pipeline=2, max_batch=1)
    with anyio.fail_after(LIMIT_S):
        futures = _submit_all(writer, [RegisterDevice(Device("reg"), 100), _own(1), _own(2)])
        await _until(lambda: len(store.calls) == 1)
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(store.calls) == 1
        store.calls[0].commit()
        await _until(lambda: len(store.calls) == 3)
        assert store.in_flight == 2  # the two log groups overlap again
        store.calls[2].commit()
        store.calls[1].commit()
        assert await _settled(futures) == ["reg", 1, 2]
        await writer.stop()
    assert _ids(published) == ["reg", 1, 2]


async def test_an_outage_of_an_earlier_group_keeps_a_later_groups_acks_in_order() -> None:
    """Each group is its own transaction: the first fails (StoreUnavailableError) after the
    second committed; the first's ops fail, then the second is published and acked."""
    store = HeldStore()
    log: list[tuple[list[object], list[str]]] = []
    futures: list[asyncio.Future[WriteResult]] = []

    def on_committed(events: list[Event]) -> None:
        states = ["open" if not f.done() else "failed" if f.exception() else "acked" for f in futures]
        log.append((_ids(events), states))

    writer = _held_writer(store, on_committed, max_pipeline=2, max_batch=2)
    with anyio.fail_after(LIMIT_S):
        futures.extend(_submit_all(writer, [_own(i) for i in range(4)]))
        await _until(lambda: len(store.calls) == 2)
        store.calls[1].commit()
        store.calls[0].fail(StoreUnavailableError("connection refused"))
        outcomes = await _settled(futures)
        await writer.stop()
    assert outcomes == [StoreUnavailableError, StoreUnavailableError, 2, 3]
    # Published once the first group's ops had failed, before its own acks.
    assert log == [([2, 3], ["failed", "failed", "open", "open"])]
    assert len(store.calls) == 2  # an outage is not retried op by op
    assert writer.healthy


async def test_a_poisoned_earlier_group_is_retried_and_delivered_before_a_later_one() -> None:
    """The first group fails with TypeError after the second committed: its ops are written
    one at a time (the bad one fails alone), and only then is the second group delivered."""
    store, published = HeldStore(), []
    writer = _held_writer(store, published.extend, max_pipeline=2, max_batch=2)
    with anyio.fail_after(LIMIT_S):
        futures = _submit_all(writer, [_own(i) for i in range(4)])
        await _until(lambda: len(store.calls) == 2)
        store.calls[1].commit()
        store.calls[0].fail(TypeError("a dict is no telemetry value"))
        await _until(lambda: len(store.calls) == 3)
        assert store.ids(2) == [0]
        store.calls[2].commit()
        await _until(lambda: len(store.calls) == 4)
        assert store.ids(3) == [1]
        assert _ids(published) == [0]  # the first group is at the head: delivered as it goes
        assert not futures[2].done()
        store.calls[3].fail(TypeError("a dict is no telemetry value"))
        outcomes = await _settled(futures)
        await writer.stop()
    assert outcomes == [0, TypeError, 2, 3]
    assert _ids(published) == [0, 2, 3]


async def test_stop_waits_for_every_group_in_flight() -> None:
    """stop() writes what is queued and returns only when every group is delivered."""
    store, published = HeldStore(), []
    writer = _held_writer(store, published.extend, max_pipeline=2, max_batch=2)
    with anyio.fail_after(LIMIT_S):
        futures = _submit_all(writer, [_own(i) for i in range(6)])
        await _until(lambda: len(store.calls) == 2)
        stopping = asyncio.create_task(writer.stop())
        await asyncio.sleep(0)
        with pytest.raises(StoreUnavailableError):
            await writer.submit(_own(99))
        store.calls[1].commit()
        store.calls[0].commit()
        await _until(lambda: len(store.calls) == 3)  # the queued ops are still written
        for _ in range(50):
            await asyncio.sleep(0)
        assert not stopping.done()
        store.calls[2].commit()
        await stopping
        assert await _settled(futures) == [0, 1, 2, 3, 4, 5]
    assert _ids(published) == [0, 1, 2, 3, 4, 5]


async def test_one_group_at_a_time_by_default() -> None:
    """max_pipeline=1 (the default): a full group waits for the one in flight, as before."""
    store, published = HeldStore(), []
    writer = _held_writer(store, published.extend, max_batch=2)
    with anyio.fail_after(LIMIT_S):
        futures = _submit_all(writer, [_own(i) for i in range(4)])
        await _until(lambda: len(store.calls) == 1)
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(store.calls) == 1
        assert writer.queued == 2
        store.calls[0].commit()
        await _until(lambda: len(store.calls) == 2)
        store.calls[1].commit()
        assert await _settled(futures) == [0, 1, 2, 3]
        await writer.stop()
    assert store.most_in_flight == 1


async def test_pipelined_groups_keep_each_devices_seqs_in_submission_order(store: GatedStore) -> None:
    """On a real SqlStore, 200 events of two devices through three lanes of small groups:
    every device's events are published and acked in submission order, seqs 1, 2, 3, …"""
    published: list[Event] = []
    writer = GroupWriter(store, published.extend, max_pipeline=3, max_batch=4)
    writer.start()
    with anyio.fail_after(LIMIT_S):
        ops = [_event(i, "d1" if i % 3 else "d2") for i in range(200)]
        results = await asyncio.gather(*(writer.submit(op) for op in ops))
        await writer.stop()
    for device_id in ("d1", "d2"):
        mine = [e for e in published if e.device_id == device_id]
        assert [e.seq for e in mine] == list(range(1, len(mine) + 1))
        assert _ids(mine) == [op.data["i"] for op in ops if op.device_id == device_id]
    assert [r.events[0].data["i"] for r in results] == list(range(200))


def _create(command_id: str, device_id: str) -> CreateCommand:
    return CreateCommand(
        Command(command_id, device_id, "reboot", {}, CommandState.SENT, 0, 30_000, "alice", sent_at_ms=0)
    )


async def test_command_groups_overlap_when_the_store_writes_concurrently() -> None:
    """overlap_commands (PostgreSQL): a command op of another device starts beside the group
    in flight at once, full or not; one of a device in flight waits for that group, as log
    ops do, and starts when it is delivered."""
    store, published = HeldStore(), []
    writer = _held_writer(store, published.extend, max_pipeline=2, max_batch=10, overlap_commands=True)
    with anyio.fail_after(LIMIT_S):
        first = _submit_all(writer, [_create("c1", "a")])
        await _until(lambda: len(store.calls) == 1)
        second = _submit_all(writer, [TransitionCommand("b", "c2", CommandState.SUCCEEDED, 5)])
        await _until(lambda: len(store.calls) == 2)
        assert store.in_flight == 2
        third = _submit_all(writer, [TransitionCommand("a", "c1", CommandState.SUCCEEDED, 6)])
        store.calls[1].commit()  # delivered only after the first: device a stays busy till then
        store.calls[0].commit()
        await _until(lambda: len(store.calls) == 3)
        assert store.ids(2) == ["c1"]
        store.calls[2].commit()
        assert await _settled(first + second + third) == ["c1", "c2", "c1"]
        await writer.stop()
    assert [store.ids(i) for i in range(3)] == [["c1"], ["c2"], ["c1"]]
    assert _ids(published) == ["c1", "c2", "c1"]


async def test_command_groups_run_alone_when_the_store_writes_in_turn() -> None:
    """Without overlap_commands (SQLite, memory) a group holding a command op runs alone: the
    second command waits for the first group, then goes in the next one."""
    store, published = HeldStore(), []
    writer = _held_writer(store, published.extend, max_pipeline=2, max_batch=10)
    with anyio.fail_after(LIMIT_S):
        first = _submit_all(writer, [_create("c1", "a")])
        await _until(lambda: len(store.calls) == 1)
        second = _submit_all(writer, [TransitionCommand("b", "c2", CommandState.SUCCEEDED, 5)])
        store.calls[0].commit()
        await _until(lambda: len(store.calls) == 2)
        store.calls[1].commit()
        assert await _settled(first + second) == ["c1", "c2"]
        await writer.stop()
    assert store.most_in_flight == 1
    assert _ids(published) == ["c1", "c2"]
