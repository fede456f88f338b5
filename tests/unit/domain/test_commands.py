"""Command ids: ordered by issue, unguessable."""

from __future__ import annotations

from fleetwire.domain.commands import CommandIds


def test_command_ids_sort_in_issue_order_within_one_millisecond() -> None:
    """Ids issued in the same millisecond, or after the clock stepped back, still sort in
    issue order; each is 32 hex digits: milliseconds, a counter, then randomness."""
    ids = CommandIds()
    issued = [ids.next(1_000), ids.next(1_000), ids.next(999), ids.next(1_001)]
    assert issued == sorted(issued)
    assert len(set(issued)) == 4
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in issued)
    assert [i[:16] for i in issued] == [
        "0000000003e80000",
        "0000000003e80001",
        "0000000003e80002",
        "0000000003e90000",
    ]
