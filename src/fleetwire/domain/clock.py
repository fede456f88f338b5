"""Time as integer epoch milliseconds inside fleetwire; RFC 3339 with milliseconds on output."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Where every part of fleetwire reads the time; `create_app(clock=)` swaps it in tests."""

    def now_ms(self) -> int:
        """Wall-clock epoch milliseconds (event times, token expiry, command deadlines)."""


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


_: type[Clock] = SystemClock


def now_ms() -> int:
    """The system time, for code outside a wired app (CLI, store defaults)."""
    return time.time_ns() // 1_000_000


def format_ms(ms: int) -> str:
    """RFC 3339 in UTC with millisecond precision (contract §2.1)."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


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
