"""What a client asks to receive (contract §2.4), as parsed from any transport."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Subscribe:
    devices: tuple[str, ...]  # ids and glob patterns, deduplicated in order
    events: frozenset[str]  # event classes
    resume: dict[str, int] | None  # device id -> last seq seen
    jobs: bool = False  # `{"type": "job"}` progress frames too (contract §7)
