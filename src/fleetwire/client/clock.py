"""The SDK's time: a monotonic clock for backoff and the watchdog, wall time for timestamps.

Injectable so that tests drive backoff, stable periods and the ping watchdog without waiting.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class ClientClock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (backoff, watchdog, stable period)."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch (telemetry `ts`, command `expires_at`)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


_: type[ClientClock] = SystemClock
