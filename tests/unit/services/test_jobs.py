"""JobService on memory seams: dispatch, leases and takeover, progress frames, outages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from fleetwire.auth.principal import Principal, Role
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.jobs import Counts, ExecutionState, JobState, parse_job
from tests.unit.services.fakes import (
    LIMIT_S,
    OPERATOR,
    VIEWER,
    FakeDeviceSession,
    Node,
    cluster,
    make_node,
    running,
    until,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with running(make_node(job_lease_s=3.0, job_progress_s=0.5)) as started:
        yield started


def commands_of(session: FakeDeviceSession) -> list[dict[str, Any]]:
    return [m for m in session.messages() if m["type"] == "command"]


def spec(**fields: Any) -> Any:
    return parse_job({"command": {"name": "x"}, "target": {"tags": ["t"]}, **fields})


async def create(node: Node, principal: Principal = OPERATOR, **fields: Any) -> str:
    job, counts = await asyncio.wait_for(node.services.jobs.create(principal, spec(**fields)), LIMIT_S)
    assert counts == Counts(total=job.total, pending=job.total)
    return job.id


async def counts(node: Node, job_id: str) -> Counts:
    return (await node.services.jobs.get(VIEWER, job_id))[1]


async def answer(node: Node, session: FakeDeviceSession, index: int = -1, ok: bool = True) -> None:
    command = commands_of(session)[index]
    error = None if ok else {"code": "broken"}
    await asyncio.wait_for(
        node.services.commands.result(session.device_id, command["command_id"], ok, None, error), LIMIT_S
    )


async def counts_become(node: Node, job_id: str, expected: Counts) -> None:
    for _ in range(200):
        if await counts(node, job_id) == expected:
            return
        await asyncio.sleep(0)
    assert await counts(node, job_id) == expected


async def state_is(node: Node, job_id: str, state: JobState) -> None:
    for _ in range(200):
        if (await node.services.jobs.get(VIEWER, job_id))[0].state is state:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"job never became {state}")


async def test_online_devices_get_commands_with_the_job_id_and_offline_ones_are_skipped(node: Node) -> None:
    """The target is fixed at creation (tag and enabled); an execution is an ordinary
    command whose record and `command.updated` carry job_id."""
    for device_id in ("a", "b", "c"):
        await node.register(device_id, tags=("t",))
    await node.register("disabled", tags=("t",), disabled=True)
    await node.register("untagged")
    a, b = await node.connect("a"), await node.connect("b")
    job_id = await create(node)
    await until(lambda: len(commands_of(a)) == 1 and len(commands_of(b)) == 1)
    command = await node.services.commands.get(commands_of(a)[0]["command_id"])
    assert command.job_id == job_id
    await node.seen("a", "command.updated")
    assert node.log.data("a", "command.updated")[0]["job_id"] == job_id
    await answer(node, a)
    await answer(node, b, ok=False)
    await state_is(node, job_id, JobState.COMPLETED)
    assert await counts(node, job_id) == Counts(total=3, succeeded=1, failed=1, skipped=1)
    skipped = await node.services.jobs.executions(VIEWER, job_id, ExecutionState.SKIPPED, 10, None)
    assert [(e.device_id, (e.error or {})["code"]) for e in skipped] == [("c", "device_offline")]
    assert node.services.jobs.driving == frozenset()


async def test_creation_refuses_what_it_must(node: Node) -> None:
    await node.register("a", tags=("t",))
    with pytest.raises(FleetwireError) as caught:
        await node.services.jobs.create(VIEWER, spec())
    assert caught.value.code is ErrorCode.FORBIDDEN
    outside = Principal("o2", Role.OPERATOR, 2**62, ("b*",))
    with pytest.raises(FleetwireError) as caught:
        await node.services.jobs.create(outside, spec())
    assert caught.value.code is ErrorCode.INVALID_MESSAGE
    with pytest.raises(FleetwireError) as caught:
        await node.services.jobs.get(VIEWER, "nope")
    assert caught.value.code is ErrorCode.NOT_FOUND
    device = Principal("a", Role.DEVICE, 2**62)
    with pytest.raises(FleetwireError) as caught:
        await node.services.jobs.get(device, "nope")
    assert caught.value.code is ErrorCode.FORBIDDEN
    with pytest.raises(FleetwireError) as caught:
        await node.services.jobs.pause(VIEWER, "nope")
    assert caught.value.code is ErrorCode.FORBIDDEN


async def test_a_target_above_the_cap_is_too_large() -> None:
    async with running(make_node(max_job_devices=2)) as small:
        for device_id in ("a", "b", "c"):
            await small.register(device_id, tags=("t",))
        with pytest.raises(FleetwireError) as caught:
            await small.services.jobs.create(OPERATOR, spec())
        assert caught.value.code is ErrorCode.TOO_LARGE
        assert await small.store.list_jobs(10) == []


async def test_a_rollout_step_is_bounded_by_the_batch() -> None:
    """With job_batch 2 and no limits, 5 online devices are reached in steps of 2, 2, 1."""
    async with running(make_node(job_batch=2)) as small:
        sessions = []
        for index in range(5):
            await small.register(f"d{index}", tags=("t",))
            sessions.append(await small.connect(f"d{index}"))
        await create(small)
        await until(lambda: all(len(commands_of(s)) == 1 for s in sessions))


async def test_another_node_takes_a_dead_drivers_job_over_and_sends_nothing_twice() -> None:
    """n1 drives a job and dies without a goodbye (its driver stops, the lease stays); once
    the lease ran out n2 takes the job over and finishes it; every device got one command."""
    async with cluster("n1", "n2", job_lease_s=3.0) as (n1, n2):
        sessions = []
        for index in range(4):
            await n1.register(f"d{index}", tags=("t",))
            sessions.append(await n2.connect(f"d{index}"))
        job_id = await create(n1, rollout={"max_concurrent": 1})
        await until(lambda: len(commands_of(sessions[0])) == 1)
        assert n1.services.jobs.driving == {job_id}
        n1.services.tasks.stop()  # n1 dies without a goodbye: no periodic step, no release
        await n1.services.jobs._drivers[job_id].stop(release=False)
        await answer(n2, sessions[0])
        n1.clock.advance(2)
        assert n2.services.jobs.driving == frozenset()
        n1.clock.advance(1.5)
        await until(lambda: n2.services.jobs.driving == {job_id})
        for session in sessions[1:]:
            await until(lambda s=session: len(commands_of(s)) == 1)
            await answer(n2, session)
        await state_is(n2, job_id, JobState.SUCCEEDED)
        assert [len(commands_of(s)) for s in sessions] == [1, 1, 1, 1]


async def test_a_pause_made_on_another_node_reaches_the_driver_at_its_next_renewal() -> None:
    async with cluster("n1", "n2", job_lease_s=3.0) as (n1, n2):
        sessions = []
        for index in range(3):
            await n1.register(f"d{index}", tags=("t",))
            sessions.append(await n1.connect(f"d{index}"))
        job_id = await create(n1, rollout={"max_concurrent": 1})
        await until(lambda: len(commands_of(sessions[0])) == 1)
        job, _ = await n2.services.jobs.pause(OPERATOR, job_id)
        assert job.state is JobState.PAUSED
        assert n2.services.jobs.driving == frozenset()  # n1 holds the lease
        await answer(n1, sessions[0])
        await n2.services.jobs.resume(OPERATOR, job_id)
        n1.clock.advance(1)  # n1's renewal wakes its driver
        await until(lambda: len(commands_of(sessions[1])) == 1)
        assert commands_of(sessions[2]) == []  # max_concurrent 1: the next waits its turn
        with pytest.raises(FleetwireError) as caught:
            await n2.services.jobs.resume(OPERATOR, job_id)
        assert caught.value.code is ErrorCode.CONFLICT


async def test_a_driver_that_lost_its_lease_stops(node: Node) -> None:
    await node.register("a", tags=("t",))
    session = await node.connect("a")
    job_id = await create(node)
    await until(lambda: len(commands_of(session)) == 1)
    await node.store.release_job_lease(job_id, node.services.node_id)
    assert await node.store.take_job_lease(job_id, "other", node.clock.now_ms(), node.clock.now_ms() + 60_000)
    node.clock.advance(1)
    await until(lambda: node.services.jobs.driving == frozenset())


async def test_an_outage_during_a_step_is_retried(node: Node) -> None:
    """A write that fails as an outage leaves the execution pending; the driver tries again
    a second later and sends it then."""
    await node.register("a", tags=("t",))
    await node.register("b", tags=("t",))
    a, b = await node.connect("a"), await node.connect("b")
    job_id = await create(node, rollout={"max_concurrent": 1})
    await until(lambda: len(commands_of(a)) == 1)
    driver = node.services.jobs._drivers[job_id]
    await answer(node, a)
    node.store.down = True  # before the driver's step, which the result's event wakes
    await until(lambda: driver._timer is not None)
    assert commands_of(b) == []
    node.store.down = False
    node.clock.advance(1)
    await until(lambda: len(commands_of(b)) == 1)
    await answer(node, b)
    await state_is(node, job_id, JobState.SUCCEEDED)


async def test_progress_frames_are_coalesced_and_only_for_jobs_one_may_see(node: Node) -> None:
    """Two results within progress_s give one frame with the counts after both; a watcher
    whose claim does not cover the job's creator's gets none; unwatch stops them."""
    for device_id in ("a", "b"):
        await node.register(device_id, tags=("t",))
    a, b = await node.connect("a"), await node.connect("b")
    seen: list[dict[str, Any]] = []
    hidden: list[bytes] = []
    node.services.jobs.watch("w1", VIEWER, lambda frame: seen.append(orjson.loads(frame)))
    node.services.jobs.watch("w2", Principal("r", Role.VIEWER, 2**62, ("zz*",)), hidden.append)
    job_id = await create(node)
    node.clock.advance(0.5)
    await until(lambda: len(seen) == 1)
    assert (seen[0]["type"], seen[0]["job_id"], seen[0]["state"]) == ("job", job_id, "running")
    await until(lambda: len(commands_of(a)) == 1 and len(commands_of(b)) == 1)
    await answer(node, a)
    await answer(node, b)
    await state_is(node, job_id, JobState.SUCCEEDED)
    node.clock.advance(0.5)
    await until(lambda: len(seen) == 2)
    assert (seen[1]["state"], seen[1]["counts"]["succeeded"]) == ("succeeded", 2)
    assert hidden == []
    node.services.jobs.unwatch("w1")
    node.services.jobs.unwatch("w2")


async def test_abort_cancel_rate_and_listing(node: Node) -> None:
    """The abort rule ends a job `aborted` at once; cancel of the driven job wakes its
    driver, which stops; max_per_minute spaces dispatches on the clock; list is newest
    first with a cursor; a queued execution waits for its device's connect."""
    for device_id in ("a", "b", "c"):
        await node.register(device_id, tags=("t",))
    a, b = await node.connect("a"), await node.connect("b")
    aborting = await create(
        node, rollout={"max_concurrent": 1}, abort={"failure_pct": 100, "min_executed": 1}
    )
    await until(lambda: len(commands_of(a)) == 1)
    await answer(node, a, ok=False)
    await state_is(node, aborting, JobState.ABORTED)
    assert await counts(node, aborting) == Counts(total=3, failed=1, canceled=2)
    await until(lambda: aborting not in node.services.jobs.driving)

    rated = await create(node, rollout={"max_per_minute": 60}, queue=True)  # a burst of one, then 1/s
    await until(lambda: len(commands_of(a)) == 2)
    await answer(node, a)
    node.clock.advance(1)
    await until(lambda: len(commands_of(b)) == 1)
    node.clock.advance(1)
    await counts_become(node, rated, Counts(total=3, succeeded=1, sent=1, pending=1, queued=1))
    c = await node.connect("c")
    await until(lambda: len(commands_of(c)) == 1)
    canceled, _ = await node.services.jobs.cancel(OPERATOR, rated)
    assert canceled.state is JobState.CANCELED
    await until(lambda: rated not in node.services.jobs.driving)

    page, cursor = await node.services.jobs.list_jobs(VIEWER, 1, None)
    assert [j.id for j, _ in page] == [rated]
    assert cursor == rated
    rest, end = await node.services.jobs.list_jobs(VIEWER, 5, cursor)
    assert ([j.id for j, _ in rest], end) == ([aborting], None)


async def test_a_rate_limited_rollout_goes_on_while_devices_stay_silent(node: Node) -> None:
    """max_per_minute 60: one execution a second of the clock, even when no device answers
    (the driver arms its next token itself, it does not wait for an answer)."""
    sessions = []
    for index in range(3):
        await node.register(f"d{index}", tags=("t",))
        sessions.append(await node.connect(f"d{index}"))
    await create(node, rollout={"max_per_minute": 60})
    await until(lambda: len(commands_of(sessions[0])) == 1)
    node.clock.advance(1)
    await until(lambda: len(commands_of(sessions[1])) == 1)
    assert commands_of(sessions[2]) == []
    node.clock.advance(1)
    await until(lambda: len(commands_of(sessions[2])) == 1)
