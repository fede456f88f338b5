"""format_ms: exact RFC 3339 text, also across the one-second cache's boundaries."""

from __future__ import annotations

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
