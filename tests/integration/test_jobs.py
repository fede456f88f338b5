"""Fleet jobs over real sockets (issue 15, contract §7): rollout limits, exact counts, the
abort rule, pause/resume/cancel, offline devices, timeouts and the `devices` claim."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.clock import ManualClock
from tests.integration.harness import TIMEOUT, Node, Session

pytestmark = pytest.mark.anyio


async def _job(node: Node, body: dict[str, Any], **rest: Any) -> dict[str, Any]:
    async with node.rest("operator", **rest) as client:
        response = await client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


async def _show(node: Node, job_id: str) -> dict[str, Any]:
    async with node.rest("viewer") as client:
        response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    shown: dict[str, Any] = response.json()
    return shown


async def _answer(device: Session, command: dict[str, Any], ok: bool = True) -> None:
    message: dict[str, Any] = {"type": "command_result", "command_id": command["command_id"], "ok": ok}
    if not ok:
        message["error"] = {"code": "broken", "message": "no"}
    reply = await device.request(message)
    assert reply["type"] == "ack", reply


async def _sentinel(device: Session) -> list[dict[str, Any]]:
    """Everything the device received before a telemetry ack: what the server had sent it."""
    reply = await device.request({"type": "telemetry", "data": {"x": 1}})
    assert reply["type"] == "ack"
    seen, device.pending = device.pending, []
    return seen


async def _until(check: Callable[[], Any], node: Node, job_id: str) -> dict[str, Any]:
    """The job once `check(job)` holds: re-read (bounded) while the driver catches up."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            job = await _show(node, job_id)
            if check(job):
                return job
            await asyncio.sleep(0.01)  # a REST re-read, not a wait for time to pass


def _counts(**values: int) -> dict[str, int]:
    counts = dict.fromkeys(
        ("total", "pending", "sent", "succeeded", "failed", "timed_out", "expired", "skipped", "canceled"), 0
    )
    counts.update(values)
    return counts


async def test_a_200_device_rollout_never_exceeds_max_concurrent(node: Node) -> None:
    """200 devices, max_concurrent 20: devices hold their first 20 commands, so the rollout
    fills its 20 slots, then answer each at once; received − answered never passes 20 (a
    lower bound of what is in flight at the server), every device gets exactly one
    command, and the job ends `completed` with exact counts (every tenth device fails)."""
    ids = [f"d{i:03d}" for i in range(200)]
    await node.register(*ids, tags=["site-a"])
    await node.register("other")  # untagged: not in the target
    devices = {device_id: await node.device(device_id) for device_id in ids}
    arrivals: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    async def read(device_id: str, session: Session) -> None:
        command = await session.next_of("command", timeout=30)
        arrivals.put_nowait((device_id, command))

    readers = [asyncio.create_task(read(d, s)) for d, s in devices.items()]
    job = await _job(
        node,
        {
            "command": {"name": "update", "params": {"v": 2}},
            "target": {"tags": ["site-a"]},
            "rollout": {"max_concurrent": 20},
        },
    )
    assert (job["state"], job["counts"]["total"]) == ("running", 200)
    received = answered = peak = 0
    held: list[tuple[str, dict[str, Any]]] = []
    async with asyncio.timeout(30):
        while received < 200:
            device_id, command = await arrivals.get()
            assert command["name"] == "update"
            assert command["params"] == {"v": 2}
            received += 1
            peak = max(peak, received - answered)
            assert received - answered <= 20
            held.append((device_id, command))
            if received < 20:
                continue
            if received == 20:
                shown = await _show(node, job["job_id"])
                assert shown["counts"] == _counts(total=200, pending=180, sent=20)
            for held_id, held_command in held:
                await _answer(devices[held_id], held_command, ok=int(held_id[1:]) % 10 != 0)
                answered += 1
            held.clear()
    await asyncio.gather(*readers)
    assert peak == 20
    done = await _until(lambda j: j["state"] != "running", node, job["job_id"])
    assert done["state"] == "completed"
    assert done["counts"] == _counts(total=200, succeeded=180, failed=20)
    assert done["finished_at"] is not None
    for session in devices.values():
        assert [m for m in await _sentinel(session) if m["type"] == "command"] == []
    async with node.rest("viewer") as client:
        failed = (await client.get(f"/jobs/{job['job_id']}/executions", params={"state": "failed"})).json()
        assert [e["device_id"] for e in failed["items"]] == [f"d{i:03d}" for i in range(0, 200, 10)]
        assert failed["items"][0]["error"] == {"code": "broken", "message": "no"}
        page = (await client.get(f"/jobs/{job['job_id']}/executions", params={"limit": 150})).json()
        rest = (
            await client.get(
                f"/jobs/{job['job_id']}/executions", params={"limit": 150, "cursor": page["next_cursor"]}
            )
        ).json()
        assert [e["device_id"] for e in page["items"] + rest["items"]] == ids
        assert rest["next_cursor"] is None


