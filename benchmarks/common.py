"""Small shared pieces: latency summaries and the progress line on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

# The header every load-generator connection carries: the bare servers know their peers by it
# (they do not verify tokens); fleetwire ignores it.
BENCH_ID_HEADER = "X-Bench-Id"


def latency_ms(samples_ns: Sequence[int]) -> dict[str, float | int]:
    """p50/p90/p99/max (nearest rank) in milliseconds, and the sample count."""
    if not samples_ns:
        return {"n": 0, "p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "max": float("nan")}
    ordered = sorted(samples_ns)
    count = len(ordered)

    def rank(q: float) -> float:
        index = min(count - 1, max(0, int(q * count + 0.999999) - 1))
        return round(ordered[index] / 1e6, 3)

    return {
        "n": count,
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": round(ordered[-1] / 1e6, 3),
    }


class Progress:
    """One updating line on stderr (a line per phase when stderr is not a terminal)."""

    def __init__(self, prefix: str, enabled: bool = True) -> None:
        self.prefix = prefix
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last_len = 0
        self._last_plain = 0.0

    def phase(self, name: str, total_s: float, status: Callable[[], str], now: float, start: float) -> None:
        if not self.enabled:
            return
        elapsed = max(now - start, 0.0)
        if total_s > 0:
            done = min(elapsed, total_s)
            width = 24
            filled = int(width * done / total_s)
            bar = "#" * filled + "." * (width - filled)
            line = f"{self.prefix} {name:<14} [{bar}] {done:5.1f}/{total_s:.0f}s {status()}"
        else:
            done = 0.0
            line = f"{self.prefix} {name:<14} {elapsed:5.1f}s {status()}"
        if self.tty:
            pad = max(self._last_len - len(line), 0)
            sys.stderr.write("\r" + line + " " * pad)
            sys.stderr.flush()
            self._last_len = len(line)
        elif time.monotonic() - self._last_plain >= 5.0 or (total_s > 0 and done >= total_s):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            self._last_plain = time.monotonic()

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty and self._last_len:
            sys.stderr.write("\r" + " " * self._last_len + "\r")
            self._last_len = 0
        sys.stderr.write(f"{self.prefix} {text}\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.enabled and self.tty and self._last_len:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._last_len = 0
