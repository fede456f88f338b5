"""The device twin against a real server (issue 14, contract §6): merge semantics, versions
and conflicts, deltas pushed to the device, resume, limits and authorization."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.clock import ManualClock
from tests.integration.harness import Node

pytestmark = pytest.mark.anyio


async def _twin(node: Node, device_id: str = "d1") -> dict[str, Any]:
    async with node.rest("viewer") as rest:
        response = await rest.get(f"/devices/{device_id}/twin")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


async def test_merge_semantics_versions_and_metadata(make_node: Callable[..., Node]) -> None:
    """PATCH desired merges nested objects key by key, null deletes, arrays are replaced
    whole; each write that changes something bumps the version by one and stamps the leaves
    it changed; a patch that changes nothing answers the same version."""
    clock = ManualClock(1_764_590_400_000)  # 2025-12-01T12:00:00Z
    node = make_node(clock=clock)
    await node.register("d1")
    assert await _twin(node) == {
        "device_id": "d1",
        "desired": {},
        "reported": {},
        "delta": {},
        "version": 1,
        "metadata": {"desired": {}, "reported": {}},
    }
    async with node.rest("operator") as rest:
        first = await rest.patch(
            "/devices/d1/twin",
            json={"desired": {"led": {"on": True, "color": "red"}, "fans": [1, 2], "mode": "eco"}},
        )
        assert first.status_code == 200, first.text
        assert first.json()["version"] == 2
        node.advance(1.5)
        second = (
            await rest.patch(
                "/devices/d1/twin",
                json={"desired": {"led": {"color": "blue", "on": None}, "fans": [3], "mode": None}},
            )
        ).json()
        assert second["desired"] == {"led": {"color": "blue"}, "fans": [3]}
        assert second["version"] == 3
        assert second["metadata"]["desired"] == {
            "led": {"color": {"updated_at": "2025-12-01T12:00:01.500Z"}},
            "fans": {"updated_at": "2025-12-01T12:00:01.500Z"},
        }
        same = (await rest.patch("/devices/d1/twin", json={"desired": {"fans": [3], "gone": None}})).json()
        assert same == second
    assert await _twin(node) == second


async def test_if_version_conflict_changes_nothing(node: Node) -> None:
    """A write whose if_version is not the current version is refused (REST 409, WebSocket
    `conflict`) and changes nothing; with the current version it applies."""
    await node.register("d1")
    operator = await node.client("operator")
    ok = await operator.request(
        {"type": "twin_update", "device_id": "d1", "desired": {"a": 1}, "if_version": 1}
    )
    assert (ok["type"], ok["version"]) == ("ack", 2)
    stale = await operator.request(
        {"type": "twin_update", "device_id": "d1", "desired": {"a": 2}, "if_version": 1}
    )
    assert stale["code"] == "conflict"
    async with node.rest("operator") as rest:
        refused = await rest.patch("/devices/d1/twin", json={"desired": {"a": 3}, "if_version": 5})
        assert refused.status_code == 409
        assert refused.json()["code"] == "conflict"
        assert refused.headers["content-type"] == "application/problem+json"
    device = await node.device("d1")
    await device.next_of("twin_delta")
    reported = await device.request({"type": "twin_report", "reported": {"a": 9}, "if_version": 1})
    assert reported["code"] == "conflict"
    twin = await _twin(node)
    assert (twin["version"], twin["desired"], twin["reported"]) == (2, {"a": 1}, {})


async def test_delta_after_desired_and_after_reported_writes(node: Node) -> None:
    """The device gets `twin_delta` after a desired write and after its own report when the
    delta changed (to what remains, possibly empty); nothing after `welcome` while the
    delta is empty, nor after a report that leaves the delta as it was (the next delta,
    which travels the same ordered event path, is the sentinel that proves it)."""
    await node.register("d1")
    device = await node.device("d1")
    async with node.rest("operator") as rest:
        await rest.patch("/devices/d1/twin", json={"desired": {"temp": 21, "led": {"on": True, "lvl": 3}}})
    first = await device.next_of("twin_delta")
    assert first == {"type": "twin_delta", "version": 2, "delta": {"temp": 21, "led": {"on": True, "lvl": 3}}}
    ack = await device.request({"type": "twin_report", "reported": {"temp": 21, "led": {"on": False}}})
    assert (ack["type"], ack["version"]) == ("ack", 3)
    delta = await device.next_of("twin_delta")
    assert delta == {"type": "twin_delta", "version": 3, "delta": {"led": {"on": True, "lvl": 3}}}
    unrelated = await device.request({"type": "twin_report", "reported": {"uptime": 5}})
    assert unrelated["version"] == 4
    converged = await device.request({"type": "twin_report", "reported": {"led": {"on": True, "lvl": 3.0}}})
    assert converged["version"] == 5
    assert (await device.next_of("twin_delta")) == {"type": "twin_delta", "version": 5, "delta": {}}
    assert [m for m in device.pending if m.get("type") == "twin_delta"] == []
    got = await device.request({"type": "twin_get"})
    assert got["twin"]["delta"] == {}
    assert got["twin"]["reported"] == {"temp": 21, "led": {"on": True, "lvl": 3.0}, "uptime": 5}


async def test_offline_device_gets_the_delta_right_after_welcome(node: Node) -> None:
    """Desired written while the device is offline: on connect it receives `welcome`, its
    queued command, then `twin_delta` with the current delta and version."""
    await node.register("d1")
    operator = await node.client("operator")
    await operator.request({"type": "twin_update", "device_id": "d1", "desired": {"fw": "1.2"}})
    await operator.request({"type": "twin_update", "device_id": "d1", "desired": {"interval": 10}})
    queued = await operator.request({"type": "command", "device_id": "d1", "name": "sync", "queue": True})
    device = await node.device("d1")
    assert device.welcome["type"] == "welcome"
    first = await device.recv()
    second = await device.recv()
    assert (first["type"], first["command_id"]) == ("command", queued["command_id"])
    assert second == {"type": "twin_delta", "version": 3, "delta": {"fw": "1.2", "interval": 10}}


async def test_client_resume_replays_missed_twin_updates_in_order(node: Node) -> None:
    """twin.updated events (class `twin`) carry version, the applied patch under its section
    and the new delta; a client resuming from an old seq receives the missed ones in order."""
    await node.register("d1")
    watcher = await node.client("viewer")
    sub = await watcher.request({"type": "subscribe", "devices": ["d1"], "events": ["twin"]})
    start = sub["snapshot"][0]["seq"]
    operator = await node.client("operator")
    await operator.request({"type": "twin_update", "device_id": "d1", "desired": {"a": 1}})
    live = await watcher.event("twin.updated")
    assert live["data"] == {"version": 2, "desired": {"a": 1}, "delta": {"a": 1}}
    await watcher.close()
    await operator.request({"type": "twin_update", "device_id": "d1", "desired": {"b": {"c": 2}}})
    async with node.rest("admin") as rest:
        response = await rest.patch("/devices/d1/twin/reported", json={"reported": {"a": 1}})
        assert response.status_code == 200
    again = await node.client("viewer")
    resumed = await again.request(
        {"type": "subscribe", "devices": ["d1"], "events": ["twin"], "resume": {"d1": live["seq"]}}
    )
    assert resumed["recovered"] == {"d1": True}
    first = await again.event("twin.updated")
    second = await again.event("twin.updated")
    assert [first["seq"], second["seq"]] == [live["seq"] + 1, live["seq"] + 2]
    assert live["seq"] == start + 1
    assert first["data"] == {"version": 3, "desired": {"b": {"c": 2}}, "delta": {"a": 1, "b": {"c": 2}}}
    assert second["data"] == {"version": 4, "reported": {"a": 1}, "delta": {"b": {"c": 2}}}


async def test_every_limit_is_refused_and_changes_nothing(node: Node) -> None:
    """Over 16 KiB → too_large (413); deeper than 8 levels, a bad key, NaN/Infinity, a
    non-object patch, a bad if_version → invalid_message (422); the twin stays as it was."""
    await node.register("d1")
    async with node.rest("operator") as rest:
        base = (await rest.patch("/devices/d1/twin", json={"desired": {"keep": 1}})).json()
        big = await rest.patch("/devices/d1/twin", json={"desired": {"blob": "x" * 16_400}})
        assert (big.status_code, big.json()["code"]) == (413, "too_large")
        nine: Any = 1
        for _ in range(8):
            nine = {"n": nine}
        eight = nine["n"]
        deep = await rest.patch("/devices/d1/twin", json={"desired": {"n": nine}})
        assert (deep.status_code, deep.json()["code"]) == (422, "invalid_message")
        bad = [
            {"desired": {"bad key": 1}},
            {"desired": {"k" * 65: 1}},
            {"desired": {"a": [1, {"é": 2}]}},
            {"desired": [1]},
            {"desired": {"a": 1}, "if_version": "2"},
            {"desired": {"a": 1}, "extra": True},
        ]
        for body in bad:
            response = await rest.patch("/devices/d1/twin", json=body)
            assert (response.status_code, response.json()["code"]) == (422, "invalid_message"), body
        for raw in (
            b'{"desired": {"a": NaN}}',
            b'{"desired": {"a": Infinity}}',
            b'{"desired": {"a": -Infinity}}',
        ):
            response = await rest.patch(
                "/devices/d1/twin", content=raw, headers={"content-type": "application/json"}
            )
            assert (response.status_code, response.json()["code"]) == (422, "invalid_message"), raw
        fits = await rest.patch("/devices/d1/twin", json={"desired": {"n": eight}})
        assert fits.status_code == 200  # 8 levels is the limit, not over it
        assert fits.json()["version"] == base["version"] + 1
        base = fits.json()
    device = await node.device("d1")
    await device.next_of("twin_delta")
    for message in (
        {"type": "twin_report", "reported": {"blob": "y" * 16_400}},
        {"type": "twin_report", "reported": {"n": nine}},
        {"type": "twin_report", "reported": {"a b": 1}},
        {"type": "twin_report", "reported": "x"},
        {"type": "twin_report", "reported": {}, "if_version": -1},
        {"type": "twin_report", "reported": {}, "extra": 1},
        {"type": "twin_get", "extra": 1},
    ):
        reply = await device.request(message)
        expected = "too_large" if "blob" in str(message) else "invalid_message"
        assert (reply["type"], reply["code"]) == ("error", expected), message
    infinite = '{"type": "twin_report", "id": "i", "reported": {"a": Infinity}}'
    await device.ws.send(infinite)
    assert (await device.next_of("error"))["code"] == "invalid_json"
    assert await _twin(node) == base


async def test_authorization(node: Node) -> None:
    """A viewer cannot write desired; an operator outside its claim cannot; an operator
    cannot write reported; a device cannot write another device's reported, nor any desired,
    nor read another device's twin; the device itself and an admin may report."""
    await node.register("d1", "d2")
    async with node.rest("viewer") as rest:
        assert (await rest.patch("/devices/d1/twin", json={"desired": {"a": 1}})).status_code == 403
        assert (await rest.get("/devices/d1/twin")).status_code == 200
        assert (await rest.get("/devices/nope/twin")).status_code == 404
    async with node.rest("operator", devices=["d2"]) as rest:
        assert (await rest.patch("/devices/d1/twin", json={"desired": {"a": 1}})).status_code == 403
        assert (await rest.get("/devices/d1/twin")).status_code == 403
    async with node.rest("operator") as rest:
        assert (await rest.patch("/devices/d1/twin/reported", json={"reported": {"a": 1}})).status_code == 403
        assert (await rest.patch("/devices/nope/twin", json={"desired": {"a": 1}})).status_code == 404
    viewer = await node.client("viewer")
    refused = await viewer.request({"type": "twin_update", "device_id": "d1", "desired": {"a": 1}})
    assert refused["code"] == "forbidden"
    d1 = node.token("d1", "device")
    async with node.rest() as admin:
        headers = {"Authorization": f"Bearer {d1}"}
        other = await admin.patch("/devices/d2/twin/reported", json={"reported": {"a": 1}}, headers=headers)
        assert other.status_code == 403
        desired = await admin.patch("/devices/d1/twin", json={"desired": {"a": 1}}, headers=headers)
        assert desired.status_code == 403
        assert (await admin.get("/devices/d2/twin", headers=headers)).status_code == 403
        own = await admin.patch("/devices/d1/twin/reported", json={"reported": {"a": 1}}, headers=headers)
        assert (own.status_code, own.json()["version"]) == (200, 2)
        assert (await admin.get("/devices/d1/twin", headers=headers)).json()["reported"] == {"a": 1}
        by_admin = await admin.patch("/devices/d2/twin/reported", json={"reported": {"b": 2}})
        assert (by_admin.status_code, by_admin.json()["version"]) == (200, 2)
    device = await node.device("d1")
    update = await device.request({"type": "twin_update", "device_id": "d1", "desired": {"a": 1}})
    assert update["code"] == "forbidden"
    assert (await _twin(node, "d1"))["desired"] == {}
    assert (await _twin(node, "d2"))["reported"] == {"b": 2}
