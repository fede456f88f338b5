"""Hostile input over WebSocket and REST (issue 7): deep nesting, huge numbers, duplicate keys,
SQL metacharacters and NUL characters, on SQLite and PostgreSQL. A bad message gets one clear
error reply, never closes the session by itself, never changes state and never reaches a 5xx."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.integration.harness import TIMEOUT, Node, Session

pytestmark = pytest.mark.anyio

DEEP = 100_000


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_node(backend: str, request: pytest.FixtureRequest) -> Node:
    """A node on SQLite or on a fresh PostgreSQL database (set up first, so dropped last)."""
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        return request.getfixturevalue("make_node")(database_url=url)  # type: ignore[no-any-return]
    return request.getfixturevalue("make_node")()  # type: ignore[no-any-return]


async def send_raw(session: Session, text: str) -> None:
    """Send a text frame exactly as written (duplicate keys, numbers out of range...)."""
    await asyncio.wait_for(session.ws.send(text), TIMEOUT)


async def alive(node: Node) -> None:
    async with httpx.AsyncClient(base_url=node.http_url, timeout=TIMEOUT) as http:
        assert (await http.get("/readyz")).status_code == 200


async def test_deeply_nested_json_over_websocket(node: Node) -> None:
    """100 000 levels of nesting, as a whole message or inside a field, get `invalid_json`
    (id null: the envelope could not be read); 300 levels — parseable but deeper than what can
    be stored — in command `params` or a `command_result` get `invalid_message` with the id.
    The sessions stay open and work afterwards; no command changed state; the server is ready."""
    await node.register("d1")
    device = await node.device("d1")
    client = await node.client("operator")
    for raw in (
        "[" * DEEP + "]" * DEEP,
        '{"type":"telemetry","id":"x","data":{"a":' + "[" * DEEP + "]" * DEEP + "}}",
        '{"type":"status","status":"ok","id":' + "[" * DEEP + "]" * DEEP + "}",
    ):
        assert len(raw) < node.settings.max_message_bytes
        await send_raw(device, raw)
        reply = await device.recv()
        assert (reply["type"], reply["id"], reply["code"]) == ("error", None, "invalid_json")
    deep_params = {"type": "command", "device_id": "d1", "name": "x", "params": nested(300)}
    reply = await client.request(deep_params)
    assert (reply["type"], reply["code"]) == ("error", "invalid_message")
    assert reply["details"][0]["loc"] == ["params"]
    issued = await client.request({"type": "command", "device_id": "d1", "name": "ok"})
    command = await device.next_of("command")
    reply = await device.request(
        {"type": "command_result", "command_id": command["command_id"], "ok": True, "result": nested(300)}
    )
    assert (reply["type"], reply["code"]) == ("error", "invalid_message")
    async with node.rest("viewer") as rest:
        assert (await rest.get(f"/commands/{issued['command_id']}")).json()["state"] == "sent"
    assert (await device.request({"type": "status", "status": "still-here"}))["changed"] is True
    ack = await device.request({"type": "command_result", "command_id": command["command_id"], "ok": True})
    assert ack["type"] == "ack"
    await alive(node)


async def test_deeply_nested_json_over_rest(node: Node) -> None:
    """REST bodies nested 100 000 levels are 400 `invalid_json` problem documents (the body's
    `status` matches); 300 levels in device metadata, a telemetry schema or command params are
    422 `invalid_message`; nothing is created and the server stays ready."""
    await node.register("d1")
    deep = "[" * DEEP + "]" * DEEP
    async with node.rest() as rest:
        headers = {"content-type": "application/json"}
        for path, body in (
            ("/devices", '{"id":"x1","metadata":{"a":' + deep + "}}"),
            ("/devices/d1/telemetry", '{"data":{"a":' + deep + "}}"),
            ("/devices/d1/commands", '{"name":"x","params":{"a":' + deep + "}}"),
        ):
            response = await rest.post(path, content=body, headers=headers)
            assert response.status_code == 400, (path, response.text)
            problem = response.json()
            assert (problem["status"], problem["code"]) == (400, "invalid_json")
            assert response.headers["content-type"] == "application/problem+json"
        for method, path, body in (
            ("POST", "/devices", {"id": "x2", "metadata": nested(300)}),
            ("POST", "/devices", {"id": "x3", "telemetry_schema": nested(300)}),
            ("PATCH", "/devices/d1", {"metadata": nested(300)}),
            ("POST", "/devices/d1/commands", {"name": "x", "params": nested(300), "queue": True}),
        ):
            response = await rest.request(method, path, json=body)
            assert response.status_code == 422, (method, path, response.text)
            assert response.json()["code"] == "invalid_message"
        assert [d["id"] for d in (await rest.get("/devices")).json()["items"]] == ["d1"]
        assert (await rest.get("/devices/d1")).json()["metadata"] == {}
        assert (await rest.get("/devices/d1/commands")).json()["items"] == []
    await alive(node)


async def test_huge_numbers(node: Node) -> None:
    """Numbers at and beyond every range: over WebSocket, 1e308 and the 64-bit integer limits
    are stored exactly, an integer beyond 64 bits is read as the nearest double (orjson), 1e400
    is `invalid_json`; an integer `id` beyond 64 bits is refused, one within is echoed; a
    `resume` seq or `ts` beyond range is `invalid_message`. Over REST an integer beyond 64 bits
    is stored with every digit and its live event carries them; out-of-range `since`, `from`
    or cursor values are 422. No reply is `internal`, no response a 5xx."""
    await node.register("d1")
    device = await node.device("d1")
    client = await node.client()
    await client.request({"type": "subscribe", "devices": ["d1"], "events": ["telemetry"]})
    for data in ({"f": 1e308}, {"u": 2**64 - 1}, {"i": -(2**63)}, {"g": 10**30}):
        assert (await device.request({"type": "telemetry", "data": data}))["accepted"] == 1
    await send_raw(device, '{"type":"telemetry","id":"inf","data":{"x":1e400}}')
    assert (await device.recv())["code"] == "invalid_json"
    await send_raw(device, '{"type":"status","status":"a","id":18446744073709551615}')
    assert (await device.recv())["id"] == 2**64 - 1
    await send_raw(device, '{"type":"status","status":"b","id":100000000000000000000000}')
    refused = await device.recv()
    assert (refused["id"], refused["code"]) == (None, "invalid_message")
    ts = await device.request({"type": "telemetry", "ts": 2**63, "data": {"t": 1}})
    assert ts["code"] == "invalid_message"
    for seq in (2**63, 2**64 - 1):
        resume = await client.request({"type": "subscribe", "devices": ["d1"], "resume": {"d1": seq}})
        assert (resume["type"], resume["code"]) == ("error", "invalid_message"), seq
    async with node.rest() as rest:
        assert (await rest.post("/devices/d1/telemetry", json={"data": {"exact": 10**30}})).json() == {
            "accepted": 1
        }
        latest = (await rest.get("/devices/d1/telemetry/latest")).json()["values"]
        assert {k: v["value"] for k, v in latest.items()} == {
            "f": 1e308,
            "u": 2**64 - 1,
            "i": -(2**63),
            "g": 1e30,
            "exact": 10**30,
        }
        assert type(latest["g"]["value"]) is float
        for path in (
            "/devices/d1/events?since=9223372036854775808",
            "/devices/d1/telemetry?from=100000000000000000000000",
            "/devices/d1/telemetry?to=-100000000000000000000000",
            "/devices/d1/telemetry?from=%C2%B2",  # "²": a digit to str.isdigit, not to int()
            "/devices/d1/telemetry?cursor=WyJhIiwxLCJrIl0",  # ["a",1,"k"]
            "/devices/d1/telemetry?cursor=WzFlMzAsMSwiayJd",  # [1e30,1,"k"]
        ):
            response = await rest.get(path)
            assert (response.status_code, response.json()["code"]) == (422, "invalid_message"), path
    values = [(await client.event("device.telemetry"))["data"]["values"] for _ in range(5)]
    assert values[-1] == {"exact": 10**30}
    assert (await device.request({"type": "status", "status": "alive"}))["type"] == "ack"


async def test_containers_where_scalars_belong(node: Node) -> None:
    """Lists or objects where names, ids or event classes belong (found by the property tests:
    `events: [["status"]]` used to close the session 1011) are `invalid_message`; the session
    goes on. Over REST, `metadata: null` in a PATCH clears the metadata (found by schemathesis:
    it used to be a 500)."""
    await node.register("d1")
    client = await node.client("operator")
    for message in (
        {"type": "subscribe", "devices": ["d1"], "events": [["status"]]},
        {"type": "subscribe", "devices": ["d1"], "events": [{"status": 1}]},
        {"type": "subscribe", "devices": [["d1"]]},
        {"type": "unsubscribe", "subscription_id": ["s1"]},
        {"type": "command", "device_id": ["d1"], "name": "x"},
        {"type": "command", "device_id": "d1", "name": {"x": 1}},
    ):
        reply = await client.request(message)
        assert (reply["type"], reply["code"]) == ("error", "invalid_message"), message
    ack = await client.request({"type": "subscribe", "devices": ["d1"], "events": ["status"]})
    assert ack["type"] == "ack"
    async with node.rest() as rest:
        assert (await rest.patch("/devices/d1", json={"metadata": {"a": 1}})).json()["metadata"] == {"a": 1}
        cleared = await rest.patch("/devices/d1", json={"metadata": None})
        assert (cleared.status_code, cleared.json()["metadata"]) == (200, {})


async def test_duplicate_keys_last_one_wins_on_both_paths(node: Node) -> None:
    """Duplicate JSON names: the last occurrence wins, over WebSocket (also for `type` and
    `id`) and REST alike, and a message still gets exactly one reply."""
    await node.register("d1")
    device = await node.device("d1")
    await send_raw(device, '{"type":"status","id":"dup","status":"first","status":"second"}')
    assert await device.recv() == {"type": "ack", "id": "dup", "changed": True}
    await send_raw(device, '{"type":"auth","type":"status","status":"third","id":"a","id":"b"}')
    assert await device.recv() == {"type": "ack", "id": "b", "changed": True}
    await send_raw(device, '{"type":"telemetry","data":{"k":1,"k":2},"id":"t"}')
    assert (await device.recv())["accepted"] == 1
    assert (await device.request({"type": "status", "status": "third"}))["changed"] is False
    async with node.rest() as rest:
        body = '{"id":"dup1","name":"one","id":"dup2","name":"two"}'
        created = await rest.post("/devices", content=body, headers={"content-type": "application/json"})
        assert (created.status_code, created.json()["id"], created.json()["name"]) == (201, "dup2", "two")
        assert (await rest.get("/devices/dup1")).status_code == 404
        points = (await rest.get("/devices/d1/telemetry", params={"key": "k"})).json()["items"]
        assert [p["value"] for p in points] == [2]


META = "'; DROP TABLE devices; -- % _ \" ` \\ $1 ? :p [a-z]* O'Brien"


async def test_sql_metacharacters_are_stored_and_matched_literally(store_node: Node, backend: str) -> None:
    """SQL metacharacters in names, types, tags, metadata (keys and values), telemetry strings,
    command params and idempotency keys are stored and returned byte for byte; `%`, `_` and
    quotes in filters, telemetry keys and `devices` claims match literally (never as LIKE or
    GLOB wildcards); the tables are intact afterwards."""
    node = store_node
    async with node.rest() as rest:
        first = {
            "id": "a_c",
            "name": META,
            "type": "%",
            "tags": ["%", "_", "'; DROP TABLE devices; --"],
            "metadata": {"q": META, META: "key", "n": ["%", "_"]},
        }
        assert (await rest.post("/devices", json=first)).status_code == 201
        assert (
            await rest.post("/devices", json={"id": "abc", "type": "x", "tags": ["a"]})
        ).status_code == 201
        assert (await rest.patch("/devices/a_c", json={"status": "abc"})).status_code == 200
        assert (await rest.patch("/devices/abc", json={"status": "a_c"})).status_code == 200
        stored = (await rest.get("/devices/a_c")).json()
        assert {k: stored[k] for k in first} == first
        for params, expected in (
            ({"tag": "%"}, ["a_c"]),
            ({"tag": "_"}, ["a_c"]),
            ({"tag": "'; DROP TABLE devices; --"}, ["a_c"]),
            ({"tag": "a"}, ["abc"]),
            ({"type": "%"}, ["a_c"]),
            ({"type": "_"}, []),
            ({"status": "a_c"}, ["abc"]),
            ({"status": "%"}, []),
            ({"status": "' OR '1'='1"}, []),
        ):
            listed = (await rest.get("/devices", params=params)).json()["items"]
            assert [d["id"] for d in listed] == expected, params
    device = await node.device("a_c")
    ack = await device.request(
        {"type": "telemetry", "data": {"s": META, "p": "%", "u": "_", "a_c": 1, "abc": 2, "q": "''"}}
    )
    assert ack["accepted"] == 1
    bad = await device.request({"type": "status", "status": "'; drop table devices; --"})
    assert bad["code"] == "invalid_message"
    async with node.rest("viewer") as rest:
        latest = (await rest.get("/devices/a_c/telemetry/latest")).json()["values"]
        assert {k: v["value"] for k, v in latest.items()} == {
            "s": META,
            "p": "%",
            "u": "_",
            "a_c": 1,
            "abc": 2,
            "q": "''",
        }
        for key, expected in (("a_c", [1]), ("%", []), ("_", []), ("' OR '1'='1", [])):
            points = (await rest.get("/devices/a_c/telemetry", params={"key": key})).json()["items"]
            assert [p["value"] for p in points] == expected, key
        history = (await rest.get("/devices/a_c/events")).json()["items"]
        assert history[0]["data"]["name"] == META
    narrow = await node.client("operator", sub="n", devices=["a_c"])
    sub = await narrow.request({"type": "subscribe", "devices": ["*"]})
    assert [s["device_id"] for s in sub["snapshot"]] == ["a_c"]
    async with node.rest("viewer", devices=["a_c"]) as rest:
        assert [d["id"] for d in (await rest.get("/devices")).json()["items"]] == ["a_c"]
    command = {
        "type": "command",
        "device_id": "a_c",
        "name": "x",
        "params": {"q": META},
        "idempotency_key": META,
    }
    first_ack = await narrow.request(command)
    delivered = await device.next_of("command")
    assert delivered["params"] == {"q": META}
    assert (await narrow.request(command))["command_id"] == first_ack["command_id"]
    async with node.rest() as rest:
        assert [d["id"] for d in (await rest.get("/devices")).json()["items"]] == ["a_c", "abc"]
        assert (await rest.get(f"/commands/{first_ack['command_id']}")).json()["params"] == {"q": META}


async def test_nul_characters_never_reach_a_5xx(store_node: Node, backend: str) -> None:
    """U+0000 (which PostgreSQL text cannot hold): a telemetry string containing it is refused
    `invalid_message` for that device only — another device's telemetry committed at the same
    moment is acked; a device name with it is 422; look-ups by a NUL-bearing id, filter or key
    answer 404/empty (SQLite) or 422 (PostgreSQL), never 503 or 500; metadata (JSON) keeps it."""
    node = store_node
    await node.register("d1", "d2")
    one = await node.device("d1")
    two = await node.device("d2")
    await one.send({"type": "telemetry", "id": "nul", "data": {"s": "a\x00b"}})
    await two.send({"type": "telemetry", "id": "fine", "data": {"s": "fine"}})
    nul, fine = await one.recv(), await two.recv()
    assert (nul["id"], nul["type"], nul["code"]) == ("nul", "error", "invalid_message")
    assert nul["details"][0]["loc"] == ["data", "s"]
    assert fine == {"type": "ack", "id": "fine", "accepted": 1}
    lookup = 404 if backend == "sqlite" else 422
    async with node.rest() as rest:
        response = await rest.post("/devices", json={"id": "n1", "name": "a\x00b"})
        assert response.status_code == 422
        created = await rest.post("/devices", json={"id": "n2", "metadata": {"k": "a\x00b"}})
        assert (created.status_code, created.json()["metadata"]) == (201, {"k": "a\x00b"})
        assert (await rest.get("/devices/a%00b")).status_code == lookup
        assert (await rest.get("/commands/a%00b")).status_code == lookup
        for params in ({"tag": "a\x00"}, {"status": "a\x00"}, {"type": "\x00"}):
            response = await rest.get("/devices", params=params)
            assert response.status_code == (200 if backend == "sqlite" else 422), params
        response = await rest.get("/devices/d1/telemetry", params={"key": "\x00"})
        assert response.status_code == (200 if backend == "sqlite" else 422)
        stored = (await rest.get("/devices/d2/telemetry/latest")).json()["values"]
        assert stored["s"]["value"] == "fine"
        assert (await rest.get("/devices/d1/telemetry")).json()["items"] == []
    client = await node.client("operator")
    reply = await client.request({"type": "subscribe", "devices": ["d\x00"]})
    assert reply["code"] == ("not_found" if backend == "sqlite" else "invalid_message")
    await alive(node)
