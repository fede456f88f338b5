"""A real fleetwire node on a free port, in a thread with its own uvloop, and real clients.

Tests talk to it only over sockets: httpx for REST and the `websockets` library for
WebSocket sessions. Every wait is bounded (`recv` takes a timeout).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvloop
from websockets.asyncio.client import ClientConnection, connect

from fleetwire.app import build_node_server, create_app
from fleetwire.auth.jwt import mint_token
from fleetwire.settings import Settings
from tests.clock import ManualClock

SECRET = "integration-test-secret-of-32-bytes!!"
TIMEOUT = 5.0


class Node:
    """One server process-equivalent: create_app + the one-port server, in a thread."""

    def __init__(self, tmp: Path, *, clock: ManualClock | None = None, **overrides: Any) -> None:
        values: dict[str, Any] = {
            "data_dir": tmp,
            "jwt_secret": SECRET,
            "port": 0,
            "log_level": "warning",
            **overrides,
        }
        self.settings = Settings(**values)
        self.clock = clock
        self.app = create_app(self.settings, clock=clock)
        self.port = 0
        self._started = threading.Event()
        self._server = build_node_server(self.app, port=0, on_started=self._on_started)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: list[Session] = []  # closed at teardown

    def _on_started(self, port: int) -> None:
        self.port = port
        self._started.set()

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self._server.serve()

        uvloop.run(main())

    def start(self) -> Node:
        self._thread.start()
        if not self._started.wait(15):
            raise RuntimeError("server did not start within 15 s")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop and return its result (for white-box checks)."""
        assert self.loop is not None
        done = threading.Event()
        box: list[Any] = []
        self.loop.call_soon_threadsafe(lambda: (box.append(fn()), done.set()))
        assert done.wait(TIMEOUT)
        return box[0]

    def advance(self, seconds: float) -> int:
        """Move the node's ManualClock forward on its loop; returns how many timers fired."""
        clock = self.clock
        assert clock is not None, "this node runs on the system clock"
        fired: int = self.call(lambda: clock.advance(seconds))
        return fired

    @property
    def mqtt_port(self) -> int:
        """The MQTT listener's port (the node was made with `mqtt_port=0`)."""
        port = self._server.mqtt_port
        assert port is not None, "this node has no MQTT listener (pass mqtt_port=0)"
        return port

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def token(
        self,
        sub: str,
        role: str,
        ttl_s: float = 3600,
        devices: list[str] | None = None,
        now: float | None = None,
    ) -> str:
        if now is None and self.clock is not None:
            now = self.clock.now_ms() / 1000  # the node judges `iat`/`exp` on its own clock
        token, _ = mint_token(secret=SECRET, sub=sub, role=role, ttl_s=ttl_s, devices=devices, now=now)
        return token

    def rest(
        self, role: str = "admin", sub: str = "tester", devices: list[str] | None = None
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"{self.http_url}/api/v1",
            headers={"Authorization": f"Bearer {self.token(sub, role, devices=devices)}"},
            timeout=TIMEOUT,
        )

    async def register(self, *device_ids: str, **fields: Any) -> None:
        async with self.rest() as client:
            for device_id in device_ids:
                response = await client.post("/devices", json={"id": device_id, **fields})
                assert response.status_code == 201, response.text

    async def device(self, device_id: str, **kwargs: Any) -> Session:
        token = kwargs.pop("token", None) or self.token(device_id, "device")
        session = await Session.open(f"{self.ws_url}/ws/device", token, **kwargs)
        self.sessions.append(session)
        return session

    async def client(
        self, role: str = "viewer", sub: str = "app", devices: list[str] | None = None, **kwargs: Any
    ) -> Session:
        token = kwargs.pop("token", None) or self.token(sub, role, devices=devices)
        session = await Session.open(f"{self.ws_url}/ws/client", token, **kwargs)
        self.sessions.append(session)
        return session

    async def close_sessions(self) -> None:
        for session in self.sessions:
            session.ws.transport.abort()
        for session in self.sessions:
            await asyncio.wait_for(session.ws.wait_closed(), TIMEOUT)
        self.sessions.clear()


class Session:
    """A WebSocket session with JSON helpers; `welcome` is read on open."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        self._next_id = 0
        self.pending: list[dict[str, Any]] = []  # messages read while looking for something else

    @classmethod
    async def open(cls, url: str, token: str, *, read_welcome: bool = True, **kwargs: Any) -> Session:
        ws = await asyncio.wait_for(
            connect(url, additional_headers={"Authorization": f"Bearer {token}"}, **kwargs), TIMEOUT
        )
        session = cls(ws)
        if read_welcome:
            session.welcome = await session.recv()
            assert session.welcome["type"] == "welcome", session.welcome
        return session

    async def send(self, message: dict[str, Any]) -> None:
        await asyncio.wait_for(self.ws.send(json.dumps(message)), TIMEOUT)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if self.pending:
            return self.pending.pop(0)
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        decoded: dict[str, Any] = json.loads(raw)
        return decoded

    async def request(self, message: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        """Send with a fresh id; return its reply, keeping other messages in `pending`."""
        self._next_id += 1
        request_id = f"r{self._next_id}"
        await self.send({**message, "id": request_id})
        kept: list[dict[str, Any]] = []
        try:
            while True:
                raw = await asyncio.wait_for(self.ws.recv(), timeout)
                message_in: dict[str, Any] = json.loads(raw)
                if message_in.get("id") == request_id and message_in["type"] in ("ack", "error"):
                    return message_in
                kept.append(message_in)
        finally:
            self.pending.extend(kept)

    async def next_of(self, kind: str, timeout: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        """The next message of a type (and matching fields), skipping and keeping others."""
        for index, message in enumerate(self.pending):
            if message.get("type") == kind and all(message.get(k) == v for k, v in match.items()):
                return self.pending.pop(index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), max(deadline - loop.time(), 0.001))
            message = json.loads(raw)
            if message.get("type") == kind and all(message.get(k) == v for k, v in match.items()):
                return message  # type: ignore[no-any-return]
            self.pending.append(message)

    async def event(self, name: str, timeout: float = TIMEOUT, **data: Any) -> dict[str, Any]:
        """The next event with this name whose data has these values."""
        for index, message in enumerate(self.pending):
            if _is_event(message, name, data):
                return self.pending.pop(index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), max(deadline - loop.time(), 0.001))
            message = json.loads(raw)
            if _is_event(message, name, data):
                return message  # type: ignore[no-any-return]
            self.pending.append(message)

    async def closed(self, timeout: float = TIMEOUT) -> tuple[int | None, str]:
        """Wait for the server to close; returns (code, reason)."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), timeout)
        except Exception:
            pass
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        rcvd = self.ws.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")

    async def close(self) -> None:
        await asyncio.wait_for(self.ws.close(), TIMEOUT)


def _is_event(message: dict[str, Any], name: str, data: dict[str, Any]) -> bool:
    if message.get("type") != "event" or message.get("event") != name:
        return False
    body = message.get("data") or {}
    return all(body.get(k) == v for k, v in data.items())
