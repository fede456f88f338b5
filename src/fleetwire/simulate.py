"""`fleetwire simulate`: devices that register, connect, send telemetry and answer commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import httpx
from websockets.asyncio.client import connect

from fleetwire.local import local_minter, server_url
from fleetwire.settings import Settings


async def _device(url: str, device_id: str, token: str, interval: float, stop: asyncio.Event) -> int:
    """One simulated device; returns how many records were acked."""
    acked = 0
    async with connect(f"{url}/ws/device", additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.recv()  # welcome
        temp = random.uniform(18, 24)
        n = 0
        while not stop.is_set():
            temp += random.uniform(-0.2, 0.2)
            n += 1
            await ws.send(json.dumps({"type": "telemetry", "id": n, "data": {"temp": round(temp, 2)}}))
            deadline = asyncio.get_running_loop().time() + interval
            while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    message = json.loads(await asyncio.wait_for(ws.recv(), remaining))
                except TimeoutError:
                    break
                if message.get("type") == "ack":
                    acked += int(message.get("accepted", 0))
                elif message.get("type") == "command":
                    await ws.send(
                        json.dumps(
                            {
                                "type": "command_result",
                                "command_id": message["command_id"],
                                "ok": True,
                                "result": {"echo": message["params"]},
                            }
                        )
                    )
    return acked


async def run(args: argparse.Namespace) -> int:
    settings = Settings()
    base = server_url(settings, args.url)
    ws_url = base.replace("http", "ws", 1)
    minter = local_minter(settings)
    admin = minter.mint(sub="fleetwire-simulate", role="admin", ttl_s=300).token
    ids = [f"{args.prefix}{i}" for i in range(args.devices)]
    async with httpx.AsyncClient(base_url=f"{base}/api/v1", timeout=10) as http:
        for device_id in ids:
            response = await http.post(
                "/devices",
                json={"id": device_id, "type": "simulated"},
                headers={"Authorization": f"Bearer {admin}"},
            )
            if response.status_code not in (201, 409):
                print(response.text)
                return 1
    stop = asyncio.Event()
    if args.duration:
        asyncio.get_running_loop().call_later(args.duration, stop.set)
    tokens = {d: minter.mint(sub=d, role="device", ttl_s=86400).token for d in ids}
    results = await asyncio.gather(
        *(_device(ws_url, d, tokens[d], args.interval, stop) for d in ids), return_exceptions=True
    )
    acked = sum(r for r in results if isinstance(r, int))
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"{len(ids)} devices, {acked} records acked, {len(failed)} failed")
    return 1 if failed else 0
