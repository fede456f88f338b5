"""Helpers for the hardening tests: `fleetwire serve` subprocesses, a cuttable TCP proxy, a
private redis-server, raw handshakes and a pipelined telemetry sender. Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fleetwire.auth.jwt import mint_token
from tests.integration.harness import SECRET, TIMEOUT, Session
from tests.services import RedisServer, free_port, stop_process

__all__ = [
    "SECRET",
    "TIMEOUT",
    "RedisServer",
    "ServeProcess",
    "Session",
    "TcpProxy",
    "free_port",
    "handshake",
    "rest_status",
]


def token(sub: str, role: str, ttl_s: float = 3600, devices: list[str] | None = None) -> str:
    return mint_token(secret=SECRET, sub=sub, role=role, ttl_s=ttl_s, devices=devices)[0]


# ---------------------------------------------------------------------------------------------
# Handshakes and REST calls that report the status instead of raising


async def handshake(url: str, token: str | None = None, *, query: bool = False) -> int:
    """Open a WebSocket with the token in the header (or `access_token`); 101 if accepted (the
    welcome is read and the session closed), else the HTTP status of the refusal."""
    headers = {}
    if token is not None and query:
        url = f"{url}?access_token={token}"
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        ws = await asyncio.wait_for(connect(url, additional_headers=headers), TIMEOUT)
    except InvalidStatus as exc:
        return exc.response.status_code
    try:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert welcome["type"] == "welcome", welcome
    finally:
        await asyncio.wait_for(ws.close(), TIMEOUT)
    return 101


async def rest_status(base: str, token: str | None, path: str = "/api/v1/devices") -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        response = await http.get(path, headers=headers)
    if response.status_code == 401:
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["code"] == "unauthorized"
    return response.status_code


# ---------------------------------------------------------------------------------------------
# `python -m fleetwire serve` as a subprocess


class ServeProcess:
    """`python -m fleetwire serve` with its stdout and stderr captured in files."""

    def __init__(self, tmp: Path, name: str, *, data_dir: Path | None = None, **env: str) -> None:
        self.name = name
        self.port = free_port()
        self.stdout = tmp / f"{name}.stdout"
        self.stderr = tmp / f"{name}.stderr"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWIRE_")}
        full_env.update(
            {
                "FLEETWIRE_PORT": str(self.port),
                "FLEETWIRE_DATA_DIR": str(data_dir or tmp / name),
                "FLEETWIRE_JWT_SECRET": SECRET,
                "FLEETWIRE_NODE_ID": name,
                "FLEETWIRE_LOG_LEVEL": "warning",
                **env,
            }
        )
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fleetwire", "serve"], env=full_env, stdout=out, stderr=err
            )

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    async def ready(self, timeout: float = 30) -> ServeProcess:
        """Poll /readyz until 200 (a process start has no event to await)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient(timeout=1) as http:
            while loop.time() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.logs()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.http_url}/readyz")).status_code == 200:
                        return self
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready in {timeout} s: {self.logs()[-3000:]}")

    def rest(self, role: str = "admin", sub: str = "tester") -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"{self.http_url}/api/v1",
            headers={"Authorization": f"Bearer {token(sub, role)}"},
            timeout=TIMEOUT,
        )

    async def device(self, device_id: str) -> Session:
        return await Session.open(f"{self.ws_url}/ws/device", token(device_id, "device"))

    async def client(self, role: str = "viewer") -> Session:
        return await Session.open(f"{self.ws_url}/ws/client", token("app", role))

    async def wait_exit(self, timeout: float = 30) -> int:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(None, self.process.wait), timeout)

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def stop(self) -> None:
        stop_process(self.process)


# ---------------------------------------------------------------------------------------------
# A TCP proxy that can be cut and restored (database outages)


class TcpProxy:
    """127.0.0.1:<port> → target, in its own thread and loop. `cut()` drops every connection
    and stops listening (new connections are refused); `restore()` listens again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(TIMEOUT)

    def start(self) -> TcpProxy:
        self._run(self._listen())
        return self

    restore = start

    def cut(self) -> None:
        self._run(self._cut())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT)
        self._loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        pair = {writer.transport, up_writer.transport}
        self._transports |= pair

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._transports -= pair


# ---------------------------------------------------------------------------------------------
# A private redis-server (broker outages)


# ---------------------------------------------------------------------------------------------
# Pipelined telemetry over one device session, recording what was acked and what refused


@dataclass
class Ingest:
    """Sends `{"n": value}` telemetry (every `bad_every`-th record also carries an invalid key,
    so it is refused) with up to `window` requests in flight; records acks and errors by value."""

    session: Session
    values: range
    window: int = 16
    bad_every: int = 7
    acked: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)
    sent: set[int] = field(default_factory=set)
    close_code: int | None = None
    close_reason: str = ""
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def is_bad(self, value: int) -> bool:
        return value % self.bad_every == 0

    async def run(self) -> None:
        """Until every value got its reply or the connection ended (the caller bounds it)."""
        ws = self.session.ws
        in_flight = asyncio.Semaphore(self.window)
        total = len(self.values)

        async def reader() -> None:
            while len(self.acked) + len(self.refused) < total:
                message = json.loads(await ws.recv())
                if message.get("type") not in ("ack", "error") or message.get("id") is None:
                    continue
                value = int(message["id"])
                (self.acked if message["type"] == "ack" else self.refused).add(value)
                self.progress.set()
                in_flight.release()

        read_task = asyncio.create_task(reader())
        try:
            for value in self.values:
                acquire = asyncio.ensure_future(in_flight.acquire())
                await asyncio.wait({acquire, read_task}, return_when=asyncio.FIRST_COMPLETED)
                if read_task.done():
                    acquire.cancel()
                    break
                data: dict[str, Any] = {"n": value}
                if self.is_bad(value):
                    data["bad key!"] = 1
                self.sent.add(value)
                await ws.send(json.dumps({"type": "telemetry", "id": value, "data": data}))
            await read_task
        except ConnectionClosed:
            pass
        finally:
            read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await read_task
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
            rcvd = ws.protocol.close_rcvd
            if rcvd is not None:
                self.close_code, self.close_reason = rcvd.code, rcvd.reason


async def stored_values(rest: httpx.AsyncClient, device_id: str, key: str = "n") -> list[int]:
    """Every stored value of one telemetry key (REST, paged), oldest first, duplicates kept."""
    values: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"key": key, "limit": 10_000}
        if cursor is not None:
            params["cursor"] = cursor
        response = await rest.get(f"/devices/{device_id}/telemetry", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        values.extend(int(item["value"]) for item in body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return sorted(values)
