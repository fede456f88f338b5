"""domain.jobs: job validation, counts, the abort rule, the token bucket and admission."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetwire.domain.devices import Device
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.jobs import (
    DEFAULT_DEADLINE_S,
    Counts,
    Execution,
    ExecutionState,
    Job,
    JobSpec,
    JobState,
    TokenBucket,
    admit,
    end_state,
    parse_job,
    should_abort,
)

MINIMAL: dict[str, Any] = {"command": {"name": "reboot"}, "target": {"tags": ["site-a"]}}


def _problems(body: Any) -> list[tuple[list[Any], str]]:
    with pytest.raises(FleetwireError) as caught:
        parse_job(body)
    assert caught.value.code is ErrorCode.INVALID_MESSAGE
    return [(d["loc"], d["msg"]) for d in caught.value.details]


def test_a_minimal_job_takes_the_defaults() -> None:
    """Only command name and a target: timeout 30, no queue, no limits, no abort, 3600 s."""
    spec = parse_job(MINIMAL)
    assert spec == JobSpec(name="reboot", params={}, timeout_s=30, patterns=None, tags=("site-a",))
    assert spec.deadline_s == DEFAULT_DEADLINE_S


def test_every_field_round_trips_through_storage() -> None:
    """A full spec survives stored() → from_stored() and shows the request's shape."""
    body = {
        "command": {"name": "fw.update", "params": {"v": "2.1"}, "timeout_s": 120},
        "target": {"devices": ["site-a.*", "d1"], "tags": ["x", "y"]},
        "queue": True,
        "rollout": {"max_concurrent": 20, "max_per_minute": 600},
        "abort": {"failure_pct": 12.5, "min_executed": 10},
        "deadline_s": 7200,
    }
    spec = parse_job(body)
    assert JobSpec.from_stored(spec.stored()) == spec
    assert spec.public() == {**body, "abort": {"failure_pct": 12.5, "min_executed": 10}}
    assert JobSpec.from_stored(parse_job(MINIMAL).stored()) == parse_job(MINIMAL)


def test_every_problem_is_reported_at_once() -> None:
    """Unknown fields and each bad value have their own detail."""
    problems = _problems(
        {
            "command": {"name": "bad name", "params": [], "timeout_s": 0, "x": 1},
            "target": {"devices": [], "tags": [""], "y": 1},
            "queue": "yes",
            "rollout": {"max_concurrent": 0, "max_per_minute": 1.5, "z": 1},
            "abort": {"failure_pct": 0, "min_executed": 0, "w": 1},
            "deadline_s": 0,
            "extra": True,
        }
    )
    assert sorted(str(loc) for loc, _ in problems) == sorted(
        str(loc)
        for loc in [
            ["extra"],
            ["command", "x"],
            ["command", "name"],
            ["command", "params"],
            ["command", "timeout_s"],
            ["target", "y"],
            ["target", "devices"],
            ["target", "tags"],
            ["queue"],
            ["rollout", "z"],
            ["rollout", "max_concurrent"],
            ["rollout", "max_per_minute"],
            ["abort", "w"],
            ["abort", "failure_pct"],
            ["abort", "min_executed"],
            ["deadline_s"],
        ]
    )


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ([], []),
        ({"target": {"tags": ["t"]}}, ["command"]),
        ({"command": {"name": "x"}}, ["target"]),
        ({"command": {"name": "x"}, "target": {}}, ["target"]),
        ({**MINIMAL, "rollout": 3}, ["rollout"]),
        ({**MINIMAL, "abort": 3}, ["abort"]),
        ({**MINIMAL, "abort": {"failure_pct": float("nan")}}, ["abort", "failure_pct"]),
        ({**MINIMAL, "abort": {"failure_pct": 101}}, ["abort", "failure_pct"]),
        ({**MINIMAL, "command": {"name": "x", "params": {"big": "x" * 70_000}}}, ["command", "params"]),
        ({**MINIMAL, "command": {"name": "x", "params": {"n": 2**70}}}, ["command", "params"]),
        ({**MINIMAL, "target": {"tags": "t"}}, ["target", "tags"]),
        ({**MINIMAL, "deadline_s": True}, ["deadline_s"]),
    ],
)
def test_bad_bodies_name_the_bad_field(body: Any, loc: list[str]) -> None:
    assert [p[0] for p in _problems(body)] == [loc]


def test_max_concurrent_has_a_configurable_cap() -> None:
    body = {**MINIMAL, "rollout": {"max_concurrent": 50}}
    assert parse_job(body, max_concurrent_cap=50).max_concurrent == 50
    with pytest.raises(FleetwireError):
        parse_job(body, max_concurrent_cap=49)


def test_targets_match_any_pattern_and_every_tag() -> None:
    spec = parse_job({"command": {"name": "x"}, "target": {"devices": ["a.*", "b1"], "tags": ["t", "u"]}})
    assert spec.targets(Device("a.1", tags=("t", "u", "v")))
    assert spec.targets(Device("b1", tags=("u", "t")))
    assert not spec.targets(Device("a.1", tags=("t",)))
    assert not spec.targets(Device("c1", tags=("t", "u")))
    assert parse_job(MINIMAL).targets(Device("anything", tags=("site-a",)))


