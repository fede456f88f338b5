"""The dashboard against real fleets (issue 17): a `fleetwire simulate` process changes a
device's status and the row follows without a reload; a fleet job created over REST shows
its progress live in the jobs panel, to the exact final counts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fleetwire.client import Command, CommandError, DeviceClient
from tests.integration.harness import SECRET, Node

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

CONNECTION, STATUS = 2, 3  # columns of the device table
SIMULATOR_START_MS = 60_000  # a fresh interpreter importing fleetwire on a loaded 2-core machine
FLEETWIRE = str(Path(sys.executable).parent / "fleetwire")  # the console script of this environment


@contextlib.asynccontextmanager
async def simulator(node: Node, tmp: Path, *argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real `fleetwire simulate` process against the node (its tokens from the node's secret);
    killed at the end if the test did not stop it."""
    env = {**os.environ, "FLEETWIRE_JWT_SECRET": SECRET, "FLEETWIRE_DATA_DIR": str(tmp)}
    process = await asyncio.create_subprocess_exec(
        FLEETWIRE, "simulate", "--url", node.http_url, "--no-progress", *argv,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await asyncio.wait_for(process.wait(), 30)


async def test_a_simulated_door_changes_status_and_its_row_follows(
    tmp_path: Path, make_node: Callable[..., Node], dashboard: Callable[..., Any]
) -> None:
    """`fleetwire simulate` runs four pre-registered devices; the fourth is a door, which
    reports its contact as status. With seed 3 its contact reads closed three times, then open
    (the sensor's own random stream): the row shows `closed`, then `open`, live; the tail lists
    both changes; the thermostat's status stays empty; Ctrl-C (SIGINT) ends the simulator
    cleanly and the rows go offline. The page is never reloaded."""
    node = make_node()
    await node.register("sim-0", "sim-1", "sim-2", "sim-3")
    board = await dashboard(node, node.token("alice", "viewer"))
    page = board.page
    await page.evaluate("window.__notReloaded = true")
    await board.wait_cell("sim-3", CONNECTION, "never seen")
    assert await board.cell("sim-3", STATUS) == ""
    await page.uncheck("#tail-telemetry")  # 40 readings a second would push the rest out of the tail
    argv = ("--devices", "4", "--rate", "10", "--seed", "3", "--duration", "120")
    async with simulator(node, tmp_path / "sim", *argv) as process:
        page.set_default_timeout(SIMULATOR_START_MS)
        await board.wait_cell("sim-3", STATUS, "closed")
        page.set_default_timeout(10_000)
        await board.wait_cell("sim-3", STATUS, "open")
        await board.wait_cell("sim-3", CONNECTION, "online")
        assert await board.cell("sim-0", STATUS) == ""  # a thermostat reports no status
        process.send_signal(signal.SIGINT)  # the simulator's Ctrl-C: drain, close, summary
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    summary = stdout.decode()
    assert summary.startswith("4 devices, "), summary
    assert " 0 errors, " in summary, summary
    await board.wait_cell("sim-3", CONNECTION, "offline")
    await board.wait_cell("sim-0", CONNECTION, "offline")
    assert await board.cell("sim-3", STATUS) == "open"  # the last status outlives the session
    lines = await page.evaluate("[...document.querySelectorAll('#tail li')].map((li) => li.lastChild.textContent)")
    tail = [line for line in reversed(lines) if line.startswith("sim-3 ")]  # the tail shows the newest first
    changes = [line.split(" ", 2)[2] for line in tail if " status " in line]
    assert changes == ["status — → closed (device)", "status closed → open (device)"], tail
    assert await page.evaluate("window.__notReloaded") is True
    assert board.errors == []


async def test_a_job_shows_live_progress_to_its_final_counts(
    make_node: Callable[..., Node], dashboard: Callable[..., Any]
) -> None:
    """Five registered devices: three SDK devices answer `ping`, one refuses it (a command
    error), one is offline. A job created over REST (one at a time, no queueing) first shows
    running with 0 of 5 while the first device holds its answer; released, the panel reaches
    exactly 3 succeeded, 1 failed, 1 skipped of 5, state `completed`, with the bar's parts in
    those proportions. The final counts reached the page as a live `job` frame on its socket."""
    node = make_node()
    ids = ["pump-1", "pump-2", "pump-3", "pump-4", "pump-5"]
    await node.register(*ids)
    release = asyncio.Event()
    clients: list[DeviceClient] = []
    for device_id in ids[:4]:
        client = DeviceClient(node.ws_url, node.token(device_id, "device"))

        async def ping(command: Command, device_id: str = device_id) -> dict[str, Any]:
            if device_id == "pump-1":
                await asyncio.wait_for(release.wait(), 30)  # held until the page shows the job running
            if device_id == "pump-4":
                raise CommandError("busy", "pump-4 is priming")
            return {"pong": device_id}

        client.command("ping")(ping)
        clients.append(client)
    try:
        for client in clients:
            await asyncio.wait_for(client.start(), 30)
        board = await dashboard(node, node.token("alice", "viewer"))
        page = board.page
        await page.wait_for_selector("#jobs:not([hidden])")
        await page.wait_for_function("() => document.querySelector('#job-list').textContent === 'no jobs'")
        for device_id in ids[:4]:
            await board.wait_cell(device_id, CONNECTION, "online")
        async with node.rest("operator") as rest:
            response = await rest.post(
                "/jobs",
                json={
                    "command": {"name": "ping", "timeout_s": 30},
                    "target": {"devices": ["pump-*"]},
                    "rollout": {"max_concurrent": 1},
                },
            )
        assert response.status_code == 201, response.text
        job_id = response.json()["job_id"]
        row = f'#job-list li[data-job="{job_id}"]'
        await page.wait_for_function(
            "s => document.querySelector(s + ' .state')?.textContent === 'running 0/5'", arg=row
        )
        await page.wait_for_function(  # pump-1 holds its answer: one in flight, the rest waiting
            "s => document.querySelector(s + ' .counts')?.textContent === '1 sent'", arg=row
        )
        release.set()
        await page.wait_for_function(
            "s => document.querySelector(s + ' .state')?.textContent === 'completed 3/5'", arg=row
        )
        assert await page.inner_text(f"{row} .counts") == "3 succeeded · 1 failed · 1 skipped"
        assert await page.inner_text(f"{row} .name") == "ping"
        widths = await page.evaluate(
            "s => [...document.querySelectorAll(s + ' .progress i')].map((i) => i.style.width)", row
        )
        assert widths == ["60%", "20%", "20%", "0%"]  # succeeded, failed, skipped, in flight
        final = {
            "total": 5, "pending": 0, "sent": 0, "succeeded": 3, "failed": 1,
            "timed_out": 0, "expired": 0, "skipped": 1, "canceled": 0,
        }  # fmt: skip
        frames = [f for f in board.received if f["type"] == "job" and f["job_id"] == job_id]
        assert {"state": "completed", "counts": final} in [
            {"state": f["state"], "counts": f["counts"]} for f in frames
        ], frames  # live: pushed on the socket, not only polled over REST
        async with node.rest("viewer") as rest:
            shown = (await rest.get(f"/jobs/{job_id}")).json()
        assert (shown["state"], shown["counts"]) == ("completed", final)
        assert board.errors == []
    finally:
        for client in clients:
            await asyncio.wait_for(client.close(), 10)
