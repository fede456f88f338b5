"""JobService: fleet jobs (contract §7) as an orchestration over the command lifecycle.

- Creation fixes the target (registered, enabled devices matching any pattern, carrying
  every tag, inside the creator's `devices` claim) and writes the job with one pending
  execution per device in ONE group-writer op; each execution's command id is fixed then.
- A running job is driven by exactly one node: the holder of its lease in the store
  (renewed every third of `lease_s`; a node that dies loses it and another takes the job
  over at its next orphan sweep). The driver is event-driven on the Clock: it wakes on a
  `command.updated` of its job (from any node, through the hub), on its rate limiter's
  next token, on a pause/resume/cancel made here, and on each lease renewal.
- A step dispatches up to min(free slots under max_concurrent, rate tokens, batch)
  executions as ordinary commands with `job_id` (DispatchExecution: a compare-and-set of
  the execution from pending, so no execution is ever sent twice, even by two nodes that
  both believe they hold the lease; and only while the job is running, so nothing leaves
  after a pause or cancel committed). The command's normal routing reaches the device on
  whichever node holds it; its normal timer and the sweep time it out, freeing its slot.
- Progress: clients that watch jobs get `{"type": "job"}` frames, at most one per job per
  `progress_s`, for the jobs they may see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import orjson

from fleetwire.auth.principal import Principal, Role
from fleetwire.broker.base import Published
from fleetwire.domain.clock import Clock, Timer
from fleetwire.domain.commands import Command, CommandIds, CommandState
from fleetwire.domain.devices import DeviceFilter
from fleetwire.domain.errors import ErrorCode, FleetwireError, invalid
from fleetwire.domain.jobs import (
    CANCEL_FROM,
    END_FROM,
    PAUSE_FROM,
    RESUME_FROM,
    Counts,
    Execution,
    ExecutionState,
    Job,
    JobSpec,
    JobState,
    TokenBucket,
    admit,
    end_state,
    should_abort,
)
from fleetwire.events.writer import GroupWriter
from fleetwire.presence.base import Presence
from fleetwire.services.commands import CommandService
from fleetwire.services.routing import NodeRouter
from fleetwire.services.tasks import OUTAGES, Tasks
from fleetwire.store.base import CreateJob, DispatchExecution, SetJobState, Store

log = logging.getLogger(__name__)

_PAGE: Final = 1000  # devices read per query while a target is resolved
_RETRY_S: Final = 1.0  # after an outage, a driver tries again this much later
_OFFLINE: Final = {"code": ErrorCode.DEVICE_OFFLINE.value, "message": "device was offline at its turn"}


def may_see_job(principal: Principal, job: Job) -> bool:
    """Who sees a job (docs/protocol.md deviation 61): an unrestricted principal sees every
    job; a restricted one sees the jobs it created and those created under the same claim."""
    if principal.device_patterns is None:
        return True
    return job.issuer == principal.sub or job.claim == principal.device_patterns


@dataclass(slots=True)
class _Watcher:
    principal: Principal
    send: Callable[[bytes], None]


class JobService:
    def __init__(
        self,
        *,
        node_id: str,
        store: Store,
        writer: GroupWriter,
        presence: Presence,
        router: NodeRouter,
        commands: CommandService,
        tasks: Tasks,
        clock: Clock,
        max_devices: int = 100_000,
        batch: int = 500,
        lease_s: float = 15.0,
        progress_s: float = 0.25,
    ) -> None:
        self._node_id = node_id
        self._store = store
        self._writer = writer
        self._presence = presence
        self._router = router
        self._commands = commands
        self._tasks = tasks
        self._clock = clock
        self._max_devices = max_devices
        self._batch = batch
        self._lease_s = lease_s
        self._progress_s = progress_s
        self._ids = CommandIds()
        self._drivers: dict[str, _Driver] = {}
        self._watchers: dict[object, _Watcher] = {}
        self._dirty: set[str] = set()
        self._progress_timer: Timer | None = None
        self._closed = False

    # -- requests ------------------------------------------------------------------------------
    async def create(self, principal: Principal, spec: JobSpec) -> tuple[Job, Counts]:
        if not principal.at_least(Role.OPERATOR):
            raise FleetwireError(ErrorCode.FORBIDDEN, "creating jobs needs the operator role")
        targets: list[str] = []
        after: str | None = None
        where = DeviceFilter(patterns=principal.device_patterns)
        while True:
            page = await self._store.list_devices(where, _PAGE, after)
            for device in page:
                if not device.disabled and spec.targets(device):
                    targets.append(device.id)
            if len(targets) > self._max_devices:
                raise FleetwireError(
                    ErrorCode.TOO_LARGE, f"the target has more than {self._max_devices} devices"
                )
            if len(page) < _PAGE:
                break
            after = page[-1].id
        if not targets:
            raise invalid(
                "the target matches no device you may command", [{"loc": ["target"], "msg": "empty"}]
            )
        now = self._clock.now_ms()
        job = Job(
            id=self._ids.next(now),
            state=JobState.RUNNING,
            spec=spec,
            issuer=principal.sub,
            created_at_ms=now,
            updated_at_ms=now,
            total=len(targets),
            claim=principal.device_patterns,
        )
        executions = [(device_id, self._ids.next(now)) for device_id in targets]
        await self._writer.submit(CreateJob(job, executions))
        await self._adopt(job.id)
        self._changed(job.id)
        return job, Counts(total=job.total, pending=job.total)

    async def get(self, principal: Principal, job_id: str) -> tuple[Job, Counts]:
        job = await self._visible(principal, job_id)
        counts = await self._store.job_counts([job.id])
        return job, Counts.of(counts[job.id])

    async def list_jobs(
        self, principal: Principal, limit: int, before: str | None
    ) -> tuple[list[tuple[Job, Counts]], str | None]:
        """Newest first; a page may hold fewer than `limit` jobs when some are not visible."""
        found = await self._store.list_jobs(limit, before)
        visible = [job for job in found if may_see_job(principal, job)]
        counts = await self._store.job_counts([job.id for job in visible])
        next_before = found[-1].id if len(found) == limit else None
        return [(job, Counts.of(counts[job.id])) for job in visible], next_before

    async def executions(
        self, principal: Principal, job_id: str, state: ExecutionState | None, limit: int, after: int | None
    ) -> list[Execution]:
        await self._visible(principal, job_id)
        return await self._store.job_executions(job_id, state, limit, after)

    async def pause(self, principal: Principal, job_id: str) -> tuple[Job, Counts]:
        return await self._move(principal, job_id, JobState.PAUSED, PAUSE_FROM)

    async def resume(self, principal: Principal, job_id: str) -> tuple[Job, Counts]:
        return await self._move(principal, job_id, JobState.RUNNING, RESUME_FROM)

    async def cancel(self, principal: Principal, job_id: str) -> tuple[Job, Counts]:
        return await self._move(principal, job_id, JobState.CANCELED, CANCEL_FROM)

    async def _move(
        self, principal: Principal, job_id: str, state: JobState, allowed: frozenset[JobState]
    ) -> tuple[Job, Counts]:
        if not principal.at_least(Role.OPERATOR):
            raise FleetwireError(ErrorCode.FORBIDDEN, "changing a job needs the operator role")
        job = await self._visible(principal, job_id)
        moved = (await self._writer.submit(SetJobState(job_id, state, allowed, self._clock.now_ms()))).job
        if moved is None:
            current = await self._store.get_job(job_id)
            shown = current.state.value if current is not None else "gone"
            raise FleetwireError(ErrorCode.CONFLICT, f"the job is {shown}")
        driver = self._drivers.get(job.id)
        if driver is not None:
            driver.wake()
        elif not moved.state.final:
            await self._adopt(job.id)  # nobody drives it (or another node does: no harm)
        self._changed(job.id)
        counts = await self._store.job_counts([job.id])
        return moved, Counts.of(counts[job.id])

    async def _visible(self, principal: Principal, job_id: str) -> Job:
        if principal.role is Role.DEVICE:
            raise FleetwireError(ErrorCode.FORBIDDEN, "devices have no jobs")
        job = await self._store.get_job(job_id)
        if job is None or not may_see_job(principal, job):
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such job")
        return job

    # -- driving ---------------------------------------------------------------------------------
    async def _adopt(self, job_id: str) -> None:
        """Drive the job here if its lease can be had."""
        if self._closed or job_id in self._drivers:
            return
        now = self._clock.now_ms()
        if not await self._store.take_job_lease(job_id, self._node_id, now, now + int(self._lease_s * 1000)):
            return
        driver = _Driver(self, job_id)
        self._drivers[job_id] = driver
        driver.start()

    async def adopt_orphans(self) -> None:
        """Periodic: take over the jobs whose driver's lease ran out (a node died)."""
        for job_id in await self._store.orphan_jobs(self._clock.now_ms(), 100):
            await self._adopt(job_id)

    def on_event(self, event: Published) -> None:
        """A hub listener: an execution's `command.updated` (from any node) may free a slot,
        end the job or change its counts."""
        if event.name != "command.updated":
            return
        job_id = event.data.get("job_id")
        if job_id is None:
            return
        driver = self._drivers.get(job_id)
        if driver is not None:
            driver.wake()
        self._changed(job_id)

    def _dropped(self, job_id: str) -> None:
        self._drivers.pop(job_id, None)

    async def close(self) -> None:
        self._closed = True
        if self._progress_timer is not None:
            self._progress_timer.cancel()
        for driver in list(self._drivers.values()):
            await driver.stop(release=True)
        self._drivers.clear()

    @property
    def driving(self) -> frozenset[str]:
        return frozenset(self._drivers)

    # -- progress frames -------------------------------------------------------------------------
    def watch(self, key: object, principal: Principal, send: Callable[[bytes], None]) -> None:
        """`subscribe` with `"jobs": true`: job frames go to `send` from now on."""
        self._watchers[key] = _Watcher(principal, send)

    def watching(self, key: object) -> bool:
        return key in self._watchers

    def unwatch(self, key: object) -> None:
        self._watchers.pop(key, None)

    def _changed(self, job_id: str) -> None:
        if not self._watchers:
            return
        self._dirty.add(job_id)
        if self._progress_timer is None and not self._closed:
            self._progress_timer = self._clock.call_later(self._progress_s, self._flush_soon)

    def _flush_soon(self) -> None:
        self._progress_timer = None
        self._tasks.spawn(self._flush())

    async def _flush(self) -> None:
        """One frame per changed job since the last flush (coalesced), to whoever may see it."""
        dirty, self._dirty = self._dirty, set()
        if not dirty or not self._watchers:
            return
        jobs = [job for job in [await self._store.get_job(j) for j in sorted(dirty)] if job is not None]
        counts = await self._store.job_counts([job.id for job in jobs])
        now = self._clock.now_ms()
        for job in jobs:
            frame = orjson.dumps(job.progress(Counts.of(counts[job.id]), now))
            for watcher in list(self._watchers.values()):
                if may_see_job(watcher.principal, job):
                    watcher.send(frame)


