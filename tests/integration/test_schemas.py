"""Hostile telemetry schemas through a real server (security review): refused at registration
and PATCH with 422 `invalid_message` and nothing fetched; `default` values never reach the
store; a catastrophic pattern is answered at once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.harness import Node
from tests.listener import Listener

pytestmark = pytest.mark.anyio


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener() as running:
        yield running


async def nothing_connected(listener: Listener) -> list[bytes]:
    # The listener's sentinel handshake blocks: off the test's loop.
    return await asyncio.wait_for(asyncio.to_thread(listener.connections_before_sentinel), 10)


async def test_remote_ref_is_refused_at_registration_and_patch(node: Node, listener: Listener) -> None:
    """POST and PATCH with a `$ref` to a live listener answer 422 `invalid_message` naming the
    reference; the listener sees no connection and no device is created."""
    hostile = {"type": "object", "properties": {"t": {"$ref": f"{listener.url}/schema.json"}}}
    expected = [
        {
            "loc": ["telemetry_schema", "properties", "t", "$ref"],
            "msg": "only local references starting with `#` are allowed; nothing is fetched",
        }
    ]
    await node.register("d1")
    async with node.rest() as rest:
        created = await rest.post("/devices", json={"id": "d2", "telemetry_schema": hostile})
        assert created.status_code == 422, created.text
        assert (created.json()["code"], created.json()["errors"]) == ("invalid_message", expected)
        patched = await rest.patch("/devices/d1", json={"telemetry_schema": hostile})
        assert patched.status_code == 422, patched.text
        assert patched.json()["errors"] == expected
        assert (await rest.get("/devices/d2")).status_code == 404
        assert (await rest.get("/devices/d1")).json()["telemetry_schema"] is None
    assert await nothing_connected(listener) == []


async def test_self_reference_is_refused_at_registration(node: Node) -> None:
    """`{"$ref": "#"}` compiles to a function calling itself: refused at registration instead of
    answering every telemetry message `internal`."""
    async with node.rest() as rest:
        response = await rest.post("/devices", json={"id": "d1", "telemetry_schema": {"$ref": "#"}})
        assert response.status_code == 422, response.text
        assert response.json()["errors"] == [
            {"loc": ["telemetry_schema", "$ref"], "msg": "`$ref` cycle: this reference leads back to itself"}
        ]


async def test_schema_defaults_never_reach_the_store(node: Node) -> None:
    """A `default` (here an object) for a missing property is not written into the record: over
    WebSocket and REST the stored values are exactly what the device sent."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"t": {"type": "number"}, "extra": {"default": {"x": 1}}, "n": {"default": 3}},
    }
    await node.register("d1", telemetry_schema=schema)
    device = await node.device("d1")
    ack = await device.request({"type": "telemetry", "ts": 1_700_000_000_000, "data": {"t": 1}})
    assert (ack["type"], ack.get("accepted")) == ("ack", 1), ack
    async with node.rest("device", sub="d1") as rest:
        posted = await rest.post("/devices/d1/telemetry", json={"ts": 1_700_000_001_000, "data": {"t": 2}})
        assert (posted.status_code, posted.json()) == (200, {"accepted": 1})
    async with node.rest("viewer") as rest:
        items = (await rest.get("/devices/d1/telemetry", params={"limit": 100})).json()["items"]
        assert [(p["key"], p["value"]) for p in items] == [("t", 2), ("t", 1)]
        latest = (await rest.get("/devices/d1/telemetry/latest")).json()["values"]
        assert sorted(latest) == ["t"]


async def test_catastrophic_pattern_is_answered_at_once(node: Node) -> None:
    """`^(a+)+$` against 64 `a`s and a `!` takes about 2^64 steps on a backtracking engine; on
    RE2 the mismatch comes back within the usual reply timeout, and the session goes on."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}}
    await node.register("d1", telemetry_schema=schema)
    device = await node.device("d1")
    reply = await device.request({"type": "telemetry", "data": {"s": "a" * 64 + "!"}})
    assert (reply["type"], reply["code"]) == ("error", "invalid_message")
    assert reply["details"] == [
        {"loc": ["data"], "msg": "telemetry schema: data.s must match pattern ^(a+)+$"}
    ]
    assert (await device.request({"type": "telemetry", "data": {"s": "a" * 64}}))["accepted"] == 1
