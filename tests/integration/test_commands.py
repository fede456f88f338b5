"""Commands over real sockets (issue 5, contract §2.3/§3): routing, results, timeouts,
queueing, permissions, idempotency and REST."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.clock import ManualClock
from tests.integration.harness import TIMEOUT, Node

pytestmark = pytest.mark.anyio


async def test_success_reaches_issuer_and_subscribers(node: Node) -> None:
    """command → device → result: the issuer gets command_result, subscribers command.updated."""
    await node.register("d1")
    device = await node.device("d1")
    watcher = await node.client()
    await watcher.request({"type": "subscribe", "devices": ["d1"], "events": ["command"]})
    operator = await node.client("operator")
    ack = await operator.request(
        {"type": "command", "device_id": "d1", "name": "reboot", "params": {"delay": 1}}
    )
    assert (ack["type"], ack["state"]) == ("ack", "sent")
    command = await device.next_of("command")
    assert command["command_id"] == ack["command_id"]
    assert (command["name"], command["params"]) == ("reboot", {"delay": 1})
    done = await device.request(
        {"type": "command_result", "command_id": ack["command_id"], "ok": True, "result": {"uptime": 0}}
    )
    assert done["type"] == "ack"
    result = await operator.next_of("command_result")
    assert result["state"] == "succeeded"
    assert result["result"] == {"uptime": 0}
    assert result["device_id"] == "d1"
    states = [(await watcher.event("command.updated"))["data"]["state"] for _ in range(2)]
    assert states == ["sent", "succeeded"]
    again = await device.request({"type": "command_result", "command_id": ack["command_id"], "ok": True})
    assert again["code"] == "conflict"
    async with node.rest("viewer") as rest:
        stored = (await rest.get(f"/commands/{ack['command_id']}")).json()
        assert stored["state"] == "succeeded"


async def test_failure_carries_error_details(node: Node) -> None:
    """ok=false ends the command as failed with the device's error."""
    await node.register("d1")
    device = await node.device("d1")
    operator = await node.client("operator")
    ack = await operator.request({"type": "command", "device_id": "d1", "name": "x"})
    await device.next_of("command")
    error = {"code": "busy", "message": "try later"}
    await device.request(
        {"type": "command_result", "command_id": ack["command_id"], "ok": False, "error": error}
    )
    result = await operator.next_of("command_result")
    assert (result["state"], result["error"]) == ("failed", error)


async def test_timeout_and_late_result(make_node: Callable[..., Node]) -> None:
    """No result within timeout_s: timed_out to the issuer; a late result answers conflict."""
    node = make_node(clock=ManualClock())
    await node.register("d1")
    device = await node.device("d1")
    operator = await node.client("operator")
    ack = await operator.request({"type": "command", "device_id": "d1", "name": "slow", "timeout_s": 1})
    await device.next_of("command")
    node.advance(1.0)
    result = await operator.next_of("command_result")
    assert result["state"] == "timed_out"
    late = await device.request({"type": "command_result", "command_id": ack["command_id"], "ok": True})
    assert late["code"] == "conflict"


async def test_offline_refusal_queue_delivery_and_expiry(make_node: Callable[..., Node]) -> None:
    """Offline: device_offline unless queue; queued commands arrive after welcome in order;
    a queued command that outlives its timeout is expired."""
    node = make_node(clock=ManualClock())
    await node.register("d1", "d2")
    operator = await node.client("operator")
    offline = await operator.request({"type": "command", "device_id": "d1", "name": "a"})
    assert offline["code"] == "device_offline"
    first = await operator.request({"type": "command", "device_id": "d1", "name": "a", "queue": True})
    second = await operator.request({"type": "command", "device_id": "d1", "name": "b", "queue": True})
    assert (first["state"], second["state"]) == ("pending", "pending")
    device = await node.device("d1")
    got = [await device.next_of("command"), await device.next_of("command")]
    assert [c["command_id"] for c in got] == [first["command_id"], second["command_id"]]
    doomed = await operator.request(
        {"type": "command", "device_id": "d2", "name": "c", "queue": True, "timeout_s": 1}
    )
    node.advance(1.0)
    result = await operator.next_of("command_result", command_id=doomed["command_id"])
    assert result["state"] == "expired"