async def test_max_per_minute_holds_on_the_clock(make_node: Callable[..., Node]) -> None:
    """max_per_minute 6 (a burst of one, then one every 10 s of the node's clock): after
    t seconds exactly 1 + t // 10 executions have left, however fast devices answer."""
    node = make_node(clock=ManualClock())
    ids = [f"d{i}" for i in range(8)]
    await node.register(*ids, tags=["t"])
    devices = [await node.device(d) for d in ids]
    job = await _job(
        node, {"command": {"name": "x"}, "target": {"tags": ["t"]}, "rollout": {"max_per_minute": 6}}
    )
    first = await devices[0].next_of("command")
    await _answer(devices[0], first)
    for step in range(1, 5):
        node.advance(5)  # half a token: nothing leaves (shown by the next step's exact count)
        node.advance(5)
        command = await devices[step].next_of("command")
        await _answer(devices[step], command)
        shown = await _until(lambda j, s=step: j["counts"]["succeeded"] == s + 1, node, job["job_id"])
        assert shown["counts"] == _counts(total=8, succeeded=step + 1, pending=7 - step)
    assert [m for m in await _sentinel(devices[5]) if m["type"] == "command"] == []


async def test_the_abort_rule_fires_at_its_threshold_and_cancels_the_rest(node: Node) -> None:
    """failure_pct 50 after min_executed 4, one at a time: S F S (1 of 3 failed, below
    min_executed) goes on; the fourth, F, makes 2 of 4 = 50 %: aborted, the 16 executions
    not yet sent end canceled."""
    ids = [f"d{i:02d}" for i in range(20)]
    await node.register(*ids, tags=["t"])
    devices = [await node.device(d) for d in ids]
    job = await _job(
        node,
        {
            "command": {"name": "x"},
            "target": {"tags": ["t"]},
            "rollout": {"max_concurrent": 1},
            "abort": {"failure_pct": 50, "min_executed": 4},
        },
    )
    for index, ok in enumerate([True, False, True, False]):
        command = await devices[index].next_of("command")
        await _answer(devices[index], command, ok=ok)
    done = await _until(lambda j: j["state"] != "running", node, job["job_id"])
    assert done["state"] == "aborted"
    assert done["counts"] == _counts(total=20, succeeded=2, failed=2, canceled=16)
    assert [m for m in await _sentinel(devices[4]) if m["type"] == "command"] == []


async def test_pause_resume_and_cancel(node: Node) -> None:
    """Paused, nothing more leaves (in-flight ones still end); resumed, the rollout goes on;
    canceled, what was not sent ends canceled and the job is `canceled` at once."""
    ids = [f"d{i}" for i in range(10)]
    await node.register(*ids, tags=["t"])
    devices = [await node.device(d) for d in ids]
    job = await _job(
        node, {"command": {"name": "x"}, "target": {"tags": ["t"]}, "rollout": {"max_concurrent": 2}}
    )
    job_id = job["job_id"]
    first = [await devices[i].next_of("command") for i in (0, 1)]
    async with node.rest("operator") as client:
        paused = await client.post(f"/jobs/{job_id}/pause")
        assert (paused.status_code, paused.json()["state"]) == (200, "paused")
        again = await client.post(f"/jobs/{job_id}/pause")
        assert (again.status_code, again.json()["code"]) == (409, "conflict")
        for i in (0, 1):
            await _answer(devices[i], first[i])
        shown = await _show(node, job_id)
        assert (shown["state"], shown["counts"]) == ("paused", _counts(total=10, succeeded=2, pending=8))
        assert [m for m in await _sentinel(devices[2]) if m["type"] == "command"] == []
        resumed = await client.post(f"/jobs/{job_id}/resume")
        assert resumed.json()["state"] == "running"
        second = [await devices[i].next_of("command") for i in (2, 3)]
        canceled = await client.post(f"/jobs/{job_id}/cancel")
        assert canceled.json()["state"] == "canceled"
        assert canceled.json()["counts"] == _counts(total=10, succeeded=2, sent=2, canceled=6)
        for i in (2, 3):
            await _answer(devices[i], second[i - 2])
        late = await client.post(f"/jobs/{job_id}/resume")
        assert late.status_code == 409
    shown = await _show(node, job_id)
    assert (shown["state"], shown["counts"]) == ("canceled", _counts(total=10, succeeded=4, canceled=6))
    assert [m for m in await _sentinel(devices[4]) if m["type"] == "command"] == []


