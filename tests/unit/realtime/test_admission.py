"""Admission control (realtime/admission.py) on its own: counts in, decisions out. Each test
states one rule of the module docstring, with the exact values both session cores rely on."""

from __future__ import annotations

from fleetwire.realtime.admission import PAUSED, STARTED, Admission


def admission(cap: int, *, ready: bool = True) -> Admission[str]:
    return Admission(cap, ready=ready)


def test_requests_start_until_the_cap_then_wait() -> None:
    gate = admission(2)
    assert gate.admit("a") == STARTED
    assert gate.admit("b") == PAUSED | STARTED  # reaches the cap: pause, and it still runs
    assert gate.admit("c") == 0  # beyond the cap: waits (already paused: no second pause)
    assert gate.admit("d") == 0
    assert (gate.running, gate.in_flight, gate.paused) == (2, 4, True)
    assert gate.take() is None  # no free slot


def test_reading_pauses_once_when_the_work_in_flight_reaches_the_cap() -> None:
    gate = admission(3)
    assert [gate.admit(r) for r in "abcde"] == [STARTED, STARTED, PAUSED | STARTED, 0, 0]


def test_a_cap_of_one_pauses_at_the_first_request() -> None:
    gate = admission(1)
    assert gate.admit("a") == PAUSED | STARTED
    assert gate.admit("b") == 0


def test_waiting_requests_start_in_arrival_order_one_per_free_slot() -> None:
    gate = admission(2)
    for request in "abcde":
        gate.admit(request)
    gate.finish()
    assert (gate.take(), gate.take()) == ("c", None)
    gate.finish()
    gate.finish()
    assert (gate.take(), gate.take(), gate.take()) == ("d", "e", None)
    assert (gate.running, gate.in_flight) == (2, 2)


def test_while_requests_wait_a_new_one_waits_behind_them_even_with_a_free_slot() -> None:
    gate = admission(3, ready=False)
    assert gate.admit("a") == 0
    gate.ready = True
    assert gate.admit("b") == 0  # a slot is free, but "a" came first
    assert (gate.running, gate.in_flight) == (0, 2)
    assert (gate.take(), gate.take(), gate.take()) == ("a", "b", None)
    assert gate.admit("c") == PAUSED | STARTED  # nothing waits now: it starts at once


def test_reading_resumes_when_the_work_in_flight_is_below_the_cap_again() -> None:
    """Waiting requests count: a finish that only lets a waiting one start keeps the pause."""
    gate = admission(2)
    for request in "abcd":
        gate.admit(request)
    results = []
    for _ in range(3):
        gate.finish()
        while gate.take() is not None:
            pass
        results.append((gate.in_flight, gate.resume()))
    assert results == [(3, False), (2, False), (1, True)]
    assert gate.paused is False
    gate.finish()
    assert gate.resume() is False  # resumed already: once per pause


def test_resume_is_false_when_not_paused() -> None:
    gate = admission(3)
    gate.admit("a")
    gate.finish()
    assert (gate.paused, gate.resume()) == (False, False)


def test_pause_for_a_close_says_so_once_and_admit_does_not_pause_again() -> None:
    gate = admission(3)
    gate.admit("a")
    assert gate.pause() is True
    assert gate.pause() is False
    assert [gate.admit(r) for r in "bc"] == [STARTED, STARTED]  # at the cap, already paused
    assert gate.paused is True


def test_nothing_starts_before_ready() -> None:
    gate = admission(2, ready=False)
    assert [gate.admit(r) for r in "abc"] == [0, PAUSED, 0]  # the pause does not wait for ready
    assert gate.take() is None
    assert (gate.running, gate.in_flight) == (0, 3)
    gate.ready = True
    assert (gate.take(), gate.take(), gate.take()) == ("a", "b", None)  # up to the cap


def test_shut_drops_what_waits_and_nothing_starts_or_resumes_afterwards() -> None:
    gate = admission(2)
    for request in "abc":
        gate.admit(request)
    gate.shut()
    assert (gate.closed, gate.running, gate.in_flight) == (True, 2, 2)  # running ones still report
    gate.finish()
    assert gate.take() is None
    assert gate.resume() is False  # paused, below the cap, but closed
    assert gate.admit("d") == 0  # waits (as the cores did), and never starts
    gate.finish()
    assert (gate.take(), gate.running, gate.in_flight) == (None, 0, 1)


def test_the_queue_is_made_only_when_a_request_first_waits() -> None:
    """One Admission per connection (issue 12: bytes per idle connection count)."""
    gate = admission(2)
    gate.admit("a")
    assert gate._queued is None
    gate.admit("b")
    gate.admit("c")
    assert gate._queued is not None
