"""Authorization on every message, not just at connect (issue 7, contract §1, §2.2, §2.3)."""

from __future__ import annotations

import pytest

from tests.integration.harness import Node

pytestmark = pytest.mark.anyio


async def test_device_cannot_answer_another_devices_command(node: Node) -> None:
    """d1 sending a `command_result` for d2's command gets `not_found`; the command stays
    `sent`, the issuer hears nothing; d2's own result then succeeds with d2's payload."""
    await node.register("d1", "d2")
    d1 = await node.device("d1")
    d2 = await node.device("d2")
    operator = await node.client("operator")
    issued = await operator.request({"type": "command", "device_id": "d2", "name": "reboot"})
    assert issued["state"] == "sent"
    command = await d2.next_of("command")
    assert command["command_id"] == issued["command_id"]
    for ok in (True, False):
        forged = await d1.request(
            {
                "type": "command_result",
                "command_id": issued["command_id"],
                "ok": ok,
                "result": {"pwned": True} if ok else None,
                "error": None if ok else {"code": "x", "message": "forged"},
            }
        )
        assert (forged["type"], forged["code"]) == ("error", "not_found")
    async with node.rest("viewer") as rest:
        stored = (await rest.get(f"/commands/{issued['command_id']}")).json()
    assert (stored["state"], stored["result"], stored["error"]) == ("sent", None, None)
    answer = await d2.request(
        {"type": "command_result", "command_id": issued["command_id"], "ok": True, "result": {"by": "d2"}}
    )
    assert answer["type"] == "ack"
    result = await operator.next_of("command_result")
    assert (result["command_id"], result["state"], result["result"]) == (
        issued["command_id"],
        "succeeded",
        {"by": "d2"},
    )


async def test_device_cannot_write_as_another_device(node: Node) -> None:
    """A device session has no way to name another device: telemetry or status carrying
    `device_id` is `invalid_message`; d1's token on d2's REST telemetry (write or read), on
    the registry or on commands is 403. Nothing was stored for d2 and d2's status is unset."""
    await node.register("d1", "d2")
    d1 = await node.device("d1")
    for message in (
        {"type": "telemetry", "device_id": "d2", "data": {"t": 1}},
        {"type": "telemetry_batch", "device_id": "d2", "records": [{"data": {"t": 1}}]},
        {"type": "status", "device_id": "d2", "status": "hacked"},
        {"type": "telemetry", "data": {"t": 1}, "sub": "d2"},
    ):
        reply = await d1.request(message)
        assert (reply["type"], reply["code"]) == ("error", "invalid_message"), message
    async with node.rest("device", sub="d1") as as_d1:
        assert (await as_d1.post("/devices/d2/telemetry", json={"data": {"t": 1}})).status_code == 403
        assert (await as_d1.get("/devices/d2/telemetry")).status_code == 403
        assert (await as_d1.get("/devices/d2")).status_code == 403
        assert (await as_d1.get("/devices")).status_code == 403
        assert (await as_d1.patch("/devices/d2", json={"status": "x"})).status_code == 403
        assert (await as_d1.post("/devices/d2/commands", json={"name": "x"})).status_code == 403
        assert (await as_d1.post("/devices/d1/telemetry", json={"data": {"own": 1}})).status_code == 200
    async with node.rest("viewer") as rest:
        assert (await rest.get("/devices/d2/telemetry")).json()["items"] == []
        assert (await rest.get("/devices/d2")).json()["status"] is None
        own = (await rest.get("/devices/d1/telemetry")).json()["items"]
        assert [(p["key"], p["value"]) for p in own] == [("own", 1)]


async def test_clients_outside_their_devices_claim(node: Node) -> None:
    """An operator whose claim is `site-a.*`: subscribing to site-b.1 by id, commanding it
    (live or queued) and resuming it are refused (`forbidden`, `recovered: false` and no
    replay); a `*` subscription sees site-a.1 only, live; REST refuses site-b.1 (403) and
    lists only site-a devices. site-b.1 never receives the refused command: the first command
    it gets is a later one from an unrestricted operator."""
    await node.register("site-a.1", "site-b.1")
    a = await node.device("site-a.1")
    b = await node.device("site-b.1")
    narrow = await node.client("operator", sub="narrow", devices=["site-a.*"])
    for message in (
        {"type": "subscribe", "devices": ["site-b.1"]},
        {"type": "subscribe", "devices": ["site-a.1", "site-b.1"]},
        {"type": "command", "device_id": "site-b.1", "name": "open"},
        {"type": "command", "device_id": "site-b.1", "name": "open", "queue": True},
    ):
        reply = await narrow.request(message)
        assert (reply["type"], reply["code"]) == ("error", "forbidden"), message
    await b.request({"type": "status", "status": "before"})
    sub = await narrow.request(
        {"type": "subscribe", "devices": ["*"], "events": ["status"], "resume": {"site-b.1": 0}}
    )
    assert [s["device_id"] for s in sub["snapshot"]] == ["site-a.1"]
    assert sub["recovered"] == {"site-b.1": False}
    await b.request({"type": "status", "status": "secret"})
    await a.request({"type": "status", "status": "visible"})
    event = await narrow.next_of("event")
    assert (event["device_id"], event["data"]["status"]) == ("site-a.1", "visible")
    assert narrow.pending == []
    async with node.rest("operator", sub="narrow", devices=["site-a.*"]) as rest:
        assert (await rest.get("/devices/site-b.1")).status_code == 403
        assert (await rest.get("/devices/site-b.1/telemetry")).status_code == 403
        assert (await rest.get("/devices/site-b.1/events")).status_code == 403
        assert (await rest.post("/devices/site-b.1/commands", json={"name": "open"})).status_code == 403
        assert (await rest.patch("/devices/site-b.1", json={"status": "x"})).status_code == 403
        listed = (await rest.get("/devices")).json()["items"]
        assert [d["id"] for d in listed] == ["site-a.1"]
        connections = (await rest.get("/connections")).json()
        assert [c["device_id"] for c in connections["items"]] == ["site-a.1"]
        assert connections["count"] == 1  # site-b.1 is connected too, but not counted (13.13)
        bad_cursor = await rest.get("/connections", params={"cursor": "WzFd"})  # base64 of [1]
        assert (bad_cursor.status_code, bad_cursor.json()["code"]) == (422, "invalid_message")
    wide = await node.client("operator", sub="wide")
    legit = await wide.request({"type": "command", "device_id": "site-b.1", "name": "legit"})
    first = await b.next_of("command")
    assert (first["command_id"], first["name"]) == (legit["command_id"], "legit")


async def test_refresh_cannot_change_role_or_subject(node: Node) -> None:
    """An in-band `auth` with a token for another role (upgrade viewer→operator, downgrade
    operator→viewer) or another `sub` (client or device) is `forbidden`, and the session keeps
    exactly its old rights: the viewer still cannot command, the operator still can, d1 still
    writes as d1. The session's expiry is unchanged by a refused refresh."""
    await node.register("d1", "d2")
    d1 = await node.device("d1")
    viewer = await node.client("viewer", sub="v")
    operator = await node.client("operator", sub="o")
    for session, fresh in (
        (viewer, node.token("v", "operator")),
        (viewer, node.token("v", "admin")),
        (viewer, node.token("other", "viewer")),
        (operator, node.token("o", "viewer")),
        (operator, node.token("o", "device")),
        (d1, node.token("d2", "device")),
        (d1, node.token("d1", "admin")),
    ):
        reply = await session.request({"type": "auth", "token": fresh})
        assert (reply["type"], reply["code"]) == ("error", "forbidden")
    command = {"type": "command", "device_id": "d1", "name": "blink"}
    assert (await viewer.request(command))["code"] == "forbidden"
    assert (await operator.request(command))["state"] == "sent"
    assert (await d1.request({"type": "telemetry", "data": {"who": "d1"}}))["accepted"] == 1
    async with node.rest("viewer") as rest:
        assert (await rest.get("/devices/d2/telemetry")).json()["items"] == []
        assert len((await rest.get("/devices/d1/telemetry")).json()["items"]) == 1
    ok = await viewer.request({"type": "auth", "token": node.token("v", "viewer", ttl_s=7200)})
    assert ok["token_expires_at"] > viewer.welcome["token_expires_at"]


async def test_refresh_with_a_narrower_claim_narrows_live_delivery(node: Node) -> None:
    """A same-role refresh whose `devices` claim no longer covers d2 is accepted and applies
    at once: the existing `*` subscription stops delivering d2's events (d1's still arrive),
    and subscribing to d2 by id is now `forbidden`."""
    await node.register("d1", "d2")
    d1 = await node.device("d1")
    d2 = await node.device("d2")
    client = await node.client("viewer", sub="v")
    await client.request({"type": "subscribe", "devices": ["*"], "events": ["status"]})
    await d2.request({"type": "status", "status": "seen"})
    assert (await client.event("device.status", status="seen"))["device_id"] == "d2"
    narrowed = await client.request({"type": "auth", "token": node.token("v", "viewer", devices=["d1"])})
    assert narrowed["type"] == "ack"
    await d2.request({"type": "status", "status": "hidden"})
    await d1.request({"type": "status", "status": "shown"})
    event = await client.next_of("event")
    assert (event["device_id"], event["data"]["status"]) == ("d1", "shown")
    assert client.pending == []
    reply = await client.request({"type": "subscribe", "devices": ["d2"]})
    assert reply["code"] == "forbidden"
