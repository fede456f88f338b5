"""A fleet job in a cluster (issue 15, contract §7 and §5): PostgreSQL + Redis, real
`fleetwire serve` processes. The node driving a job is SIGKILLed mid-rollout; another node
takes the job's lease over and finishes it, and no execution is sent twice."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.harness import Session
from tests.integration.test_cluster import cluster

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]
__all__ = ["cluster"]  # the fixture, shared with test_cluster

DEVICES = [f"d{i:02d}" for i in range(30)]


async def _answer_everything(
    device_id: str, session: Session, received: dict[str, list[str]], tenth: asyncio.Event
) -> None:
    """Answer every command as it arrives, recording its id (until the test ends)."""
    while True:
        command = await session.next_of("command", timeout=60)
        received[device_id].append(command["command_id"])
        if sum(map(len, received.values())) >= 10:
            tenth.set()
        await session.send({"type": "command_result", "command_id": command["command_id"], "ok": True})


async def test_a_killed_drivers_job_is_finished_by_another_node_without_resending(
    cluster: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node a creates (and so drives) a 30-device job, max_concurrent 5, devices on node b.
    a is SIGKILLed after 10 commands; b takes the lease over once it ran out (2 s) and
    finishes: every device got at most one command, what was received succeeded, what a
    committed but never routed times out, and the counts add up exactly."""
    monkeypatch.setenv("FLEETWIRE_JOB_LEASE_S", "2")
    a, b = await cluster("a", "b")
    async with b.rest() as rest:
        for device_id in DEVICES:
            assert (await rest.post("/devices", json={"id": device_id, "tags": ["fleet"]})).status_code == 201
    sessions = {device_id: await b.device(device_id) for device_id in DEVICES}
    received: dict[str, list[str]] = {d: [] for d in DEVICES}
    tenth = asyncio.Event()
    answering = [asyncio.create_task(_answer_everything(d, s, received, tenth)) for d, s in sessions.items()]
    try:
        async with a.rest("operator") as rest:
            created = await rest.post(
                "/jobs",
                json={
                    "command": {"name": "update", "timeout_s": 3},
                    "target": {"tags": ["fleet"]},
                    "rollout": {"max_concurrent": 5},
                },
            )
        assert created.status_code == 201, created.text
        job_id = created.json()["job_id"]
        await asyncio.wait_for(tenth.wait(), 20)
        a.kill()
        async with b.rest("viewer") as rest, asyncio.timeout(40):
            while True:
                job = (await rest.get(f"/jobs/{job_id}")).json()
                if job["state"] not in ("running", "paused"):
                    break
                await asyncio.sleep(0.1)  # a REST re-read while b takes over and finishes
    finally:
        for task in answering:
            task.cancel()
        await asyncio.gather(*answering, return_exceptions=True)
    assert all(len(ids) <= 1 for ids in received.values()), "an execution was sent twice"
    got = sum(map(len, received.values()))
    counts = job["counts"]
    assert counts["total"] == 30
    assert counts["succeeded"] == got
    assert counts["timed_out"] == 30 - got  # committed by a, never routed before it died
    assert job["state"] == ("succeeded" if got == 30 else "completed")
    assert got >= 20  # b dispatched the rest after the takeover
    for session in sessions.values():  # nothing more arrived before this sentinel's ack
        reply = await session.request({"type": "telemetry", "data": {"x": 1}})
        assert reply["type"] == "ack"
        assert [m for m in session.pending if m["type"] == "command"] == []
