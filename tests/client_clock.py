"""A ClientClock for the SDK moved by hand: backoff waits, the stable period and the ping
watchdog happen when a test advances it, never after a real wait."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

from fleetwire.client import ClientClock


class FakeClientClock:
    """Monotonic time starts at 0; wall time is the real time plus what was advanced (and
    `wall_offset_s`, to play a device whose clock runs ahead)."""

    def __init__(self, wall_offset_s: float = 0.0) -> None:
        self._now = 0.0
        self._wall_start = time.time() + wall_offset_s
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._wall_start + self._now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), future))
        await future

    def advance(self, seconds: float) -> None:
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)


_: type[ClientClock] = FakeClientClock