class _Driver:
    """The rollout of one job on the node holding its lease: one task, woken, never polling."""

    def __init__(self, service: JobService, job_id: str) -> None:
        self._service = service
        self._job_id = job_id
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._bucket: TokenBucket | None = None
        self._timer: Timer | None = None  # the next token, or a retry after an outage
        self._lease_timer: Timer | None = None
        self._stopped = False

    def start(self) -> None:
        self._task = self._service._tasks.spawn(self._run())
        self._arm_lease()
        self.wake()

    def wake(self) -> None:
        self._wakeup.set()

    def _wake_in(self, delay_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._service._clock.call_later(delay_s, self.wake)

    def _arm_lease(self) -> None:
        self._lease_timer = self._service._clock.call_later(self._service._lease_s / 3, self._renew_soon)

    def _renew_soon(self) -> None:
        if not self._stopped:
            self._service._tasks.spawn(self._renew())

    async def _renew(self) -> None:
        service = self._service
        now = service._clock.now_ms()
        try:
            held = await service._store.take_job_lease(
                self._job_id, service._node_id, now, now + int(service._lease_s * 1000)
            )
        except OUTAGES:
            held = True  # keep driving; the CAS of every dispatch keeps it safe meanwhile
        if not held:  # lost (it ran out while this node was stalled) or the job ended
            await self.stop(release=False)
            return
        self._arm_lease()
        self.wake()  # also picks up a pause/resume/cancel made on another node

    async def stop(self, *, release: bool) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._service._dropped(self._job_id)
        for timer in (self._timer, self._lease_timer):
            if timer is not None:
                timer.cancel()
        self.wake()
        if release:
            with contextlib.suppress(*OUTAGES):  # it runs out by itself
                await self._service._store.release_job_lease(self._job_id, self._service._node_id)

    async def _run(self) -> None:
        while not self._stopped:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._stopped:
                break
            try:
                done = await self._step()
            except OUTAGES as exc:
                log.warning("job %s: %s; retrying", self._job_id, exc)
                self._wake_in(_RETRY_S)
                continue
            except Exception:  # a bug: say so, and keep the job alive rather than stuck here
                log.exception("job %s: rollout step failed; retrying", self._job_id)
                self._wake_in(_RETRY_S)
                continue
            if done:
                await self.stop(release=True)

    async def _step(self) -> bool:
        """One look at the job; True when it has ended (the driver stops)."""
        service = self._service
        store, clock = service._store, service._clock
        job = await store.get_job(self._job_id)
        if job is None or job.state.final:
            return True
        undispatched, in_flight = await store.job_progress(job.id)
        now = clock.now_ms()
        # The full counts (one GROUP BY over every execution) only when they decide something.
        if job.state is JobState.RUNNING and job.spec.failure_pct is not None:
            counts = Counts.of((await store.job_counts([job.id]))[job.id])
            if should_abort(job.spec, counts):
                await self._end(JobState.ABORTED, frozenset({JobState.RUNNING}), now)
                return True
        if undispatched == 0 and in_flight == 0:
            counts = Counts.of((await store.job_counts([job.id]))[job.id])
            await self._end(end_state(counts), END_FROM, now)
            return True
        if job.state is not JobState.RUNNING or undispatched == 0:
            return False  # paused, or all sent: in-flight executions end; their events wake us
        spec = job.spec
        tokens: int | None = None
        if spec.max_per_minute is not None:
            if self._bucket is None:
                self._bucket = TokenBucket(spec.max_per_minute, now)
            tokens = self._bucket.available(now)
        wanted = admit(spec, in_flight, tokens, service._batch)
        if wanted == 0:
            if tokens == 0 and self._bucket is not None:
                self._wake_in(self._bucket.next_in_s(now))
            return False
        dispatched, more = await self._dispatch(job, wanted, now)
        if self._bucket is not None:
            self._bucket.take(dispatched, now)
            self._wake_in(self._bucket.next_in_s(now))  # the next token, answered or not
        if more:
            self.wake()  # a full batch went: there may be room for the next one
        return False

    async def _dispatch(self, job: Job, wanted: int, now: int) -> tuple[int, bool]:
        """Send up to `wanted` executions (offline ones queued or skipped without using a
        slot); (how many were sent or queued, whether more might be sendable now)."""
        service = self._service
        spec = job.spec
        dispatched = 0
        while dispatched < wanted:
            batch = await service._store.next_executions(job.id, wanted - dispatched)
            if not batch:
                return dispatched, False
            sessions = await service._presence.get_many([e.device_id for e in batch])
            ops = []
            for execution in batch:
                session = sessions.get(execution.device_id)
                if session is None and not spec.queue:
                    ops.append(DispatchExecution(job.id, execution.index, now, error=_OFFLINE))
                    continue
                online = session is not None
                expires = (
                    now + spec.timeout_s * 1000 if online else job.created_at_ms + spec.deadline_s * 1000
                )
                command = Command(
                    id=execution.command_id,
                    device_id=execution.device_id,
                    name=spec.name,
                    params=spec.params,
                    state=CommandState.SENT if online else CommandState.PENDING,
                    issued_at_ms=now,
                    expires_at_ms=max(expires, now),
                    issuer=job.issuer,
                    sent_at_ms=now if online else None,
                    timeout_s=spec.timeout_s,
                    job_id=job.id,
                )
                ops.append(DispatchExecution(job.id, execution.index, now, command=command))
            results = await asyncio.gather(*(service._writer.submit(op) for op in ops))
            refused = False
            for result in results:
                sent = result.command
                if not result.applied:
                    refused = True  # paused, canceled, or sent by another node meanwhile
                    continue
                if sent is None:
                    continue  # skipped (or its device is gone)
                dispatched += 1
                service._commands.arm(sent)
                session = sessions.get(sent.device_id)
                if session is not None:
                    await service._router.send(session.node, session.session_id, sent.device_message())
            if refused:
                return dispatched, False
        return dispatched, dispatched == service._batch

    async def _end(self, state: JobState, allowed: frozenset[JobState], now: int) -> None:
        await self._service._writer.submit(SetJobState(self._job_id, state, allowed, now))
        self._service._changed(self._job_id)
