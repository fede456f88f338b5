"""`fleetwire simulate` against a real server (issue 17): it registers its devices, sends
telemetry from its sensor shapes, answers commands, survives dropped connections, and its
summary's numbers are what the server stored."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import pytest

from fleetwire.cli import build_parser
from fleetwire.settings import Settings
from fleetwire.simulate import run
from tests.integration.harness import SECRET, TIMEOUT, Node

pytestmark = pytest.mark.anyio

SUMMARY = re.compile(
    r"(\d+) devices, [\d.]+ s: (\d+) records sent, (\d+) acked \([\d,]+/s\), (\d+) unacked, (\d+) errors, "
    r"(\d+) reconnects, (\d+) commands answered"
)


def parse(argv: list[str]) -> object:
    return build_parser().parse_args(["simulate", *argv])


async def stored_count(node: Node, device_id: str) -> int:
    """How many telemetry records the device has (its events history, telemetry rows only)."""
    count, since = 0, 0
    async with node.rest("viewer") as rest:
        while True:
            items = (
                await rest.get(f"/devices/{device_id}/events", params={"since": since, "limit": 1000})
            ).json()["items"]
            if not items:
                return count
            count += sum(1 for item in items if item["event"] == "device.telemetry")
            since = items[-1]["seq"]


async def simulate(
    node: Node, tmp: Path, argv: list[str], stop: asyncio.Event | None = None
) -> tuple[int, str]:
    out = io.StringIO()
    args = build_parser().parse_args(["simulate", "--url", node.http_url, "--no-progress", *argv])
    settings = Settings(jwt_secret=SECRET, data_dir=tmp)
    code = await asyncio.wait_for(run(args, settings=settings, stop=stop, out=out), 30)
    return code, out.getvalue()


async def test_register_send_and_summary(node: Node, tmp_path: Path) -> None:
    """--register creates the devices with their sensor type; the summary's acked count is
    exactly what the server stored, nothing is left unacked and there were no errors."""
    code, output = await simulate(
        node,
        tmp_path,
        ["--register", "--devices", "4", "--rate", "20", "--batch", "3", "--duration", "1", "--seed", "7"],
    )
    match = SUMMARY.search(output)
    assert match, output
    devices, sent, acked, unacked, errors, reconnects, _ = map(int, match.groups())
    assert (code, devices, unacked, errors, reconnects) == (0, 4, 0, 0, 0)
    assert sent == acked
    assert acked % 3 == 0  # whole batches
    assert acked > 0
    stored = [await stored_count(node, f"sim-{i}") for i in range(4)]
    assert sum(stored) == acked
    async with node.rest("viewer") as rest:
        devices_body = (await rest.get("/devices", params={"tag": "simulated"})).json()
        types = sorted(d["type"] for d in devices_body["items"])
        latest = (await rest.get("/devices/sim-0/telemetry/latest")).json()["values"]
    assert types == ["door", "meter", "thermostat", "tracker"]
    statuses = {d["id"]: d["status"] for d in devices_body["items"]}
    assert statuses["sim-3"] in ("open", "closed")  # the door reports its contact as its status
    assert statuses["sim-0"] is None  # a thermostat has none
    assert set(latest) == {"temp_c", "humidity_pct"}  # sim-0 is a thermostat
    assert 12 <= latest["temp_c"]["value"] <= 30


async def test_answers_commands_while_running(node: Node, tmp_path: Path) -> None:
    """While the simulator runs, ping and set_rate succeed; a bad set_rate fails with
    invalid_params; a desired twin state is adopted and reported (the delta becomes {}); the
    summary counts the three commands and the one delta."""
    stop = asyncio.Event()
    running = asyncio.ensure_future(
        simulate(node, tmp_path, ["--register", "--devices", "2", "--rate", "5"], stop)
    )
    operator = await node.client("operator")
    async with node.rest("viewer") as rest:
        async with asyncio.timeout(TIMEOUT):
            while (await rest.get("/devices/sim-1/connection")).json().get("connected") is not True:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # the simulator's start has no event to await from here
    results = []
    for name, params in (("ping", {}), ("set_rate", {"rate": 50}), ("set_rate", {"rate": -1})):
        await operator.request({"type": "command", "device_id": "sim-1", "name": name, "params": params})
        results.append(await operator.next_of("command_result"))
    await operator.request({"type": "subscribe", "devices": ["sim-1"], "events": ["twin"]})
    desired = {"interval_s": 0.05, "mode": "eco"}
    await operator.request({"type": "twin_update", "device_id": "sim-1", "desired": desired})
    reported = await operator.event("twin.updated", reported=desired)
    assert reported["data"]["delta"] == {}
    stop.set()
    code, output = await running
    assert [r["state"] for r in results] == ["succeeded", "succeeded", "failed"]
    assert results[0]["result"]["pong"] is True
    assert results[1]["result"] == {"rate": 50.0}
    assert results[2]["error"]["code"] == "invalid_params"
    match = SUMMARY.search(output)
    assert match, output
    assert int(match.group(7)) == 3
    assert output.rstrip().endswith("1 twin deltas applied"), output
    assert code == 0


async def test_flaky_connections_lose_nothing(node: Node, tmp_path: Path) -> None:
    """--flaky 1 drops every device's connection each second: the devices reconnect, and
    every record the summary says was acked is stored (some twice at most: at least once)."""
    code, output = await simulate(
        node,
        tmp_path,
        ["--register", "--devices", "3", "--rate", "50", "--flaky", "1", "--duration", "2.5", "--jitter"],
    )
    match = SUMMARY.search(output)
    assert match, output
    _, sent, acked, unacked, errors, reconnects, _ = map(int, match.groups())
    assert (code, unacked, errors) == (0, 0, 0)
    assert sent == acked
    assert reconnects >= 3  # each device dropped at least once
    stored = sum([await stored_count(node, f"sim-{i}") for i in range(3)])
    assert stored >= acked


async def test_unregistered_devices_are_reported(node: Node, tmp_path: Path) -> None:
    """Without --register, unknown devices are refused (403): the client stops, the summary
    names each device and the exit code is 1."""
    code, output = await simulate(
        node, tmp_path, ["--devices", "2", "--prefix", "ghost-", "--duration", "0.5"]
    )
    assert code == 1
    assert "ghost-0 stopped: 403 forbidden" in output
    assert "ghost-1 stopped: 403 forbidden" in output


def test_arguments_are_checked() -> None:
    """Out-of-range options are usage errors (exit 2)."""
    for argv in (["--batch", "1001"], ["--flaky", "1.5"], ["--rate", "0"], ["--devices", "0"]):
        with pytest.raises(SystemExit) as exited:
            parse(argv)
        assert exited.value.code == 2