def test_counts_fold_queued_commands_into_pending() -> None:
    counts = Counts.of({"pending": 3, "queued": 2, "sent": 4, "succeeded": 1, "skipped": 1})
    assert counts.public() == {
        "total": 11,
        "pending": 5,
        "sent": 4,
        "succeeded": 1,
        "failed": 0,
        "timed_out": 0,
        "expired": 0,
        "skipped": 1,
        "canceled": 0,
    }
    assert (counts.in_flight, counts.ended, counts.all_final) == (6, 1, False)
    assert Counts.of({"succeeded": 2, "expired": 1}).all_final


@pytest.mark.parametrize(
    ("failed", "timed_out", "succeeded", "expected"),
    [
        (1, 1, 2, True),  # 2 of 4 = 50 %
        (1, 0, 2, False),  # 1 of 3 ended, below min_executed 4
        (1, 0, 3, False),  # 25 %
        (0, 2, 2, True),  # timeouts count as failures
    ],
)
def test_the_abort_rule(failed: int, timed_out: int, succeeded: int, expected: bool) -> None:
    spec = parse_job({**MINIMAL, "abort": {"failure_pct": 50, "min_executed": 4}})
    counts = Counts(failed=failed, timed_out=timed_out, succeeded=succeeded, expired=9, skipped=9)
    assert should_abort(spec, counts) is expected
    assert not should_abort(parse_job(MINIMAL), counts)


@given(
    pct=st.floats(min_value=0.01, max_value=100),
    min_executed=st.integers(1, 50),
    succeeded=st.integers(0, 200),
    failed=st.integers(0, 200),
    timed_out=st.integers(0, 200),
)
def test_the_abort_rule_is_the_contracts_inequality(
    pct: float, min_executed: int, succeeded: int, failed: int, timed_out: int
) -> None:
    """Property: fires iff ended ≥ min_executed and (failed + timed_out) / ended ≥ pct %."""
    spec = JobSpec("x", {}, 30, None, (), failure_pct=pct, min_executed=min_executed)
    counts = Counts(succeeded=succeeded, failed=failed, timed_out=timed_out)
    ended = succeeded + failed + timed_out
    expected = ended >= min_executed and (failed + timed_out) * 100 >= pct * ended
    assert should_abort(spec, counts) is expected


def test_end_state() -> None:
    assert end_state(Counts(total=3, succeeded=3)) is JobState.SUCCEEDED
    assert end_state(Counts(total=3, succeeded=2, skipped=1)) is JobState.COMPLETED
    assert [s.final for s in JobState] == [False, False, True, True, True, True]


def test_the_bucket_starts_with_one_seconds_worth_and_refills_on_the_clock() -> None:
    bucket = TokenBucket(6, now_ms=0)  # one every 10 s, a burst of one
    assert (bucket.burst, bucket.available(0), bucket.next_in_s(0)) == (1.0, 1, 0.0)
    bucket.take(1, 0)
    assert (bucket.available(0), bucket.next_in_s(0)) == (0, 10.0)
    assert bucket.available(9_999) == 0
    assert bucket.available(10_000) == 1
    assert bucket.available(60_000) == 1  # capped at the burst
    fast = TokenBucket(600, now_ms=0)
    assert fast.available(0) == 10


@given(
    per_minute=st.integers(1, 6000),
    steps=st.lists(st.integers(0, 20_000), min_size=1, max_size=40),
)
def test_the_bucket_never_lets_more_than_burst_plus_rate_through(per_minute: int, steps: list[int]) -> None:
    """Property: taking everything available at arbitrary times, over any prefix of t ms at
    most burst + t × rate / 60 000 leave."""
    bucket = TokenBucket(per_minute, now_ms=0)
    now = taken = 0
    for step in steps:
        now += step
        n = bucket.available(now)
        bucket.take(n, now)
        taken += n
        assert taken <= bucket.burst + now * per_minute / 60_000 + 1e-6


def test_admit_takes_the_smallest_limit() -> None:
    spec = JobSpec("x", {}, 30, None, (), max_concurrent=20)
    assert admit(spec, in_flight=15, tokens=None, batch=500) == 5
    assert admit(spec, in_flight=15, tokens=2, batch=500) == 2
    assert admit(spec, in_flight=25, tokens=None, batch=500) == 0
    assert admit(JobSpec("x", {}, 30, None, ()), in_flight=10**6, tokens=None, batch=7) == 7


def test_public_shapes() -> None:
    spec = parse_job(MINIMAL)
    job = Job("j1", JobState.RUNNING, spec, "olga", 0, 1000, 2)
    shown = job.public(Counts(total=2, pending=2))
    assert (shown["job_id"], shown["state"], shown["finished_at"], shown["counts"]["pending"]) == (
        "j1",
        "running",
        None,
        2,
    )
    assert job.progress(Counts(total=2), 1000) == {
        "type": "job",
        "job_id": "j1",
        "state": "running",
        "counts": Counts(total=2).public(),
        "at": "1970-01-01T00:00:01.000Z",
    }
    execution = Execution("j1", 0, "d1", "c1", ExecutionState.SKIPPED, 0, None, {"code": "device_offline"})
    assert execution.public()["state"] == "skipped"
