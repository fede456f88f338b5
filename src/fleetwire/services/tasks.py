"""Background work of one node: guarded tasks and periodic steps, stopped together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fleetwire.broker.base import BrokerUnavailableError
from fleetwire.domain.clock import Clock, Timer
from fleetwire.presence.base import PresenceUnavailableError
from fleetwire.store.base import StoreUnavailableError

log = logging.getLogger(__name__)
# An outage of a backing service is expected and logged briefly; anything else is a bug.
OUTAGES = (StoreUnavailableError, BrokerUnavailableError, PresenceUnavailableError)


class Tasks:
    """Spawned tasks never die silently: an outage is a warning, anything else a traceback."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[str, Timer] = {}
        self._stopped = False

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._guard(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def every(self, interval_s: float, step: Callable[[], Awaitable[None]], name: str) -> None:
        """Run `step` `interval_s` after the previous run ended, until `stop`; steps never
        overlap, and a failing step does not end the series."""

        def due() -> None:
            task = self.spawn(_awaited(step))
            task.add_done_callback(lambda _: arm())

        def arm() -> None:
            if not self._stopped:
                self._timers[name] = self._clock.call_later(interval_s, due)

        arm()

    @staticmethod
    async def _guard(coro: Awaitable[None]) -> None:
        try:
            await coro
        except OUTAGES as exc:
            log.warning("background step failed: %s", exc)
        except Exception:
            log.exception("background step failed")

    async def drain(self, timeout_s: float) -> None:
        """Let spawned tasks finish (goodbyes at shutdown), at most `timeout_s`."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def stop(self) -> None:
        """No periodic step starts after this (one running now finishes on its own)."""
        self._stopped = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


T = TypeVar("T")


def settle(future: asyncio.Future[T], value: T) -> None:
    """Resolve a future unless something (a timeout, an event) already did."""
    if not future.done():
        future.set_result(value)


async def _awaited(step: Callable[[], Awaitable[None]]) -> None:
    await step()
