"""A clock advanced by hand: every timer of fleetwire (sessions, heartbeats, command
deadlines, periodic steps) fires when the test says so, never after a real wait."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable

from fleetwire.domain.clock import Clock


class ManualTimer:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """Starts at the real time (so tokens minted for it verify); moves only in `advance`.

    Call `advance` on the event loop that armed the timers. A timer already due when armed
    runs on the next loop iteration, as `loop.call_later(0, ...)` would.
    """

    def __init__(self, start_ms: int | None = None) -> None:
        self._now_ms = time.time_ns() // 1_000_000 if start_ms is None else start_ms
        self._timers: list[tuple[int, int, ManualTimer]] = []
        self._order = itertools.count()

    def now_ms(self) -> int:
        return self._now_ms

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> ManualTimer:
        timer = ManualTimer(callback)
        due = self._now_ms + max(int(delay_s * 1000), 0)
        if due <= self._now_ms:
            asyncio.get_running_loop().call_soon(lambda: None if timer.cancelled else callback())
        else:
            heapq.heappush(self._timers, (due, next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> int:
        """Move time forward, firing due timers in time order; returns how many fired."""
        until = self._now_ms + int(seconds * 1000)
        fired = 0
        while self._timers and self._timers[0][0] <= until:
            due, _, timer = heapq.heappop(self._timers)
            self._now_ms = max(self._now_ms, due)
            if not timer.cancelled:
                timer.callback()
                fired += 1
        self._now_ms = until
        return fired

    @property
    def pending(self) -> int:
        return sum(1 for _, _, t in self._timers if not t.cancelled)


_: type[Clock] = ManualClock
