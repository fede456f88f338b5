"""What a client does when its session ends: the close-code policy and the backoff.

Sans-I/O: `decide_close` / `decide_refusal` map what the server said to an `Action`, and
`Backoff` computes the wait (full jitter, AWS Architecture Blog "Exponential Backoff And
Jitter"), from an injected random source. docs/sdk.md has the table with the reasons.
"""

from __future__ import annotations

import enum
import math
import random as _random
from collections.abc import Callable
from dataclasses import dataclass


class Action(enum.Enum):
    RECONNECT = "reconnect"  # backoff, then connect again
    RECONNECT_SLOW = "reconnect_slow"  # rate limited: a longer backoff
    REFRESH_TOKEN = "refresh_token"  # ask the token provider again, then reconnect
    STOP = "stop"  # reconnecting cannot help (or would do harm): close the client


# contract §2 close codes; see docs/sdk.md for the reason of each line.
_CLOSE_ACTIONS: dict[int, Action] = {
    1000: Action.RECONNECT,  # the server answered a close we did not ask for: treat as a drop
    1001: Action.RECONNECT,  # server_shutdown / timeout: another node takes us
    1011: Action.RECONNECT,  # internal_error
    1006: Action.RECONNECT,  # no close frame: the TCP connection dropped
    4001: Action.REFRESH_TOKEN,  # token_expired
    4003: Action.STOP,  # forbidden: deleted, disabled or rights revoked
    4008: Action.RECONNECT,  # slow_consumer: resume covers what was lost
    4009: Action.STOP,  # replaced: two instances of one device must not ping-pong
    4029: Action.RECONNECT_SLOW,  # rate_limited
}


def decide_close(code: int | None) -> Action:
    """The action for a session that ended with close ``code`` (None: no close frame).

    A code not in the table (1002/1007/1009: the client sent something wrong; unknown 4xxx)
    reconnects with backoff: the backoff keeps a buggy client from looping tightly, and
    stopping a device for good on an unknown code would strand it.
    """
    if code is None:
        return Action.RECONNECT
    return _CLOSE_ACTIONS.get(code, Action.RECONNECT)


def decide_refusal(status: int) -> Action:
    """The action for a handshake refused with HTTP ``status`` (contract §2)."""
    if status == 401:
        return Action.REFRESH_TOKEN
    if status == 429:
        return Action.RECONNECT_SLOW
    if status >= 500:
        return Action.RECONNECT  # 503 at the connection limit or the store down; Retry-After
    return Action.STOP  # 403 (role, unknown or disabled device, Origin) and the other 4xx


@dataclass
class Backoff:
    """Full-jitter exponential backoff: attempt n waits uniform(0, min(cap, base·2ⁿ)).

    `slow_floor_s` is added for `RECONNECT_SLOW` (4029, 429) so that a rate-limited client
    waits at least that long. `reset()` after a session that lasted `stable_s`.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    slow_floor_s: float = 5.0
    stable_s: float = 30.0
    random: Callable[[], float] = _random.random
    attempt: int = 0

    def next_delay(self, action: Action, retry_after_s: float | None = None) -> float:
        ceiling = min(self.cap_s, math.ldexp(self.base_s, self.attempt))  # base·2ⁿ
        self.attempt = min(self.attempt + 1, 32)  # 2**32 · base is far past any cap
        delay = float(self.random()) * ceiling
        if action is Action.RECONNECT_SLOW:
            delay += self.slow_floor_s
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return delay

    def reset(self) -> None:
        self.attempt = 0


def parse_retry_after(value: str | None, cap_s: float = 300.0) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds form; RFC 9110 §10.2.3), capped."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP-date: fleetwire never sends one; fall back to the backoff
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return min(seconds, cap_s)