async def test_offline_devices_are_skipped_or_queued_until_the_deadline(
    make_node: Callable[..., Node],
) -> None:
    """Without `queue` an offline device's execution is skipped (device_offline); with it,
    the command waits: a device that connects gets it after `welcome`, one that never does
    expires at deadline_s."""
    node = make_node(clock=ManualClock())
    await node.register("on", "off1", "off2", tags=["t"])
    online = await node.device("on")
    skipped = await _job(node, {"command": {"name": "x"}, "target": {"tags": ["t"]}})
    await _answer(online, await online.next_of("command"))
    done = await _until(lambda j: j["state"] != "running", node, skipped["job_id"])
    assert (done["state"], done["counts"]) == ("completed", _counts(total=3, succeeded=1, skipped=2))
    async with node.rest("viewer") as client:
        listed = (
            await client.get(f"/jobs/{skipped['job_id']}/executions", params={"state": "skipped"})
        ).json()
    assert [(e["device_id"], e["error"]["code"]) for e in listed["items"]] == [
        ("off1", "device_offline"),
        ("off2", "device_offline"),
    ]
    queued = await _job(
        node, {"command": {"name": "y"}, "target": {"tags": ["t"]}, "queue": True, "deadline_s": 60}
    )
    await _answer(online, await online.next_of("command"))
    shown = await _until(lambda j: j["counts"]["succeeded"] == 1, node, queued["job_id"])
    assert shown["counts"] == _counts(total=3, succeeded=1, pending=2)
    late = await node.device("off1")
    command = await late.next_of("command")
    assert command["name"] == "y"
    await _answer(late, command)
    node.advance(61)
    done = await _until(lambda j: j["state"] != "running", node, queued["job_id"])
    assert (done["state"], done["counts"]) == ("completed", _counts(total=3, succeeded=2, expired=1))


async def test_a_device_that_never_answers_times_out_and_frees_its_slot(
    make_node: Callable[..., Node],
) -> None:
    """max_concurrent 1, timeout_s 5: the silent device's execution times out after 5 s of
    the node's clock and the next device gets its command."""
    node = make_node(clock=ManualClock())
    await node.register("a", "b", tags=["t"])
    silent, answering = await node.device("a"), await node.device("b")
    job = await _job(
        node,
        {
            "command": {"name": "x", "timeout_s": 5},
            "target": {"tags": ["t"]},
            "rollout": {"max_concurrent": 1},
        },
    )
    await silent.next_of("command")
    node.advance(4)
    assert [m for m in await _sentinel(answering) if m["type"] == "command"] == []
    node.advance(1)
    await _answer(answering, await answering.next_of("command"))
    done = await _until(lambda j: j["state"] != "running", node, job["job_id"])
    assert (done["state"], done["counts"]) == ("completed", _counts(total=2, succeeded=1, timed_out=1))


async def test_a_restricted_operators_job_stays_inside_its_claim(node: Node) -> None:
    """An operator whose token claims `site-a.*` makes a job on tag `t`: only site-a devices
    are in it and get a command; a target wholly outside the claim is invalid_message;
    a viewer restricted to site-b neither sees nor lists the job."""
    await node.register("site-a.1", "site-a.2", "site-b.1", tags=["t"])
    a1, a2, b1 = await node.device("site-a.1"), await node.device("site-a.2"), await node.device("site-b.1")
    job = await _job(node, {"command": {"name": "x"}, "target": {"tags": ["t"]}}, devices=["site-a.*"])
    assert job["counts"]["total"] == 2
    for device in (a1, a2):
        await _answer(device, await device.next_of("command"))
    done = await _until(lambda j: j["state"] != "running", node, job["job_id"])
    assert done["counts"] == _counts(total=2, succeeded=2)
    assert done["state"] == "succeeded"
    assert [m for m in await _sentinel(b1) if m["type"] == "command"] == []
    async with node.rest("operator", devices=["site-a.*"]) as client:
        empty = await client.post(
            "/jobs", json={"command": {"name": "x"}, "target": {"devices": ["site-b.*"]}}
        )
        assert (empty.status_code, empty.json()["code"]) == (422, "invalid_message")
    async with node.rest("viewer", sub="viewer-b", devices=["site-b.*"]) as client:
        assert (await client.get(f"/jobs/{job['job_id']}")).status_code == 404
        assert (await client.get("/jobs")).json()["items"] == []
    async with node.rest("viewer") as client:
        assert [j["job_id"] for j in (await client.get("/jobs")).json()["items"]] == [job["job_id"]]
        assert (await client.post(f"/jobs/{job['job_id']}/cancel")).status_code == 403


