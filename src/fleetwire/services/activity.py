"""FleetActivity: per-minute counts of what the fleet did, for the dashboard (issue 17).

A hub listener: every node's hub receives every event of the cluster (see broker.base), so
the counts are cluster-wide, from the moment this node started (nothing is read back from
the store: a restarted node starts from zero, which `since` in the summary says).

Counted per minute, for the last `window_minutes` minutes: connects, disconnects by reason,
telemetry records, and commands issued / succeeded / failed / timed out. A device that
disconnected at least `flapping_disconnects` times within the window is *flapping*.

Memory is bounded: `window_minutes` buckets, and per device its latest 50 (or
`flapping_disconnects`, if more) disconnect times; devices with none in the window are
forgotten when a bucket rolls over. Only presence and `command.updated` payloads
are decoded (telemetry records are counted, by `Hub.count_records`, never made into events).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from fleetwire.broker.base import Published
from fleetwire.domain.clock import Clock, format_ms

_MINUTE_MS = 60_000
_KEPT_DISCONNECTS = 50  # per device: enough to rank flapping devices, bounded
# command.updated states counted, and the name each one has in a bucket.
_COMMAND_STATES = {"succeeded": "succeeded", "failed": "failed", "timed_out": "timed_out"}
_ISSUED_STATES = frozenset({"sent", "pending"})


@dataclass(slots=True)
class _Minute:
    start_ms: int
    connects: int = 0
    telemetry: int = 0
    issued: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def public(self) -> dict[str, Any]:
        return {
            "at": format_ms(self.start_ms),
            "connects": self.connects,
            "disconnects": sum(self.reasons.values()),
            "telemetry": self.telemetry,
            "commands_issued": self.issued,
            "commands_succeeded": self.succeeded,
            "commands_failed": self.failed,
            "commands_timed_out": self.timed_out,
        }


class FleetActivity:
    def __init__(self, clock: Clock, *, window_minutes: int = 60, flapping_disconnects: int = 3) -> None:
        if window_minutes < 1 or flapping_disconnects < 1:
            raise ValueError("window_minutes and flapping_disconnects must be at least 1")
        self._clock = clock
        self._window = window_minutes
        self._flapping = flapping_disconnects
        self._since_ms = clock.now_ms()
        self._minutes: deque[_Minute] = deque(maxlen=window_minutes)
        self._disconnects: dict[str, deque[int]] = {}  # device -> its latest disconnect times
        self._nodes: dict[str, int] = {}  # node -> when a device last connected there

    def _current(self, now_ms: int) -> _Minute:
        start = now_ms - now_ms % _MINUTE_MS
        minutes = self._minutes
        if not minutes or minutes[-1].start_ms < start:
            minutes.append(_Minute(start))
            self._forget(now_ms)
        return minutes[-1]

    def _forget(self, now_ms: int) -> None:
        horizon = self._horizon(now_ms)
        while self._minutes[0].start_ms < horizon:  # quiet minutes leave no bucket: by time
            self._minutes.popleft()
        for device_id in [d for d, times in self._disconnects.items() if times[-1] < horizon]:
            del self._disconnects[device_id]
        for node in [n for n, at in self._nodes.items() if at < horizon]:
            del self._nodes[node]

    def _horizon(self, now_ms: int) -> int:
        """The start of the oldest minute still in the window."""
        return now_ms - now_ms % _MINUTE_MS - (self._window - 1) * _MINUTE_MS

    def on_records(self, device_id: str, count: int) -> None:
        """A hub record counter (`Hub.count_records`): `count` telemetry records delivered."""
        self._current(self._clock.now_ms()).telemetry += count

    def on_event(self, event: Published) -> None:
        """A hub listener (every event of the cluster but telemetry records, in each device's
        seq order)."""
        name = event.name
        if name == "device.connected":
            now = self._clock.now_ms()
            self._current(now).connects += 1
            node = event.data.get("node")
            if isinstance(node, str):
                self._nodes[node] = now
        elif name == "device.disconnected":
            now = self._clock.now_ms()
            reason = event.data.get("reason")
            self._current(now).reasons[reason if isinstance(reason, str) else "unknown"] += 1
            times = self._disconnects.get(event.device_id)
            if times is None:
                times = deque(maxlen=max(self._flapping, _KEPT_DISCONNECTS))
                self._disconnects[event.device_id] = times
            times.append(now)
        elif name == "command.updated":
            state = event.data.get("state")
            minute = self._current(self._clock.now_ms())
            if state in _ISSUED_STATES:
                minute.issued += 1
            elif state in _COMMAND_STATES:
                counter = _COMMAND_STATES[state]
                setattr(minute, counter, getattr(minute, counter) + 1)

    def summary(self, minutes: int | None = None) -> dict[str, Any]:
        """The last `minutes` (default the whole window) per minute, oldest first, with a
        zero row for a quiet minute; reasons and flapping devices over the whole window."""
        now = self._clock.now_ms()
        self._current(now)  # roll the window forward
        count = self._window if minutes is None else max(1, min(minutes, self._window))
        by_start = {m.start_ms: m for m in self._minutes}
        current = now - now % _MINUTE_MS
        rows = [
            by_start.get(start, _Minute(start)).public()
            for start in range(current - (count - 1) * _MINUTE_MS, current + 1, _MINUTE_MS)
        ]
        reasons: Counter[str] = Counter()
        for minute in self._minutes:
            reasons.update(minute.reasons)
        horizon = self._horizon(now)
        counts = sorted(
            (
                (-n, device_id, times[-1])
                for device_id, times in self._disconnects.items()
                if (n := sum(1 for t in times if t >= horizon)) >= self._flapping
            )
        )
        flapping = [
            {"device_id": device_id, "disconnects": -negative, "last_at": format_ms(last)}
            for negative, device_id, last in counts
        ]
        return {
            "since": format_ms(self._since_ms),
            "window_minutes": self._window,
            "minutes": rows,
            "disconnect_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            "flapping": flapping,
            "flapping_threshold": self._flapping,
            "nodes": sorted(self._nodes),
        }
