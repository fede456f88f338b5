"""The SDK's close-code policy and backoff (issue 17), without sockets."""

from __future__ import annotations

import pytest

from fleetwire.client.policy import Action, Backoff, decide_close, decide_refusal, parse_retry_after


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (None, Action.RECONNECT),  # TCP dropped
        (1000, Action.RECONNECT),
        (1001, Action.RECONNECT),
        (1006, Action.RECONNECT),
        (1009, Action.RECONNECT),
        (1011, Action.RECONNECT),
        (4001, Action.REFRESH_TOKEN),
        (4003, Action.STOP),
        (4008, Action.RECONNECT),
        (4009, Action.STOP),
        (4029, Action.RECONNECT_SLOW),
        (4999, Action.RECONNECT),  # unknown: backoff, never a tight loop, never stranded
    ],
)
def test_close_codes(code: int | None, action: Action) -> None:
    assert decide_close(code) is action


@pytest.mark.parametrize(
    ("status", "action"),
    [
        (400, Action.STOP),
        (401, Action.REFRESH_TOKEN),
        (403, Action.STOP),
        (404, Action.STOP),
        (426, Action.STOP),
        (429, Action.RECONNECT_SLOW),
        (500, Action.RECONNECT),
        (502, Action.RECONNECT),
        (503, Action.RECONNECT),
    ],
)
def test_handshake_refusals(status: int, action: Action) -> None:
    assert decide_refusal(status) is action


def test_full_jitter_is_uniform_below_the_doubling_ceiling() -> None:
    """random() scales the ceiling min(30, 0.5·2ⁿ); the slow floor and Retry-After add up."""
    draws = iter([0.5, 0.5, 0.5, 0.0, 1.0, 0.1])
    backoff = Backoff(random=lambda: next(draws))
    assert backoff.next_delay(Action.RECONNECT) == 0.25  # ceiling 0.5
    assert backoff.next_delay(Action.RECONNECT) == 0.5  # ceiling 1
    assert backoff.next_delay(Action.RECONNECT_SLOW) == 5.0 + 1.0  # ceiling 2, floor 5
    assert backoff.next_delay(Action.RECONNECT, retry_after_s=7.0) == 7.0  # jitter 0 < Retry-After
    assert backoff.next_delay(Action.RECONNECT, retry_after_s=1.0) == 8.0  # ceiling 8 > Retry-After
    backoff.reset()
    assert backoff.next_delay(Action.RECONNECT) == pytest.approx(0.05)


def test_ceiling_is_capped_for_ever() -> None:
    backoff = Backoff(random=lambda: 1.0)
    delays = [backoff.next_delay(Action.RECONNECT) for _ in range(100)]
    assert delays[:8] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert set(delays[6:]) == {30.0}
    assert backoff.attempt == 32


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("5", 5.0),
        (" 2.5 ", 2.5),
        ("-1", None),
        ("nan", None),
        ("soon", None),
        ("100000", 300.0),
    ],
)
def test_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds
