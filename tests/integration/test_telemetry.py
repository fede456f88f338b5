"""Telemetry over real sockets (issue 4, contract §2.2/§3): validation, atomic batches,
durability before the ack, queries, live events, REST parity."""

from __future__ import annotations

import pytest

from tests.integration.harness import Node

pytestmark = pytest.mark.anyio


async def stored(node: Node, device_id: str, **params: object) -> list[dict[str, object]]:
    async with node.rest("viewer") as rest:
        response = await rest.get(f"/devices/{device_id}/telemetry", params={"limit": 1000, **params})
        assert response.status_code == 200, response.text
        items: list[dict[str, object]] = response.json()["items"]
        return items


async def test_single_and_batch_are_acked_stored_and_streamed(node: Node) -> None:
    """Acks carry `accepted`; records are queryable and arrive live, one event per record."""
    await node.register("d1")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1"], "events": ["telemetry"]})
    device = await node.device("d1")
    ack = await device.request({"type": "telemetry", "ts": "2026-11-25T18:00:00.5+01:00", "data": {"t": 1.5}})
    assert (ack["type"], ack["accepted"]) == ("ack", 1)
    records = [
        {"ts": 1_700_000_000_000 + i, "data": {"t": i, "ok": i % 2 == 0, "s": f"v{i}"}} for i in range(1000)
    ]
    ack = await device.request({"type": "telemetry_batch", "records": records})
    assert ack["accepted"] == 1000
    first = await client.event("device.telemetry")
    assert first["data"] == {"ts": "2026-11-25T17:00:00.500Z", "values": {"t": 1.5}}
    seqs = [first["seq"]] + [(await client.event("device.telemetry"))["seq"] for _ in range(1000)]
    assert seqs == list(range(first["seq"], first["seq"] + 1001))
    points = await stored(node, "d1", key="t")
    assert len(points) == 1000  # limit 1000, newest first
    assert points[0]["value"] == 1.5
    assert points[1]["value"] == 999
    flags = await stored(node, "d1", key="ok", limit=2)
    assert [p["value"] for p in flags] == [False, True]


async def test_invalid_batch_stores_nothing_and_keeps_connection(node: Node) -> None:
    """One bad record rejects the whole batch, names every bad record; nothing is stored."""
    await node.register("d1")
    device = await node.device("d1")
    reply = await device.request(
        {
            "type": "telemetry_batch",
            "records": [{"data": {"a": 1}}, {"data": {"a": [1]}}, {"data": {"a": 2}}, {"data": {"b b": 1}}],
        }
    )
    assert reply["type"] == "error"
    assert reply["code"] == "invalid_message"
    assert [d["loc"] for d in reply["details"]] == [
        ["records", 1, "data", "a"],
        ["records", 3, "data", "b b"],
    ]
    assert await stored(node, "d1") == []
    assert (await device.request({"type": "telemetry", "data": {"a": 3}}))["accepted"] == 1


async def test_schema_is_enforced_and_updates_take_effect_live(node: Node) -> None:
    """A device's telemetry_schema is checked per record, and a PATCH applies to a live session."""
    schema = {"type": "object", "properties": {"t": {"type": "number", "maximum": 50}}}
    await node.register("d1", telemetry_schema=schema)
    device = await node.device("d1")
    bad = await device.request({"type": "telemetry", "data": {"t": 99}})
    assert bad["code"] == "invalid_message"
    assert (await device.request({"type": "telemetry", "data": {"t": 9}}))["accepted"] == 1
    async with node.rest() as rest:
        response = await rest.patch("/devices/d1", json={"telemetry_schema": {"type": "object"}})
        assert response.status_code == 200
    for _ in range(50):  # the registry event reaches the session asynchronously
        reply = await device.request({"type": "telemetry", "data": {"t": 99}})
        if reply["type"] == "ack":
            break
    assert reply["type"] == "ack"


async def test_rest_parity_and_device_scope(node: Node) -> None:
    """POST telemetry takes the same bodies; a device may write only for itself."""
    await node.register("d1", "d2")
    async with node.rest("device", sub="d1") as rest:
        ok = await rest.post("/devices/d1/telemetry", json={"data": {"t": 1}})
        assert (ok.status_code, ok.json()) == (200, {"accepted": 1})
        batch = await rest.post(
            "/devices/d1/telemetry", json={"records": [{"data": {"t": 2}}, {"data": {"t": 3}}]}
        )
        assert batch.json() == {"accepted": 2}
        other = await rest.post("/devices/d2/telemetry", json={"data": {"t": 1}})
        assert other.status_code == 403
        bad = await rest.post("/devices/d1/telemetry", json={"data": {"t": {"x": 1}}})
        assert bad.status_code == 422
        assert bad.json()["code"] == "invalid_message"
    async with node.rest("viewer") as rest:
        latest = (await rest.get("/devices/d1/telemetry/latest")).json()
        assert latest["values"]["t"]["value"] == 3


async def test_query_ranges_and_pagination(node: Node) -> None:
    """from/to bound by time, pages chain through the cursor without overlap, newest first."""
    await node.register("d1")
    device = await node.device("d1")
    base = 1_700_000_000_000
    records = [{"ts": base + i * 1000, "data": {"v": i}} for i in range(50)]
    assert (await device.request({"type": "telemetry_batch", "records": records}))["accepted"] == 50
    async with node.rest("viewer") as rest:
        window = (
            await rest.get("/devices/d1/telemetry", params={"from": base + 10_000, "to": base + 19_000})
        ).json()
        assert [p["value"] for p in window["items"]] == list(range(19, 9, -1))
        values: list[int] = []
        cursor = None
        while True:
            params: dict[str, object] = {"limit": 7}
            if cursor:
                params["cursor"] = cursor
            page = (await rest.get("/devices/d1/telemetry", params=params)).json()
            values.extend(p["value"] for p in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert values == list(range(49, -1, -1))


async def test_client_sending_telemetry_is_forbidden(node: Node) -> None:
    """Telemetry on a client connection answers `forbidden`."""
    await node.register("d1")
    client = await node.client("admin")
    reply = await client.request({"type": "telemetry", "data": {"a": 1}})
    assert reply["code"] == "forbidden"


async def test_a_disabled_or_deleted_device_token_opens_no_rest_route(node: Node) -> None:
    """Issue 13.7: the token of a disabled or deleted device gets 403 on every REST route,
    its own telemetry included; enabled again, the same token works."""
    await node.register("d1", "d2")
    async with node.rest() as admin:
        assert (await admin.patch("/devices/d1", json={"disabled": True})).status_code == 200
        assert (await admin.delete("/devices/d2")).status_code == 204
    for device_id in ("d1", "d2"):
        async with node.rest("device", sub=device_id) as rest:
            for response in (
                await rest.post(f"/devices/{device_id}/telemetry", json={"data": {"t": 1}}),
                await rest.get(f"/devices/{device_id}/telemetry"),
                await rest.get(f"/devices/{device_id}/telemetry/latest"),
            ):
                assert (response.status_code, response.json()["code"]) == (403, "forbidden")
    async with node.rest() as admin:
        assert (await admin.patch("/devices/d1", json={"disabled": False})).status_code == 200
    async with node.rest("device", sub="d1") as rest:
        assert (await rest.post("/devices/d1/telemetry", json={"data": {"t": 1}})).status_code == 200


async def test_rest_accepts_a_websocket_message_copied_verbatim(node: Node) -> None:
    """Issue 13.19: one JSON works on both: `type` (matching the body) and `id` are accepted
    over REST; a `type` that does not match the body is refused and stores nothing."""
    await node.register("d1")
    async with node.rest("device", sub="d1") as rest:
        single = {"type": "telemetry", "id": 7, "data": {"t": 1}}
        batch = {"type": "telemetry_batch", "id": "b", "records": [{"data": {"t": 2}}]}
        assert (await rest.post("/devices/d1/telemetry", json=single)).json() == {"accepted": 1}
        assert (await rest.post("/devices/d1/telemetry", json=batch)).json() == {"accepted": 1}
        wrong = await rest.post("/devices/d1/telemetry", json={"type": "status", "data": {"t": 3}})
        assert (wrong.status_code, wrong.json()["code"]) == (422, "invalid_message")
        points = (await rest.get("/devices/d1/telemetry")).json()["items"]
    assert sorted(p["value"] for p in points) == [1, 2]
