"""Fleet jobs (contract §7): one command to many devices, rolled out and tracked; no I/O.

A job holds one execution per target device. An execution is `pending` until the rollout
dispatches it; from then on it *is* an ordinary command (contract §2.3) whose record
carries `job_id`, and its state is the command's state. The rollout never dispatches an
execution twice: dispatching is a compare-and-set of the execution from `pending`.

    running ──pause──▶ paused ──resume──▶ running
       │                  │
       ├──every execution final──▶ succeeded (all succeeded) | completed (some did not)
       ├──abort rule fired──────▶ aborted   (executions not yet sent end `canceled`)
       └──cancel (also paused)──▶ canceled  (executions not yet sent end `canceled`)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any, Final

import orjson

from fleetwire.domain.clock import format_ms, format_optional
from fleetwire.domain.commands import DEFAULT_TIMEOUT_S, MAX_PARAMS_BYTES, MAX_TIMEOUT_S
from fleetwire.domain.devices import NAME, Device
from fleetwire.domain.errors import invalid
from fleetwire.domain.jsonvalue import unstorable

DEFAULT_DEADLINE_S: Final = 3600
MAX_DEADLINE_S: Final = 30 * 86_400
MAX_PATTERNS: Final = 100
MAX_TAGS: Final = 32
MAX_PATTERN_CHARS: Final = 128


class JobState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    COMPLETED = "completed"
    ABORTED = "aborted"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self not in (JobState.RUNNING, JobState.PAUSED)


class ExecutionState(StrEnum):
    """What `GET /jobs/{id}/executions` shows; the command's state once dispatched."""

    PENDING = "pending"
    SENT = "sent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"
    SKIPPED = "skipped"
    CANCELED = "canceled"


# What an execution row records by itself; `dispatched` hands its state over to its command.
STORED_PENDING: Final = "pending"
STORED_DISPATCHED: Final = "dispatched"
STORED_SKIPPED: Final = "skipped"
STORED_CANCELED: Final = "canceled"

# Which transitions of the job each request may make (a compare-and-set in the store).
PAUSE_FROM: Final = frozenset({JobState.RUNNING})
RESUME_FROM: Final = frozenset({JobState.PAUSED})
CANCEL_FROM: Final = frozenset({JobState.RUNNING, JobState.PAUSED})
END_FROM: Final = frozenset({JobState.RUNNING, JobState.PAUSED})

