"""Background work of one node: guarded tasks and periodic steps, stopped together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fleetwire.broker.base import BrokerUnavailableError
from fleetwire.presence.base import PresenceUnavailableError
from fleetwire.store.base import StoreUnavailableError

log = logging.getLogger(__name__)
# An outage of a backing service is expected and logged briefly; anything else is a bug.
OUTAGES = (StoreUnavailableError, BrokerUnavailableError, PresenceUnavailableError)


class Tasks:
    """Spawned tasks never die silently: an outage is a warning, anything else a traceback."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._guard(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def every(self, interval_s: float, step: Callable[[], Awaitable[None]], name: str) -> None:
        """Run `step` every `interval_s` until `stop`; a failing step does not end the loop."""
        self._loops.append(asyncio.get_running_loop().create_task(self._every(interval_s, step), name=name))

    @staticmethod
    async def _guard(coro: Awaitable[None]) -> None:
        try:
            await coro
        except OUTAGES as exc:
            log.warning("background step failed: %s", exc)
        except Exception:
            log.exception("background step failed")

    async def _every(self, interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._guard(step())

    async def drain(self, timeout_s: float) -> None:
        """Let spawned tasks finish (goodbyes at shutdown), at most `timeout_s`."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
