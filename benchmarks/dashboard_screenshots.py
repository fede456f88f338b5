"""Screenshots of the dashboard for the README (docs/img/dashboard.png, docs/img/drawer.png).

`uv run python -m benchmarks.dashboard_screenshots`: a real `fleetwire serve` on a free port
with a throw-away data directory, 60 registered devices of which 40 connect over WebSocket and
send telemetry (a few change status, three flap), one command sent from the page and answered
by its device, all seen in Debian's Chromium (`/usr/bin/chromium`) through Playwright.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import async_playwright
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fleetwire.auth.jwt import mint_token

SECRET = "screenshot-secret-of-at-least-32-bytes"
OUT = Path(__file__).resolve().parent.parent / "docs" / "img"
SITES = ("site-a", "site-b", "lab")


def _token(sub: str, role: str) -> str:
    return mint_token(secret=SECRET, sub=sub, role=role, ttl_s=3600)[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def _device(base: str, device_id: str, stop: asyncio.Event, flaps: bool) -> None:
    phase = random.uniform(0, math.tau)
    while not stop.is_set():
        headers = {"Authorization": f"Bearer {_token(device_id, 'device')}"}
        try:
            # The server pings; this side does not (a loaded machine would time its pings out).
            async with connect(f"{base}/ws/device", additional_headers=headers, ping_interval=None) as ws:
                await ws.recv()  # welcome
                await _talk(ws, device_id, stop, phase, flaps)
        except (ConnectionClosed, OSError):
            await asyncio.sleep(0.5)  # reconnect, as a device would
        if flaps:
            await asyncio.sleep(0.3)


async def _talk(ws: ClientConnection, device_id: str, stop: asyncio.Event, phase: float, flaps: bool) -> None:
    n = 0
    started = time.monotonic()
    while not stop.is_set():
        n += 1
        t = time.monotonic() + phase
        data = {"temp": round(21 + 2 * math.sin(t / 3), 2), "humidity": round(45 + 5 * math.cos(t / 5), 1)}
        await ws.send(json.dumps({"type": "telemetry", "id": n, "data": data}))
        if n % 7 == 0:
            status = random.choice(["ok", "ok", "warm"])
            await ws.send(json.dumps({"type": "status", "id": f"s{n}", "status": status}))
        deadline = time.monotonic() + 0.5
        while (left := deadline - time.monotonic()) > 0:  # read everything that came meanwhile
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), left))
            except TimeoutError:
                break
            if message.get("type") == "command":
                result = {"uptime_s": int(time.monotonic() - started)}
                answer = {"type": "command_result", "command_id": message["command_id"], "ok": True}
                await ws.send(json.dumps({**answer, "result": result}))
        if flaps and time.monotonic() - started > 1.5:
            return  # close: the server records a disconnect


async def main() -> int:
    port = _free_port()
    base_http, base_ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWIRE_")}
        env.update(FLEETWIRE_PORT=str(port), FLEETWIRE_DATA_DIR=data, FLEETWIRE_JWT_SECRET=SECRET)
        env.update(FLEETWIRE_LOG_LEVEL="warning", FLEETWIRE_NODE_ID="demo-1")
        server = await asyncio.create_subprocess_exec(sys.executable, "-m", "fleetwire", "serve", env=env)
        try:
            return await _shoot(base_http, base_ws)
        finally:
            server.terminate()
            await asyncio.wait_for(server.wait(), 30)


async def _shoot(base_http: str, base_ws: str) -> int:
    headers = {"Authorization": f"Bearer {_token('demo', 'admin')}"}
    async with httpx.AsyncClient(base_url=f"{base_http}/api/v1", headers=headers, timeout=10) as rest:
        for _ in range(600):  # a loaded machine starts a server slowly
            try:
                if (await rest.get(f"{base_http}/readyz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        for i in range(60):
            site = SITES[i % 3]
            body: dict[str, Any] = {"id": f"{site}.sensor-{i:02d}", "name": f"{site} {i}", "tags": [site]}
            (await rest.post("/devices", json=body)).raise_for_status()
        await rest.patch("/devices/lab.sensor-02/twin", json={"desired": {"interval_s": 5, "led": "green"}})
        (await rest.patch("/devices/site-b.sensor-04", json={"disabled": True})).raise_for_status()
    ids = [f"{SITES[i % 3]}.sensor-{i:02d}" for i in range(40) if i != 4]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_device(base_ws, d, stop, flaps=i in (5, 9, 13))) for i, d in enumerate(ids)]
    OUT.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1440, "height": 1100})
        await page.goto(f"{base_http}/#token={_token('demo', 'admin')}")
        await page.wait_for_selector("#h-live.ok", timeout=15_000)
        await asyncio.sleep(8)  # telemetry, a few flaps and the 5 s overview poll
        await page.screenshot(path=str(OUT / "dashboard.png"))
        print("dashboard.png", flush=True)
        await page.click('.row[data-id="lab.sensor-02"]')
        await page.wait_for_selector('#d-latest tr[data-key="temp"]', timeout=10_000)
        await page.fill("#c-name", "read")
        await page.fill("#c-params", '{"keys": ["temp"]}')
        await page.click("#d-command button[type=submit]")
        await page.wait_for_selector("#d-commands .state.succeeded", timeout=30_000)
        await asyncio.sleep(2)
        await page.screenshot(path=str(OUT / "drawer.png"))
        print("drawer.png", flush=True)
        await asyncio.wait_for(browser.close(), 30)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    print(f"wrote {OUT / 'dashboard.png'} and {OUT / 'drawer.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
