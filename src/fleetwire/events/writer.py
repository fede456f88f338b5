"""GroupWriter: group commit in front of `Store.write` (the ingest hot path).

Contract:
- `submit(op)` resolves with the op's WriteResult only after the transaction holding it has
  committed (contract §2.2: an acked record is never lost); if that transaction failed with
  StoreUnavailableError (an outage), every op of it gets that exception and none of it is acked.
- A poisoned op does not take its group down: when `store.write` of a group fails with any
  other exception (a bug, a value the store refuses), nothing of it was written, and the ops
  are written again one at a time, each in its own transaction, in order. Only the op that
  fails alone gets the exception; the others commit and are acked. An outage met during
  those retries fails that op and every op after it, as it would have failed the group.
- The writer takes everything queued (up to `max_batch` ops and about `max_records`
  telemetry records) and writes it as ONE `store.write` call, so a burst of concurrent
  submitters costs one transaction, one fsync.
- `on_committed(events)` is called with all events of a group, in order (a telemetry op's as
  one RecordRun), synchronously,
  after the commit and BEFORE any future of the group resolves: events are published in
  commit order, and an acknowledgement never overtakes its event.
- The queue is bounded (`max_queue` ops). Overflow policy: `submit` waits for space
  (backpressure towards the connections), it never drops and never grows without bound.
- `stop()` refuses new submissions, writes everything already queued, waits for every
  group in flight, then ends the task.

Lingering (`linger_turns` > 0): when nothing is in flight and fewer than `linger_ops` ops are
queued, the writer lets the event loop turn up to `linger_turns` more times before it takes
them. A busy loop's turn is the work of many connections, each of which may submit an op, so
under load a group takes several turns' ops instead of the one or two of the turn that woke
it; an idle loop turns in microseconds, so alone an op waits for nothing. Measured with 100
handshakes in flight (each writes `device.connected`): a group per 4 handshakes, 0.43 ms
CPU per handshake, became 0.31 ms at 8 turns / 64 ops; commands at 1,000/s went from a p99
of 5.5 to 4.7 ms (benchmarks/results.md, session 11).

Pipelining (`max_pipeline` > 1; 1 is one group at a time, the writer awaiting each write):
- Up to `max_pipeline` groups may be in `store.write` at once, each its own transaction
  (PostgreSQL: its own pool connection), so the server goes on parsing while the database
  commits. A group holds its slot from its start until it is delivered (below).
- Only hot-path groups overlap: a group of `TelemetryWrite`, `StatusWrite` and `EventWrite`
  ops, and with `overlap_commands` (a store whose write transactions run concurrently:
  PostgreSQL) `CreateCommand` and `TransitionCommand` ops too: each touches only its own
  device's rows (its device row, its commands, its events), which the rule below keeps out
  of every other group in flight. A group holding any other op (registry, twin, jobs) starts
  only when nothing is in flight, and nothing starts while it runs. When groups are in
  flight, the next group takes lane ops up to the first other op in the queue (that op and
  everything behind it wait their turn, in order).
- No device is in two groups in flight: an op of a device whose group is in flight stays
  queued (with every later op of that device; ops of other devices behind it may go
  first). Concurrent transactions commit in whatever order the database lets them, so this
  is what keeps each device's seq, status and latest values in submission order; events of
  different devices were never ordered among themselves.
- A group starts beside others only when it is full (`max_batch` ops or `max_records`
  records), or when `max_batch` ops of busy devices stand in front: overlapping pays only
  under a backlog, and a small group would hold a slot that a full one could use. A group
  holding a command op starts at once: a command round trip waits on it, and commands come
  a few per group (on PostgreSQL one group at a time held commands to ~600/s, issue 12).
- Delivery (`on_committed`, then the futures) is in the order the groups started: a group
  that commits first waits for those before it. Each group is its own transaction and its
  own outcome stands: when an earlier group fails (an outage, a poisoned op), a later one
  that committed is still delivered and acked, after the earlier one's failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Final

from fleetwire.domain.events import Event, RecordRun
from fleetwire.store.base import (
    LOG_OPS,
    CreateCommand,
    Store,
    StoreUnavailableError,
    TelemetryWrite,
    TransitionCommand,
    WriteOp,
    WriteResult,
)

log = logging.getLogger(__name__)

_Item = tuple[WriteOp, "asyncio.Future[WriteResult]"]
# What one store.write of some items of a group came to: its results, or why it failed.
_Outcome = list[WriteResult] | BaseException
_NEVER: Final = 1 << 62  # a queue length the writer waits for: never (only deliveries help)


class _Group:
    """One transaction's ops, from its start until it is delivered."""

    __slots__ = ("devices", "exclusive", "finished", "items", "parts")

    def __init__(self, items: list[_Item], devices: set[str], exclusive: bool) -> None:
        self.items = items
        self.devices = devices  # the devices of a log group beside others (empty otherwise)
        self.exclusive = exclusive  # holds an op that is no log op: runs alone
        self.finished = False  # its store.write calls are over; its outcome is known
        # Outcomes waiting for the groups started before this one to be delivered.
        self.parts: list[tuple[list[_Item], _Outcome]] = []


