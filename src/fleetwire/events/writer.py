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
- One writer task takes everything queued (up to `max_batch` ops and about `max_records`
  telemetry records) and writes it as ONE `store.write` call, so a burst of concurrent
  submitters costs one transaction, one fsync.
- `on_committed(events)` is called with all events of a batch, in order, synchronously,
  after the commit and BEFORE any future of the batch resolves: events are published in
  commit order, and an acknowledgement never overtakes its event.
- The queue is bounded (`max_queue` ops). Overflow policy: `submit` waits for space
  (backpressure towards the connections), it never drops and never grows without bound.
- `stop()` refuses new submissions, writes everything already queued, then ends the task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from fleetwire.domain.events import Event
from fleetwire.store.base import Store, StoreUnavailableError, TelemetryWrite, WriteOp, WriteResult

log = logging.getLogger(__name__)

_Item = tuple[WriteOp, "asyncio.Future[WriteResult]"]
_WAKE: Final = None  # put by stop() into an empty queue to wake the waiting writer


class GroupWriter:
    def __init__(
        self,
        store: Store,
        on_committed: Callable[[list[Event]], None],
        *,
        max_queue: int = 10_000,
        max_batch: int = 500,
        max_records: int = 10_000,
    ) -> None:
        if max_queue < 1 or max_batch < 1 or max_records < 1:
            raise ValueError("max_queue, max_batch and max_records must be at least 1")
        self._store = store
        self._on_committed = on_committed
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue(max_queue)
        self._max_batch = max_batch
        self._max_records = max_records
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._stopped = False
        # False from an outage until a write (or `recovered`) succeeds again: lets callers
        # that do not write (a handshake answered from the cache) refuse during an outage.
        self.healthy = True

    @property
    def queued(self) -> int:
        """Ops waiting for a transaction (not counting the batch being written)."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fleetwire-group-writer")

    async def stop(self) -> None:
        """Write what is queued, then end; later submits raise StoreUnavailableError."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            if self._queue.empty():
                self._queue.put_nowait(_WAKE)
            await task
        self._stopped = True
        # Items that got in after the writer ended (they waited for space meanwhile).
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and not item[1].done():
                item[1].set_exception(StoreUnavailableError("the writer has stopped"))

    async def submit(self, op: WriteOp) -> WriteResult:
        future = self.submit_nowait(op)
        if future is None:  # the queue is full: wait for room (backpressure)
            future = asyncio.get_running_loop().create_future()
            await self._queue.put((op, future))
            if self._stopped and not future.done():
                raise StoreUnavailableError("the writer has stopped")
        return await future

    def submit_nowait(self, op: WriteOp) -> asyncio.Future[WriteResult] | None:
        """`submit` without a coroutine (the ingest hot path: no task per message): the
        future of the op's result, or None when the queue is full (then `await submit`)."""
        if self._closing:
            raise StoreUnavailableError("the writer is stopping")
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((op, future))
        except asyncio.QueueFull:
            return None
        return future

    async def _run(self) -> None:
        queue = self._queue
        max_batch, max_records = self._max_batch, self._max_records
        while not (self._closing and queue.empty()):
            first = await queue.get()
            if first is None:
                continue
            batch = [first]
            records = _weight(first[0])
            while len(batch) < max_batch and records < max_records and not queue.empty():
                item = queue.get_nowait()
                if item is not None:
                    batch.append(item)
                    records += _weight(item[0])
            await self._write(batch)

    async def _write(self, batch: list[_Item]) -> None:
        try:
            results = await self._store.write([op for op, _ in batch])
        except StoreUnavailableError as exc:  # nothing of the batch committed: nothing is acked
            self.healthy = False
            _fail(batch, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                log.exception("store.write failed on one op")
                _fail(batch, exc)
            else:
                log.warning(
                    "store.write failed on a batch of %d ops (%r); writing them one at a time",
                    len(batch),
                    exc,
                )
                await self._write_each(batch)
            return
        self._deliver(batch, results)

    async def _write_each(self, batch: list[_Item]) -> None:
        """The ops of a failed batch, one transaction each, so only the bad op fails."""
        for index, item in enumerate(batch):
            try:
                results = await self._store.write([item[0]])
            except StoreUnavailableError as exc:  # an outage: the rest would fail alike
                _fail(batch[index:], exc)
                return
            except Exception as exc:
                log.exception("store.write failed on one op: %s", type(item[0]).__name__)
                _fail([item], exc)
                continue
            self._deliver([item], results)

    def _deliver(self, batch: list[_Item], results: list[WriteResult]) -> None:
        """Publish the committed events, then resolve the futures (in that order)."""
        self.healthy = True
        if len(results) != len(batch):  # a broken Store; never ack what may not be stored
            _fail(batch, RuntimeError(f"store.write returned {len(results)} results for {len(batch)} ops"))
            return
        committed = [event for result in results for event in result.events]
        if committed:
            try:
                self._on_committed(committed)
            except Exception:  # the data is durable; publication is the callee's concern
                log.exception("on_committed failed for %d events", len(committed))
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # a submitter may have been cancelled meanwhile
                future.set_result(result)


def _fail(batch: list[_Item], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():  # a submitter may have been cancelled meanwhile
            future.set_exception(exc)


def _weight(op: WriteOp) -> int:
    return len(op.records) if type(op) is TelemetryWrite else 1