_FIELDS: Final = frozenset({"command", "target", "queue", "rollout", "abort", "deadline_s"})
_COMMAND_FIELDS: Final = frozenset({"name", "params", "timeout_s"})


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated `POST /jobs` body."""

    name: str
    params: dict[str, Any]
    timeout_s: int
    patterns: tuple[str, ...] | None  # None: every device (narrowed by tags and the claim)
    tags: tuple[str, ...]
    queue: bool = False
    max_concurrent: int | None = None  # None: no limit
    max_per_minute: int | None = None  # None: no limit
    failure_pct: float | None = None  # None: never abort
    min_executed: int = 0
    deadline_s: int = DEFAULT_DEADLINE_S

    def public(self) -> dict[str, Any]:
        """The spec as `GET /jobs/{id}` shows it (the shape of the request)."""
        target: dict[str, Any] = {"tags": list(self.tags)}
        if self.patterns is not None:
            target["devices"] = list(self.patterns)
        return {
            "command": {"name": self.name, "params": self.params, "timeout_s": self.timeout_s},
            "target": target,
            "queue": self.queue,
            "rollout": {"max_concurrent": self.max_concurrent, "max_per_minute": self.max_per_minute},
            "abort": None
            if self.failure_pct is None
            else {"failure_pct": self.failure_pct, "min_executed": self.min_executed},
            "deadline_s": self.deadline_s,
        }

    def stored(self) -> dict[str, Any]:
        return self.public()

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> JobSpec:
        command, target, rollout, abort = data["command"], data["target"], data["rollout"], data["abort"]
        patterns = target.get("devices")
        return cls(
            name=command["name"],
            params=command["params"],
            timeout_s=command["timeout_s"],
            patterns=None if patterns is None else tuple(patterns),
            tags=tuple(target["tags"]),
            queue=data["queue"],
            max_concurrent=rollout["max_concurrent"],
            max_per_minute=rollout["max_per_minute"],
            failure_pct=None if abort is None else abort["failure_pct"],
            min_executed=0 if abort is None else abort["min_executed"],
            deadline_s=data["deadline_s"],
        )

    def targets(self, device: Device) -> bool:
        """Whether the device is in this job's target (before the principal's claim)."""
        if self.patterns is not None and not any(fnmatchcase(device.id, p) for p in self.patterns):
            return False
        return all(tag in device.tags for tag in self.tags)


def _positive_int(value: Any, upper: int) -> bool:
    return type(value) is int and 1 <= value <= upper


def parse_job(body: Any, *, max_concurrent_cap: int = 10_000) -> JobSpec:
    """Validate a `POST /jobs` body; every problem is reported at once (`invalid_message`)."""
    if not isinstance(body, dict):
        raise invalid("invalid job", [{"loc": [], "msg": "must be an object"}])
    problems: list[dict[str, Any]] = [{"loc": [k], "msg": "unknown field"} for k in body.keys() - _FIELDS]

    def bad(msg: str, *loc: str) -> None:
        problems.append({"loc": list(loc), "msg": msg})

    command = body.get("command")
    name: Any = ""
    params: Any = {}
    timeout_s: Any = DEFAULT_TIMEOUT_S
    if not isinstance(command, dict):
        problems.append({"loc": ["command"], "msg": "required object {name, params?, timeout_s?}"})
    else:
        problems += [
            {"loc": ["command", k], "msg": "unknown field"} for k in command.keys() - _COMMAND_FIELDS
        ]
        name = command.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            problems.append({"loc": ["command", "name"], "msg": "must match ^[A-Za-z0-9_.:-]{1,64}$"})
        params = command.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            problems.append({"loc": ["command", "params"], "msg": "must be an object"})
        elif (why := unstorable(params)) is not None:
            problems.append({"loc": ["command", "params"], "msg": why})
        elif len(orjson.dumps(params)) > MAX_PARAMS_BYTES:
            problems.append({"loc": ["command", "params"], "msg": "larger than 64 KiB"})
        timeout_s = command.get("timeout_s", DEFAULT_TIMEOUT_S)
        if not _positive_int(timeout_s, MAX_TIMEOUT_S):
            problems.append(
                {"loc": ["command", "timeout_s"], "msg": f"must be an integer 1..{MAX_TIMEOUT_S}"}
            )
    patterns: tuple[str, ...] | None = None
    tags: tuple[str, ...] = ()
    target = body.get("target")
    if not isinstance(target, dict):
        problems.append({"loc": ["target"], "msg": "required object {devices?, tags?}"})
    else:
        problems += [
            {"loc": ["target", k], "msg": "unknown field"} for k in target.keys() - {"devices", "tags"}
        ]
        for key, cap in (("devices", MAX_PATTERNS), ("tags", MAX_TAGS)):
            value = target.get(key)
            if value is None:
                continue
            if (
                not isinstance(value, list)
                or not 1 <= len(value) <= cap
                or not all(isinstance(v, str) and 1 <= len(v) <= MAX_PATTERN_CHARS for v in value)
            ):
                problems.append(
                    {"loc": ["target", key], "msg": f"must be a list of 1..{cap} non-empty strings"}
                )
            elif key == "devices":
                patterns = tuple(value)
            else:
                tags = tuple(value)
        if target.get("devices") is None and target.get("tags") is None:
            problems.append({"loc": ["target"], "msg": "needs devices or tags"})
    queue = body.get("queue", False)
    if type(queue) is not bool:
        problems.append({"loc": ["queue"], "msg": "must be a boolean"})
    max_concurrent = max_per_minute = None
    rollout = body.get("rollout")
    if rollout is not None:
        if not isinstance(rollout, dict):
            problems.append({"loc": ["rollout"], "msg": "must be an object"})
        else:
            for extra in rollout.keys() - {"max_concurrent", "max_per_minute"}:
                problems.append({"loc": ["rollout", extra], "msg": "unknown field"})
            max_concurrent = rollout.get("max_concurrent")
            if max_concurrent is not None and not _positive_int(max_concurrent, max_concurrent_cap):
                problems.append(
                    {
                        "loc": ["rollout", "max_concurrent"],
                        "msg": f"must be an integer 1..{max_concurrent_cap}",
                    }
                )
            max_per_minute = rollout.get("max_per_minute")
            if max_per_minute is not None and not _positive_int(max_per_minute, 1_000_000):
                problems.append(
                    {"loc": ["rollout", "max_per_minute"], "msg": "must be an integer 1..1000000"}
                )
    failure_pct: float | None = None
    min_executed = 0
    abort = body.get("abort")
    if abort is not None:
        if not isinstance(abort, dict):
            problems.append({"loc": ["abort"], "msg": "must be an object {failure_pct, min_executed}"})
        else:
            for extra in abort.keys() - {"failure_pct", "min_executed"}:
                problems.append({"loc": ["abort", extra], "msg": "unknown field"})
            pct: Any = abort.get("failure_pct")
            if type(pct) not in (int, float) or not math.isfinite(pct) or not 0 < pct <= 100:
                problems.append({"loc": ["abort", "failure_pct"], "msg": "must be a number in (0, 100]"})
            else:
                failure_pct = float(pct)
            min_executed = abort.get("min_executed", 1)
            if type(min_executed) is not int or not 1 <= min_executed <= 10_000_000:
                problems.append({"loc": ["abort", "min_executed"], "msg": "must be an integer 1..10000000"})
    deadline_s = body.get("deadline_s", DEFAULT_DEADLINE_S)
    if not _positive_int(deadline_s, MAX_DEADLINE_S):
        problems.append({"loc": ["deadline_s"], "msg": f"must be an integer 1..{MAX_DEADLINE_S}"})
    if problems:
        raise invalid("invalid job", problems)
    return JobSpec(
        name=name,
        params=params,
        timeout_s=timeout_s,
        patterns=patterns,
        tags=tags,
        queue=queue,
        max_concurrent=max_concurrent,
        max_per_minute=max_per_minute,
        failure_pct=failure_pct,
        min_executed=min_executed,
        deadline_s=deadline_s,
    )


@dataclass(frozen=True, slots=True)
class Counts:
    """Executions per state (contract §7 `counts`)."""

    total: int = 0
    pending: int = 0
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    expired: int = 0
    skipped: int = 0
    canceled: int = 0
    # Of `pending`: dispatched executions whose command waits queued for its offline device.
    queued: int = 0

    @classmethod
    def of(cls, by_state: dict[str, int]) -> Counts:
        """From the store's counts (Store.job_counts: `queued` apart from `pending`)."""
        known = {s.value: by_state.get(s.value, 0) for s in ExecutionState}
        queued = by_state.get("queued", 0)
        known["pending"] += queued
        return cls(total=sum(by_state.values()), queued=queued, **known)

    def public(self) -> dict[str, int]:
        return {
            "total": self.total,
            "pending": self.pending,
            "sent": self.sent,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "expired": self.expired,
            "skipped": self.skipped,
            "canceled": self.canceled,
        }

    @property
    def ended(self) -> int:
        """Executions that ran to an answer or a timeout: what the abort rule judges."""
        return self.succeeded + self.failed + self.timed_out

    @property
    def in_flight(self) -> int:
        """Executions holding a rollout slot: sent, or queued for an offline device."""
        return self.sent + self.queued

    @property
    def all_final(self) -> bool:
        return self.pending == 0 and self.sent == 0