class GroupWriter:
    def __init__(
        self,
        store: Store,
        on_committed: Callable[[list[Event | RecordRun]], None],
        *,
        max_queue: int = 10_000,
        max_batch: int = 500,
        max_records: int = 10_000,
        max_pipeline: int = 1,
        overlap_commands: bool = False,
        linger_turns: int = 0,
        linger_ops: int = 64,
    ) -> None:
        if max_queue < 1 or max_batch < 1 or max_records < 1 or max_pipeline < 1:
            raise ValueError("max_queue, max_batch, max_records and max_pipeline must be at least 1")
        if linger_turns < 0 or linger_ops < 1:
            raise ValueError("linger_turns must be at least 0 and linger_ops at least 1")
        self._store = store
        self._on_committed = on_committed
        self._items: deque[_Item] = deque()
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._max_records = max_records
        self._max_pipeline = max_pipeline
        self._overlap_commands = overlap_commands
        self._linger_turns = linger_turns
        self._linger_ops = linger_ops
        self._inflight: deque[_Group] = deque()  # started, not yet delivered; in start order
        self._busy: set[str] = set()  # devices of the lane groups in flight beside others
        self._tasks: set[asyncio.Task[None]] = set()  # group tasks (strong references)
        # The writer waits on `_wake`: a submit sets it once the queue holds `_wake_at` ops,
        # a delivery and stop() always. A comparison per submit, not a scan of the queue.
        self._wake: asyncio.Future[None] | None = None
        self._wake_at = 1
        self._putters: deque[asyncio.Future[None]] = deque()  # submits waiting for room
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._stopped = False
        # False from an outage until a write (or `recovered`) succeeds again: lets callers
        # that do not write (a handshake answered from the cache) refuse during an outage.
        self.healthy = True

    @property
    def queued(self) -> int:
        """Ops waiting for a transaction (not counting the groups being written)."""
        return len(self._items)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fleetwire-group-writer")

    async def stop(self) -> None:
        """Write what is queued, wait for what is in flight, then end; later submits raise
        StoreUnavailableError."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            self._wake_writer()
            await task
        self._stopped = True
        # Items that got in after the writer ended (they waited for room meanwhile).
        items = self._items
        while items:
            _, future = items.popleft()
            if not future.done():
                future.set_exception(StoreUnavailableError("the writer has stopped"))
        while self._putters:  # each sees `_stopped` and raises
            putter = self._putters.popleft()
            if not putter.done():
                putter.set_result(None)

    async def submit(self, op: WriteOp) -> WriteResult:
        future = self.submit_nowait(op)
        if future is None:  # the queue is full: wait for room (backpressure)
            future = await self._put_when_room(op)
        return await future

    def submit_nowait(self, op: WriteOp) -> asyncio.Future[WriteResult] | None:
        """`submit` without a coroutine (the ingest hot path: no task per message): the
        future of the op's result, or None when the queue is full (then `await submit`)."""
        if self._closing:
            raise StoreUnavailableError("the writer is stopping")
        if len(self._items) >= self._max_queue:
            return None
        return self._enqueue(op)

    async def _put_when_room(self, op: WriteOp) -> asyncio.Future[WriteResult]:
        loop = asyncio.get_running_loop()
        while len(self._items) >= self._max_queue and not self._stopped:
            putter: asyncio.Future[None] = loop.create_future()
            self._putters.append(putter)
            try:
                await putter
            except BaseException:
                if not putter.done():  # cancelled while waiting: leave the line
                    self._putters.remove(putter)
                else:  # cancelled after being let in: hand the room on
                    self._room_made()
                raise
        if self._stopped:
            raise StoreUnavailableError("the writer has stopped")
        return self._enqueue(op)

    def _enqueue(self, op: WriteOp) -> asyncio.Future[WriteResult]:
        """Queue `op` (there is room) and wake the writer if the queue reached `_wake_at`."""
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        items = self._items
        items.append((op, future))
        if len(items) >= self._wake_at:
            self._wake_writer()
        return future

    def _wake_writer(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            if not wake.done():
                wake.set_result(None)

    def _room_made(self) -> None:
        """Let as many waiting submits in as there is room now."""
        room = self._max_queue - len(self._items)
        putters = self._putters
        while room > 0 and putters:
            putter = putters.popleft()
            if not putter.done():
                putter.set_result(None)
                room -= 1

    async def _run(self) -> None:
        items, inflight = self._items, self._inflight
        loop = asyncio.get_running_loop()
        lingered = 0
        while True:
            if items and not inflight and lingered < self._linger_turns and len(items) < self._linger_ops:
                # Lingering: a few more turns of the loop (not a time: an idle loop turns in
                # microseconds), so the ops this turn's connections are about to submit share
                # the group's transaction and fsync (see the module docstring).
                lingered += 1
                await asyncio.sleep(0)
                continue
            lingered = 0
            if items:
                group = self._take()
                if group is not None:
                    self._wake_at = _NEVER  # busy now; every wait below sets its own
                    self._room_made()
                    if self._max_pipeline == 1 or group.exclusive:
                        inflight.append(group)  # alone: written right here, as before
                        await self._commit(group)
                    else:
                        self._busy.update(group.devices)
                        inflight.append(group)
                        task = loop.create_task(self._commit(group), name="fleetwire-group-write")
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    continue
                # `_take` set `_wake_at`: the queue must grow, or a group must be delivered.
            elif self._closing:
                if not inflight:
                    return
                self._wake_at = _NEVER
            else:
                self._wake_at = 1
            self._wake = wake = loop.create_future()
            await wake

    def _take(self) -> _Group | None:
        """The next group to start, or None (then `_wake_at` says when to try again)."""
        inflight = self._inflight
        if not inflight:
            return self._take_any()
        if len(inflight) >= self._max_pipeline or inflight[0].exclusive:
            self._wake_at = _NEVER
            return None
        return self._take_beside()

    def _take_any(self) -> _Group:
        """Nothing in flight: everything queued, in order, up to the caps (as ever)."""
        items = self._items
        max_batch, max_records = self._max_batch, self._max_records
        first = items.popleft()
        batch = [first]
        records = _weight(first[0])
        while len(batch) < max_batch and records < max_records and items:
            item = items.popleft()
            batch.append(item)
            records += _weight(item[0])
        devices: set[str] = set()
        if self._max_pipeline > 1:  # the devices matter only if others may start beside
            for op, _ in batch:
                device = self._lane_device(op)
                if device is None:  # runs alone: no device to keep others from
                    return _Group(batch, set(), True)
                devices.add(device)
        return _Group(batch, devices, False)

    def _take_beside(self) -> _Group | None:
        """Lane groups are in flight: a full group of lane ops of other devices (or one
        holding a command op), or None."""
        items, busy = self._items, self._busy
        max_batch, max_records = self._max_batch, self._max_records
        batch: list[_Item] = []
        devices: set[str] = set()
        skipped: list[_Item] = []
        records = 0
        barrier = False
        commands = False
        while items and len(batch) < max_batch and records < max_records and len(skipped) < max_batch:
            op = items[0][0]
            device = self._lane_device(op)
            if device is None:
                barrier = True  # it and all behind it wait until nothing is in flight
                break
            item = items.popleft()
            if device in busy:  # stays queued, and so does every later op of its device
                skipped.append(item)
                continue
            batch.append(item)
            devices.add(device)
            records += _weight(op)
            commands = commands or type(op) is CreateCommand or type(op) is TransitionCommand
        full = len(batch) >= max_batch or records >= max_records or len(skipped) >= max_batch
        full = full or commands
        if skipped:
            items.extendleft(reversed(skipped))
        if batch and full:
            return _Group(batch, devices, False)
        items.extendleft(reversed(batch))
        # Try again once the queue has grown by a quarter (so a scan costs O(1) per submit),
        # or at the next delivery; a barrier or a full backlog of busy devices waits for that.
        waiting = len(items)
        self._wake_at = _NEVER if barrier or len(skipped) >= max_batch else waiting + max(1, waiting // 4)
        return None

    def _lane_device(self, op: WriteOp) -> str | None:
        """The device of an op that may overlap other groups; None for any other op."""
        if isinstance(op, LOG_OPS):
            return op.device_id
        if self._overlap_commands:
            if type(op) is CreateCommand:
                return op.command.device_id
            if type(op) is TransitionCommand:
                return op.device_id
        return None

    async def _commit(self, group: _Group) -> None:
        """Write one group; its outcome is delivered in start order (`_settle`, `_advance`)."""
        try:
            await self._write(group)
        except asyncio.CancelledError:  # the loop is shutting down: acknowledge nothing more
            self._settle(group, group.items, StoreUnavailableError("the write was cancelled"))
            raise
        finally:
            group.finished = True
            self._advance()

    async def _write(self, group: _Group) -> None:
        batch = group.items
        try:
            results = await self._store.write([op for op, _ in batch])
        except StoreUnavailableError as exc:  # nothing of the group committed: nothing is acked
            self._settle(group, batch, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                log.exception("store.write failed on one op")
                self._settle(group, batch, exc)
            else:
                log.warning(
                    "store.write failed on a batch of %d ops (%r); writing them one at a time",
                    len(batch),
                    exc,
                )
                await self._write_each(group)
            return
        self._settle(group, batch, results)

    async def _write_each(self, group: _Group) -> None:
        """The ops of a failed group, one transaction each, so only the bad op fails."""
        batch = group.items
        for index, item in enumerate(batch):
            try:
                results = await self._store.write([item[0]])
            except StoreUnavailableError as exc:  # an outage: the rest would fail alike
                self._settle(group, batch[index:], exc)
                return
            except Exception as exc:
                log.exception("store.write failed on one op: %s", type(item[0]).__name__)
                self._settle(group, [item], exc)
                continue
            self._settle(group, [item], results)

    def _settle(self, group: _Group, items: list[_Item], outcome: _Outcome) -> None:
        """Deliver now if every group started before this one is delivered, else keep it."""
        if self._inflight[0] is group:
            self._apply(items, outcome)
        else:
            group.parts.append((items, outcome))

    def _advance(self) -> None:
        """Retire the finished groups at the head, delivering what the next one has kept."""
        inflight = self._inflight
        retired = False
        while inflight and inflight[0].finished:
            self._busy.difference_update(inflight.popleft().devices)
            retired = True
            if inflight:
                head = inflight[0]
                parts, head.parts = head.parts, []
                for items, outcome in parts:
                    self._apply(items, outcome)
        if retired:
            self._wake_writer()

    def _apply(self, items: list[_Item], outcome: _Outcome) -> None:
        if isinstance(outcome, BaseException):
            if isinstance(outcome, StoreUnavailableError):
                self.healthy = False
            _fail(items, outcome)
        else:
            self._deliver(items, outcome)

    def _deliver(self, batch: list[_Item], results: list[WriteResult]) -> None:
        """Publish the committed events, then resolve the futures (in that order)."""
        self.healthy = True
        if len(results) != len(batch):  # a broken Store; never ack what may not be stored
            _fail(batch, RuntimeError(f"store.write returned {len(results)} results for {len(batch)} ops"))
            return
        committed: list[Event | RecordRun] = []
        for result in results:
            committed += result.events
            if result.records is not None:  # an op has events or records, never both
                committed.append(result.records)
        if committed:
            try:
                self._on_committed(committed)
            except Exception:  # the data is durable; publication is the callee's concern
                log.exception("on_committed failed for %d events", len(committed))
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # a submitter may have been cancelled meanwhile
                future.set_result(result)


def _weight(op: WriteOp) -> int:
    """What an op counts towards `max_records`."""
    return len(op.records) if type(op) is TelemetryWrite else 1


def _fail(batch: list[_Item], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():  # a submitter may have been cancelled meanwhile
            future.set_exception(exc)
