"""`fleetwire bench jobs`: executions per second of one fleet job on one node.

    uv run fleetwire bench jobs                          # 10,000 devices, SQLite
    uv run fleetwire bench jobs --devices 2000 --max-concurrent 200
    uv run fleetwire bench jobs --url postgresql://postgres@127.0.0.1:5432/bench_jobs

A real `fleetwire serve` process (its own data directory, or the given database, which
should be empty); this process registers the devices over REST, connects every one of them
over WebSocket (they answer each command at once), creates ONE job targeting all of them
and reports executions per second from `POST /jobs` until the job is final, plus the
latency of the first execution. The client side shares the machine: on a loaded or shared
host the figure is a lower bound of what the node does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fleetwire.auth.jwt import mint_token

SECRET = "bench-jobs-secret-of-at-least-32-bytes"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _token(sub: str, role: str) -> str:
    return mint_token(secret=SECRET, sub=sub, role=role, ttl_s=3600)[0]


async def _ready(http: httpx.AsyncClient, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            if (await http.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("the server was not ready within 60 s")


async def _device(url: str, device_id: str, answered: list[int]) -> ClientConnection:
    ws = await connect(
        f"{url}/ws/device",
        additional_headers={"Authorization": f"Bearer {_token(device_id, 'device')}"},
        compression=None,
        max_queue=4,
    )
    await ws.recv()  # welcome

    async def answer() -> None:
        with contextlib.suppress(ConnectionClosed):  # the benchmark's end aborts every socket
            await _answer_all()

    async def _answer_all() -> None:
        async for raw in ws:
            message = json.loads(raw)
            if message.get("type") == "command":
                reply = {"type": "command_result", "command_id": message["command_id"], "ok": True}
                await ws.send(json.dumps(reply))
                answered.append(1)

    asyncio.get_running_loop().create_task(answer())
    return ws


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = _free_port()
    data = Path(tempfile.mkdtemp(prefix="fleetwire-bench-jobs-"))
    env = {
        **os.environ,
        "FLEETWIRE_PORT": str(port),
        "FLEETWIRE_DATA_DIR": str(data),
        "FLEETWIRE_JWT_SECRET": SECRET,
        "FLEETWIRE_LOG_LEVEL": "warning",
        "FLEETWIRE_RATE_LIMIT": "1000000/s",
    }
    if args.url:
        env["FLEETWIRE_DATABASE_URL"] = args.url
    log = (data / "server.log").open("wb")
    # Started once, before any await of the measurement: a blocking start is harmless here.
    process = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "fleetwire", "serve"], env=env, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    ids = [f"bench-{i:05d}" for i in range(args.devices)]
    headers = {"Authorization": f"Bearer {_token('bench', 'admin')}"}
    try:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
            await _ready(http, process)
            queue = list(ids)

            async def register() -> None:
                while queue:
                    device_id = queue.pop()
                    response = await http.post("/api/v1/devices", json={"id": device_id, "tags": ["bench"]})
                    response.raise_for_status()

            await asyncio.gather(*(register() for _ in range(32)))
            answered: list[int] = []
            sockets: list[ClientConnection] = []
            for start in range(0, len(ids), 200):
                sockets += await asyncio.gather(
                    *(_device(f"ws://127.0.0.1:{port}", d, answered) for d in ids[start : start + 200])
                )
            body: dict[str, Any] = {
                "command": {"name": "bench", "timeout_s": 600},
                "target": {"tags": ["bench"]},
            }
            if args.max_concurrent:
                body["rollout"] = {"max_concurrent": args.max_concurrent}
            started = time.monotonic()
            created = await http.post("/api/v1/jobs", json=body)
            created.raise_for_status()
            job_id = created.json()["job_id"]
            created_s = time.monotonic() - started
            first_s = None
            while True:
                if first_s is None and answered:
                    first_s = time.monotonic() - started
                job = (await http.get(f"/api/v1/jobs/{job_id}")).json()
                if job["state"] not in ("running", "paused"):
                    break
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
            for ws in sockets:
                ws.transport.abort()
        return {
            "devices": args.devices,
            "max_concurrent": args.max_concurrent,
            "database": args.url or "sqlite (data dir)",
            "state": job["state"],
            "counts": job["counts"],
            "create_s": round(created_s, 3),
            "first_answer_s": None if first_s is None else round(first_s, 3),
            "elapsed_s": round(elapsed, 3),
            "executions_per_s": round(job["counts"]["succeeded"] / elapsed, 1),
        }
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetwire bench jobs", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--max-concurrent", type=int, default=None, help="the job's rollout limit (none)")
    parser.add_argument("--url", default=None, help="FLEETWIRE_DATABASE_URL (default: SQLite)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    from benchmarks.sysinfo import raise_nofile

    raise_nofile()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    return 0 if result["state"] in ("succeeded", "completed") else 1


if __name__ == "__main__":
    raise SystemExit(main())