def should_abort(spec: JobSpec, counts: Counts) -> bool:
    """Contract §7: failed + timed_out ≥ failure_pct % of the executions that ended in
    succeeded, failed or timed_out, once at least `min_executed` have."""
    if spec.failure_pct is None or counts.ended < max(spec.min_executed, 1):
        return False
    # Integer-exact form of (failed + timed_out) / ended * 100 >= failure_pct.
    return (counts.failed + counts.timed_out) * 100 >= spec.failure_pct * counts.ended


def end_state(counts: Counts) -> JobState:
    """The final state of a job whose executions are all final."""
    return JobState.SUCCEEDED if counts.succeeded == counts.total else JobState.COMPLETED


class TokenBucket:
    """`max_per_minute` as a token bucket on the caller's clock (milliseconds): `rate` per
    minute, holding at most one second's worth (at least one token), so that over any
    window of t seconds at most burst + t × rate / 60 executions leave."""

    def __init__(self, per_minute: int, now_ms: int) -> None:
        self.per_minute = per_minute
        self.burst = max(1.0, per_minute / 60)
        self._tokens = self.burst
        self._at_ms = now_ms

    def _refill(self, now_ms: int) -> None:
        if now_ms > self._at_ms:
            self._tokens = min(self.burst, self._tokens + (now_ms - self._at_ms) * self.per_minute / 60_000)
            self._at_ms = now_ms

    def available(self, now_ms: int) -> int:
        self._refill(now_ms)
        return int(self._tokens + 1e-9)

    def take(self, n: int, now_ms: int) -> None:
        self._refill(now_ms)
        self._tokens -= n

    def next_in_s(self, now_ms: int) -> float:
        """Seconds until the next whole token (0 when one is there)."""
        self._refill(now_ms)
        missing = 1 - self._tokens
        return 0.0 if missing <= 1e-9 else missing * 60 / self.per_minute


