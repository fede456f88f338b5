"""Admission control for one connection (issue 12): bounded work in flight, without I/O.

Both session cores — the WebSocket one (`realtime/session.py`) and the MQTT one
(`realtime/mqtt/session.py`) — turn a peer's messages into requests that a service carries out
asynchronously. Without a bound, a peer that sends faster than the services answer makes the
server pile up tasks (and memory) without end. The rule, in one place:

- At most `cap` (`max_in_flight`) accepted requests run at once; the rest wait, parsed, in
  arrival order (they are what the transport had already read: the rest of one read buffer).
- While any request waits, every new one waits behind it, even if a slot is free: requests
  start in the order they arrived.
- Nothing starts before the session is `ready` (a device's requests wait until its
  `device.connected` is recorded) or after it is `closed` (the queue is dropped then).
- When accepting a request brings the work in flight (running + waiting) to the cap, the
  session pauses reading: backpressure reaches the peer's TCP window instead of a queue that
  grows without bound. Once a request finishes and the work in flight is below the cap again,
  reading resumes. A paused session never resumes once closed.

`Admission` only keeps the counts and tells its core what to do: `admit` returns flags
(`PAUSED`, `STARTED`), `take` hands out the next waiting request that may start, `resume` and
`pause` say whether to emit the core's resume/pause action. Each core turns these into its own
actions (`Call` or `Run`, `PauseReading`, `ResumeReading`) and keeps its own ordering concerns
(the MQTT PUBACK order) and its close handling (a close waits for the work in flight, for at
most a grace period, and must not resume reading meanwhile: the core does not call `resume`
while it is closing).

It runs once per message, so it allocates nothing per request beyond the queue's own slot,
and the queue itself is made only when a request first has to wait.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Generic, TypeVar

R = TypeVar("R")

# `admit`'s result: plain int bits rather than an enum.Flag, because combining Flag members
# allocates and this runs per message.
PAUSED: Final = 1  # pause reading now (before starting the request, if STARTED is set too)
STARTED: Final = 2  # the request is running now; otherwise it waits for `take`


class Admission(Generic[R]):
    """At most `cap` requests in flight per connection, the rest queued in arrival order."""

    # One per connection: slots keep it small (issue 12: ≤ 12 KB per idle connection).
    __slots__ = ("_cap", "_queued", "_running", "closed", "paused", "ready")

    def __init__(self, cap: int, *, ready: bool) -> None:
        self._cap = cap
        self._queued: deque[R] | None = None  # accepted, not yet running (made on first use)
        self._running = 0  # started, not yet finished
        self.paused = False  # the core emitted its pause action and no resume since
        self.ready = ready  # requests may start (a device: once `device.connected` is recorded)
        self.closed = False  # set by `shut`: nothing starts or resumes any more

    @property
    def in_flight(self) -> int:
        """Accepted requests without their reply yet (running or waiting to run)."""
        queued = self._queued
        return self._running + (len(queued) if queued else 0)

    @property
    def running(self) -> int:
        return self._running

    def admit(self, request: R) -> int:
        """Accept `request`: `STARTED` if it runs now, `PAUSED` if reading pauses now (0: it
        waits and reading goes on)."""
        cap = self._cap
        queued = self._queued
        running = self._running
        flags = 0
        # `+ 1`: this request counts. Pausing when it reaches the cap (not once it is over)
        # leaves only what the transport had already read to queue behind the cap.
        # (`in_flight` inlined: this runs per message.)
        if not self.paused and running + (len(queued) if queued else 0) + 1 >= cap:
            self.paused = True
            flags = PAUSED
        # Queued requests run first: while there are any, every slot is theirs (see `take`).
        if self.ready and not self.closed and not queued and running < cap:
            self._running = running + 1
            return flags | STARTED
        if queued is None:
            queued = self._queued = deque()
        queued.append(request)
        return flags

    def take(self) -> R | None:
        """The next waiting request, now counted as running, if one may start (a free slot,
        ready, not closed); None otherwise. The core calls it until None after whatever may
        free a slot or open the gate (`finish`, `ready`)."""
        queued = self._queued
        if not queued or not self.ready or self.closed or self._running >= self._cap:
            return None
        self._running += 1
        return queued.popleft()

    def finish(self) -> None:
        """A running request finished (its reply went out, or none was due)."""
        self._running -= 1

    def resume(self) -> bool:
        """Whether to resume reading now: paused, not closed, and the work in flight is below
        the cap again. Called after `finish` (and the `take`s it allowed)."""
        if self.paused and not self.closed and self.in_flight < self._cap:
            self.paused = False
            return True
        return False

    def pause(self) -> bool:
        """Pause reading unconditionally (a close waiting for the work in flight reads nothing
        more); True if the core must emit its pause action (it was not paused yet)."""
        if self.paused:
            return False
        self.paused = True
        return True

    def shut(self) -> None:
        """The session ended: drop what waits, start nothing and resume nothing any more."""
        self._queued = None
        self.closed = True
