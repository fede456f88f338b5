"""format_ms: exact RFC 3339 text, also across its cache of formatted seconds."""

from __future__ import annotations

from fleetwire.domain import clock
from fleetwire.domain.clock import format_ms, parse_rfc3339


def test_exact_text_within_and_across_seconds() -> None:
    # 2026-12-01T12:00:00Z = 1796126400 s; the cache must not leak a second into the next.
    base = 1_796_126_400_000
    assert format_ms(base + 999) == "2026-12-01T12:00:00.999Z"
    assert format_ms(base + 1000) == "2026-12-01T12:00:01.000Z"
    assert format_ms(base + 1) == "2026-12-01T12:00:00.001Z"
    assert format_ms(0) == "1970-01-01T00:00:00.000Z"
    assert format_ms(base + 1) == "2026-12-01T12:00:00.001Z"


def test_round_trip_with_parse() -> None:
    for ms in (0, 1, 999, 1_000, 86_399_999, 1_796_126_400_123, 4_102_444_799_999):
        assert parse_rfc3339(format_ms(ms)) == ms


def test_alternating_seconds_and_a_full_cache_stay_exact() -> None:
    """A command formats its issue time and its expiry in turn; past the cache's size it is
    emptied and refilled, and every text stays the computed one."""
    issued, expires = 1_796_126_400_250, 1_796_126_430_250
    for _ in range(3):
        assert format_ms(issued) == "2026-12-01T12:00:00.250Z"
        assert format_ms(expires) == "2026-12-01T12:00:30.250Z"
    size = clock._FORMATTED_MAX  # the cache is emptied once this many seconds are held
    for second in range(size + 5):
        assert parse_rfc3339(format_ms(second * 1000 + 7)) == second * 1000 + 7
    assert len(clock._formatted) <= size
    assert format_ms(issued) == "2026-12-01T12:00:00.250Z"