async def test_permissions_and_validation(node: Node) -> None:
    """Viewers cannot command; claims and unknown ids answer forbidden / not_found; bad
    fields answer invalid_message; a device cannot answer another device's command."""
    await node.register("d1", "d2")
    d1 = await node.device("d1")
    d2 = await node.device("d2")
    viewer = await node.client("viewer")
    assert (await viewer.request({"type": "command", "device_id": "d1", "name": "a"}))["code"] == "forbidden"
    narrow = await node.client("operator", devices=["d2"])
    assert (await narrow.request({"type": "command", "device_id": "d1", "name": "a"}))["code"] == "forbidden"
    operator = await node.client("operator")
    assert (await operator.request({"type": "command", "device_id": "zz", "name": "a"}))[
        "code"
    ] == "not_found"
    for bad in (
        {"name": "bad name"},
        {"name": "a", "timeout_s": 0},
        {"name": "a", "params": [1]},
        {"name": "a", "params": {"x": "y" * 70000}},
        {"name": "a", "extra": 1},
    ):
        reply = await operator.request({"type": "command", "device_id": "d1", **bad})
        assert reply["code"] == "invalid_message", bad
    ack = await operator.request({"type": "command", "device_id": "d1", "name": "a"})
    await d1.next_of("command")
    stolen = await d2.request({"type": "command_result", "command_id": ack["command_id"], "ok": True})
    assert stolen["code"] == "not_found"


async def test_idempotency_key_returns_the_first_command(node: Node) -> None:
    """A repeat with the same idempotency_key within timeout_s returns the first command."""
    await node.register("d1")
    device = await node.device("d1")
    operator = await node.client("operator")
    message = {"type": "command", "device_id": "d1", "name": "a", "idempotency_key": "k1"}
    first = await operator.request(message)
    repeat = await operator.request(message)
    assert repeat["command_id"] == first["command_id"]
    await device.next_of("command")
    with pytest.raises(TimeoutError):
        await device.next_of("command", timeout=0.3)
    reused = await operator.request({**message, "name": "b"})
    assert reused["code"] == "conflict"


async def test_rest_commands_with_and_without_wait(node: Node) -> None:
    """POST returns at once, or with wait=true when the device answered; lists filter by state."""
    await node.register("d1")
    device = await node.device("d1")

    async def answer() -> None:
        command = await device.next_of("command")
        await device.send(
            {"type": "command_result", "command_id": command["command_id"], "ok": True, "result": {"v": 1}}
        )

    async with node.rest("operator") as rest:
        responder = asyncio.create_task(answer())
        waited = await rest.post("/devices/d1/commands", params={"wait": "true"}, json={"name": "ping"})
        await asyncio.wait_for(responder, TIMEOUT)
        assert waited.status_code == 201
        assert (waited.json()["state"], waited.json()["result"]) == ("succeeded", {"v": 1})
        quick = await rest.post("/devices/d1/commands", json={"name": "later"})
        assert quick.json()["state"] == "sent"
        listed = (await rest.get("/devices/d1/commands", params={"state": "succeeded"})).json()
        assert [c["command_id"] for c in listed["items"]] == [waited.json()["command_id"]]
        offline = await rest.post("/devices/zz/commands", json={"name": "x"})
        assert offline.status_code == 404


async def test_queued_command_survives_restart(make_node: Callable[..., Node], tmp_path: object) -> None:
    """A pending command is kept in the store and delivered after a server restart."""
    first = make_node()
    await first.register("d1")
    operator = await first.client("operator")
    ack = await operator.request(
        {"type": "command", "device_id": "d1", "name": "a", "queue": True, "timeout_s": 60}
    )
    await operator.close()
    first.stop()
    second = make_node(data_dir=first.settings.data_dir)
    device = await second.device("d1")
    command = await device.next_of("command")
    assert command["command_id"] == ack["command_id"]


async def test_queued_commands_per_device_are_capped(make_node: Callable[..., Node]) -> None:
    """Issue 13.17: with FLEETWIRE_MAX_PENDING_COMMANDS=3 the 4th queued command for an
    offline device is `too_large` and not stored; another device has its own budget; on
    connect the device receives exactly the 3, in issue order."""
    node = make_node(max_pending_commands=3)
    await node.register("d1", "d2")
    operator = await node.client("operator")
    queued = [
        await operator.request({"type": "command", "device_id": "d1", "name": f"c{n}", "queue": True})
        for n in range(3)
    ]
    assert [q["state"] for q in queued] == ["pending"] * 3
    over = await operator.request({"type": "command", "device_id": "d1", "name": "c3", "queue": True})
    assert over["code"] == "too_large"
    other = await operator.request({"type": "command", "device_id": "d2", "name": "x", "queue": True})
    assert other["state"] == "pending"
    device = await node.device("d1")
    got = [await device.next_of("command") for _ in range(3)]
    assert [c["name"] for c in got] == ["c0", "c1", "c2"]
    async with node.rest("viewer") as rest:
        listed = (await rest.get("/devices/d1/commands")).json()["items"]
    assert sorted(c["name"] for c in listed) == ["c0", "c1", "c2"]