def admit(spec: JobSpec, in_flight: int, tokens: int | None, batch: int) -> int:
    """How many executions may be dispatched now: free slots under `max_concurrent`, the
    rate's tokens, and at most `batch` at once."""
    n = batch
    if spec.max_concurrent is not None:
        n = min(n, spec.max_concurrent - in_flight)
    if tokens is not None:
        n = min(n, tokens)
    return max(n, 0)


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    state: JobState
    spec: JobSpec
    issuer: str
    created_at_ms: int
    updated_at_ms: int
    total: int
    finished_at_ms: int | None = None
    # The creator's `devices` claim, kept so that only principals who may see a device of
    # the job see it too (None: the creator saw every device).
    claim: tuple[str, ...] | None = None

    def public(self, counts: Counts) -> dict[str, Any]:
        spec = self.spec.public()
        return {
            "job_id": self.id,
            "state": self.state.value,
            **spec,
            "issuer": self.issuer,
            "created_at": format_ms(self.created_at_ms),
            "updated_at": format_ms(self.updated_at_ms),
            "finished_at": format_optional(self.finished_at_ms),
            "counts": counts.public(),
        }

    def progress(self, counts: Counts, at_ms: int) -> dict[str, Any]:
        """The `{"type": "job"}` frame of a `"jobs": true` subscription (contract §7)."""
        return {
            "type": "job",
            "job_id": self.id,
            "state": self.state.value,
            "counts": counts.public(),
            "at": format_ms(at_ms),
        }


@dataclass(frozen=True, slots=True)
class Execution:
    job_id: str
    index: int  # rollout order
    device_id: str
    command_id: str  # fixed at creation: the execution's command id and idempotency key
    state: ExecutionState
    updated_at_ms: int
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "command_id": self.command_id,
            "state": self.state.value,
            "result": self.result,
            "error": self.error,
            "updated_at": format_ms(self.updated_at_ms),
        }