async def test_bad_jobs_are_refused_with_every_problem(node: Node) -> None:
    """A bad body is invalid_message naming each bad field, and creates nothing."""
    await node.register("d1")
    async with node.rest("operator") as client:
        bad = await client.post(
            "/jobs",
            json={"command": {"name": "bad name!"}, "target": {}, "rollout": {"max_concurrent": 0}, "x": 1},
        )
        assert (bad.status_code, bad.json()["code"]) == (422, "invalid_message")
        assert (await client.get("/jobs")).json()["items"] == []
        assert (await client.get("/jobs/nope")).status_code == 404
    async with node.rest("viewer") as client:
        refused = await client.post("/jobs", json={"command": {"name": "x"}, "target": {"devices": ["*"]}})
        assert refused.status_code == 403


async def test_job_progress_reaches_jobs_subscribers_coalesced_and_only_where_visible(
    make_node: Callable[..., Node],
) -> None:
    """`subscribe` with `"jobs": true` (no devices needed): nothing before job_progress_s of
    the clock passes, then one frame with the counts after every change so far; a client
    restricted to site-b gets no frame of a site-a operator's job (its telemetry event,
    sent after the flush, arrives with no job frame before it)."""
    node = make_node(clock=ManualClock())
    await node.register("site-a.1", "site-a.2", tags=["t"])
    await node.register("site-b.1")
    devices = [await node.device("site-a.1"), await node.device("site-a.2")]
    other = await node.device("site-b.1")
    watcher = await node.client()
    ack = await watcher.request({"type": "subscribe", "jobs": True})
    assert (ack["type"], ack["snapshot"]) == ("ack", [])
    restricted = await node.client(sub="rb", devices=["site-b.*"])
    both = await restricted.request(
        {"type": "subscribe", "jobs": True, "devices": ["site-b.1"], "events": ["telemetry"]}
    )
    assert both["type"] == "ack"
    job = await _job(
        node, {"command": {"name": "x"}, "target": {"tags": ["t"]}}, sub="oa", devices=["site-a.*"]
    )
    for device in devices:
        await _answer(device, await device.next_of("command"))
    await _until(lambda j: j["state"] == "succeeded", node, job["job_id"])
    node.advance(0.25)
    frame = await watcher.next_of("job")
    assert (frame["job_id"], frame["state"]) == (job["job_id"], "succeeded")
    assert frame["counts"] == _counts(total=2, succeeded=2)
    await other.request({"type": "telemetry", "data": {"x": 1}})
    event = await restricted.next_of("event")
    assert event["event"] == "device.telemetry"
    assert [m for m in restricted.pending if m["type"] == "job"] == []
    bad = await watcher.request({"type": "subscribe", "jobs": "yes"})  # also a sentinel:
    assert (bad["type"], bad["code"]) == ("error", "invalid_message")
    assert [m for m in watcher.pending if m["type"] == "job"] == []  # one frame, coalesced


async def test_the_cli_creates_shows_lists_and_cancels_jobs(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fleetwire job create|show|list|cancel` against the running server."""
    from fleetwire.cli import main

    await node.register("d1", "d2", tags=["t"])
    token = node.token("cli", "operator")
    common = ["--url", node.http_url, "--token", token]
    loop = asyncio.get_running_loop()

    async def run(*argv: str) -> tuple[int, Any]:
        code = await asyncio.wait_for(loop.run_in_executor(None, main, [*argv, *common]), TIMEOUT)
        out = capsys.readouterr().out
        return code, json.loads(out) if out else None

    code, job = await run(
        "job",
        "create",
        "--name",
        "reboot",
        "--params",
        '{"delay": 1}',
        "--tags",
        "t",
        "--queue",
        "--max-concurrent",
        "1",
    )
    assert code == 0
    assert (job["command"]["params"], job["rollout"]["max_concurrent"], job["queue"]) == (
        {"delay": 1},
        1,
        True,
    )
    code, shown = await run("job", "show", job["job_id"])
    assert (code, shown["counts"]["total"]) == (0, 2)
    code, listed = await run("job", "list")
    assert [j["job_id"] for j in listed["items"]] == [job["job_id"]]
    code, canceled = await run("job", "cancel", job["job_id"])
    assert (code, canceled["state"]) == (0, "canceled")
    code, again = await run("job", "cancel", job["job_id"])
    assert (code, again["code"]) == (1, "conflict")
    assert main(["job", "show"]) == 2
    assert main(["job", "create", "--tags", "t"]) == 2
    assert main(["job", "create", "--name", "x", "--params", "{bad", *common]) == 2
