"""Tasks: guarded background tasks and periodic steps on the Clock, stopped together."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fleetwire.broker.base import BrokerUnavailableError
from fleetwire.presence.base import PresenceUnavailableError
from fleetwire.services.tasks import Tasks
from fleetwire.store.base import StoreUnavailableError
from tests.clock import ManualClock
from tests.unit.services.fakes import LIMIT_S, until

pytestmark = pytest.mark.anyio
LOGGER = "fleetwire.services.tasks"


async def test_spawn_logs_an_outage_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A spawned task failing with an outage of a backing service logs one warning line
    without a traceback and ends normally."""
    tasks = Tasks(ManualClock())
    outages = (
        StoreUnavailableError("db down"),
        BrokerUnavailableError("bus down"),
        PresenceUnavailableError("p"),
    )

    async def fail(exc: Exception) -> None:
        raise exc

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for exc in outages:
            await asyncio.wait_for(tasks.spawn(fail(exc)), LIMIT_S)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert [(r.levelno, r.getMessage(), r.exc_info) for r in records] == [
        (logging.WARNING, "background step failed: db down", None),
        (logging.WARNING, "background step failed: bus down", None),
        (logging.WARNING, "background step failed: p", None),
    ]


async def test_spawn_logs_any_other_exception_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A spawned task failing with any other exception logs an error with the traceback."""
    tasks = Tasks(ManualClock())

    async def broken() -> None:
        raise ValueError("bug")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        await asyncio.wait_for(tasks.spawn(broken()), LIMIT_S)
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert (record.levelno, record.getMessage()) == (logging.ERROR, "background step failed")
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)


async def test_every_runs_on_the_clock() -> None:
    """A periodic step runs when the clock reaches its interval, and again an interval after
    the previous run ended; never before."""
    clock = ManualClock()
    tasks = Tasks(clock)
    runs: list[int] = []

    async def step() -> None:
        runs.append(clock.now_ms())

    start = clock.now_ms()
    tasks.every(2.0, step, "step")
    clock.advance(1.999)
    await asyncio.wait_for(tasks.drain(LIMIT_S), LIMIT_S)
    assert runs == []
    clock.advance(0.001)
    await until(lambda: len(runs) == 1)
    await until(lambda: clock.pending == 1)  # re-armed once the run ended
    clock.advance(2.0)
    await until(lambda: len(runs) == 2)
    assert runs == [start + 2_000, start + 4_000]
    tasks.stop()


async def test_every_never_overlaps() -> None:
    """While a run is in progress no other run starts, however far the clock moves; the next
    is armed when it ends."""
    clock = ManualClock()
    tasks = Tasks(clock)
    gate = asyncio.Event()
    started = 0

    async def slow() -> None:
        nonlocal started
        started += 1
        await gate.wait()

    tasks.every(1.0, slow, "slow")
    clock.advance(1.0)
    await until(lambda: started == 1)
    for _ in range(5):
        clock.advance(1.0)
        await asyncio.sleep(0)
    assert (started, clock.pending) == (1, 0)
    gate.set()
    await until(lambda: clock.pending == 1)
    clock.advance(1.0)
    await until(lambda: started == 2)
    tasks.stop()


async def test_a_failing_step_does_not_end_the_series(caplog: pytest.LogCaptureFixture) -> None:
    """A step that raises is logged and runs again at the next interval."""
    clock = ManualClock()
    tasks = Tasks(clock)
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        raise StoreUnavailableError("down")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tasks.every(1.0, flaky, "flaky")
        clock.advance(1.0)
        await until(lambda: calls == 1 and clock.pending == 1)
        clock.advance(1.0)
        await until(lambda: calls == 2)
    tasks.stop()


async def test_stop_ends_the_series_and_lets_a_running_step_finish() -> None:
    """After stop no step starts: the pending timer is cancelled, and a step running at the
    time finishes without arming another."""
    clock = ManualClock()
    tasks = Tasks(clock)
    gate = asyncio.Event()
    finished: list[str] = []

    async def running() -> None:
        await gate.wait()
        finished.append("running")

    async def idle() -> None:
        finished.append("idle")

    tasks.every(1.0, running, "running")
    tasks.every(5.0, idle, "idle")
    clock.advance(1.0)
    await asyncio.sleep(0)
    tasks.stop()
    assert clock.pending == 0
    gate.set()
    await asyncio.wait_for(tasks.drain(LIMIT_S), LIMIT_S)
    clock.advance(60)
    await asyncio.sleep(0)
    assert (finished, clock.pending) == (["running"], 0)


async def test_drain_waits_for_spawned_tasks() -> None:
    """drain returns once the spawned tasks ended (at once when there are none)."""
    tasks = Tasks(ManualClock())
    await asyncio.wait_for(tasks.drain(LIMIT_S), LIMIT_S)
    done: list[int] = []

    async def work() -> None:
        await asyncio.sleep(0)
        done.append(1)

    tasks.spawn(work())
    await asyncio.wait_for(tasks.drain(LIMIT_S), LIMIT_S)
    assert done == [1]
