"""Time as integer epoch milliseconds inside fleetwire; RFC 3339 with milliseconds on output."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Where fleetwire reads the time and arms its timers; `create_app(clock=)` swaps it.

    Every deadline of a session, a command or a periodic step goes through `call_later`, so
    a test clock that is advanced by hand runs them all at once, without real waits.
    """

    def now_ms(self) -> int:
        """Wall-clock epoch milliseconds (event times, token expiry, command deadlines)."""

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` on the event loop after `delay_s` seconds of this clock."""


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay_s, callback)


_: type[Clock] = SystemClock


def now_ms() -> int:
    """The system time, for code outside a wired app (CLI, store defaults)."""
    return time.time_ns() // 1_000_000


# Seconds already formatted: every record event of a batch carries an `at`, and strftime +
# gmtime per record was 15 % of the batch-ingest profile (benchmarks/results.md). Several
# entries, not one: a command formats its issue time and its expiry (seconds apart) in turn,
# and a one-entry cache missed twice per round trip (issue 12). Dict reads and writes are
# atomic, so the writer thread and the loop share it safely; cleared whole when full.
_formatted: dict[int, str] = {}
_FORMATTED_MAX: Final = 256


def format_ms(ms: int) -> str:
    """RFC 3339 in UTC with millisecond precision (contract §2.1)."""
    seconds, millis = divmod(ms, 1000)
    text = _formatted.get(seconds)
    if text is None:
        if len(_formatted) >= _FORMATTED_MAX:
            _formatted.clear()
        text = _formatted[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{millis:03d}Z"


def format_optional(ms: int | None) -> str | None:
    return None if ms is None else format_ms(ms)


def parse_rfc3339(text: str) -> int:
    """Parse an RFC 3339 timestamp that carries an offset; raise ValueError otherwise."""
    if len(text) > 40 or "T" not in text.upper():
        raise ValueError("not an RFC 3339 timestamp")
    value = datetime.fromisoformat(text.replace("z", "Z"))
    if value.tzinfo is None:
        raise ValueError("timestamp needs an offset such as Z or +02:00")
    return from_datetime(value)


def from_datetime(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # Whole seconds from timestamp() are exact; sub-second digits are truncated to milliseconds.
    return (int(value.replace(microsecond=0).timestamp())) * 1000 + value.microsecond // 1000


class Timestamps:
    """format_ms with the seconds part cached: the same text, without a strftime per record.

    Records of one batch mostly share their second; format_ms costs ~4 µs a call, a third of
    the Python work per record on the ingest path (measured with py-spy). Not thread-safe: one
    per thread (a write group, a run of record events made into Events).
    """

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, ms: int) -> str:
        second, millis = divmod(ms, 1000)
        if second != self._second:
            self._prefix = format_ms(second * 1000)[:-5]  # drop ".000Z"
            self._second = second
        return f"{self._prefix}.{millis:03d}Z"
