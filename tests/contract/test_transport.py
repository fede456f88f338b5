"""The transport contract (fleetwire.transport.base): one suite every adapter must pass.

Parametrized over the adapters (`ADAPTERS`; today picows). Every test runs the real one-port
server (`transport.server.build_server`: uvicorn, httptools, the adapter's `ws` protocol) on port
0 in the test's uvloop event loop, with a trivial WebSocketApp (echo; `?deny=` refusals) and real
clients: the `websockets` library, httpx, and raw asyncio sockets for malformed handshakes and
frames. The `serve()` helper checks on exit that every accepted connection's Handler got
`on_closed` exactly once, and that no Handler that was never opened got it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import pytest
import uvloop
from fastapi import FastAPI
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from fleetwire.transport.base import (
    Refusal,
    Socket,
    TransportAdapter,
    TransportLimits,
    UpgradeRequest,
    text_frame,
)
from fleetwire.transport.picows import PicowsTransport
from fleetwire.transport.server import FleetwireServer, build_server

pytestmark = pytest.mark.anyio

LIMIT = 4096
LIMITS = TransportLimits(max_message_bytes=LIMIT, send_queue=50, handshake_timeout_s=0.3, close_grace_s=1.0)
T = 5.0  # bound on every await


ADAPTERS: list[TransportAdapter] = [PicowsTransport()]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"loop_factory": uvloop.new_event_loop})


# ---------------------------------------------------------------------------------------------
# The test WebSocketApp


class RecHandler:
    """Echoes text; a few text commands drive the Socket; records everything."""

    def __init__(self, request: UpgradeRequest) -> None:
        self.request = request
        self.socket: Socket | None = None
        self.messages: list[tuple[bytes, bool]] = []
        self.pongs = 0
        self.closed_codes: list[int | None] = []
        self.closed = asyncio.Event()
        self.opened = asyncio.Event()
        self.max_queued = 0
        self.max_write_buffer = 0

    def on_open(self, socket: Socket) -> None:
        self.socket = socket
        self.opened.set()
        if self.request.path == "/flood":
            asyncio.get_running_loop().create_task(self._flood())

    def on_message(self, payload: bytes, is_text: bool) -> None:
        assert self.socket is not None
        self.messages.append((payload, is_text))
        if not is_text:
            self.socket.send(b"binary:%d" % len(payload))
        elif payload.startswith(b"close:"):
            self.socket.close(int(payload[6:]), "forbidden")
        elif payload.startswith(b"frame:"):
            self.socket.send_frame(text_frame(b"y" * int(payload[6:])))
        elif payload.startswith(b"frames:"):
            sizes = [int(n) for n in payload[7:].split(b",")]
            self.socket.send_frames([text_frame(b"%d:" % i + b"z" * n) for i, n in enumerate(sizes)])
        elif payload == b"ping":
            self.socket.ping()
        elif payload == b"boom":
            raise RuntimeError("handler bug")
        else:
            self.socket.send(payload)

    def on_pong(self) -> None:
        self.pongs += 1
        assert self.socket is not None
        self.socket.send(b"ponged")

    def on_closed(self, code: int | None) -> None:
        self.closed_codes.append(code)
        self.closed.set()

    async def _flood(self) -> None:
        """Send 16 KiB messages as fast as possible until the transport gives up on the peer."""
        sock: Any = self.socket
        chunk = b"z" * 16384
        while not sock.closed:
            for _ in range(64):
                sock.send(chunk)
                # Introspection each adapter's socket offers for this test (not in the seam).
                self.max_queued = max(self.max_queued, sock.queued)
                if not sock.closed:
                    self.max_write_buffer = max(self.max_write_buffer, sock.write_buffer_size)
            await asyncio.sleep(0)


class RecApp:
    """Accepts any path; `?deny=<status>` refuses; `/hang` never answers; `/slow` waits for
    `release`; `/crash` raises. `decide_now` (the optional synchronous decision) answers
    `?now=` (accept) and `?now=<status>` (refuse) itself; `?now=wait` and the rest it leaves
    to `__call__`."""

    def __init__(self) -> None:
        self.handlers: list[RecHandler] = []
        self.requests: list[UpgradeRequest] = []
        self.decided_now: list[UpgradeRequest] = []
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.requested = asyncio.Event()

    def decide_now(self, request: UpgradeRequest) -> RecHandler | Refusal | None:
        now = request.query.get("now")
        if now is None or now == "wait":
            return None
        self.decided_now.append(request)
        if now:
            return Refusal(int(now), "forbidden", "refused at once")
        handler = RecHandler(request)
        self.handlers.append(handler)
        return handler

    async def __call__(self, request: UpgradeRequest) -> RecHandler | Refusal:
        self.requests.append(request)
        self.requested.set()
        if "deny" in request.query:
            status = int(request.query["deny"])
            code = {401: "unauthorized", 403: "forbidden", 503: "unavailable"}[status]
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
            return Refusal(status, code, f"refused with {status}", headers)
        try:
            if request.path == "/hang":
                await asyncio.Event().wait()
            if request.path == "/slow":
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if request.path == "/crash":
            raise RuntimeError("app bug")
        handler = RecHandler(request)
        self.handlers.append(handler)
        return handler


def rest_app() -> FastAPI:
    api = FastAPI()

    @api.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @api.post("/items")
    async def items(body: dict[str, Any]) -> dict[str, Any]:
        return {"received": body}

    return api


@dataclass
class Running:
    server: FleetwireServer
    port: int
    app: RecApp
    task: asyncio.Task[None] = field(repr=False)

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@contextlib.asynccontextmanager
async def running(
    adapter: TransportAdapter,
    limits: TransportLimits = LIMITS,
    log_level: str = "warning",
    access_log: bool = False,
) -> AsyncIterator[Running]:
    app = RecApp()
    loop = asyncio.get_running_loop()
    started: asyncio.Future[int] = loop.create_future()
    server = build_server(
        rest_app(),
        app,
        port=0,
        limits=limits,
        log_level=log_level,
        access_log=access_log,
        on_started=started.set_result,
        timeout_graceful_shutdown=T,
        adapter=adapter,
    )
    task = loop.create_task(server.serve())
    try:
        port = await asyncio.wait_for(started, T)
        yield Running(server, port, app, task)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, T * 2)
    for handler in app.handlers:
        if handler.opened.is_set():
            assert len(handler.closed_codes) == 1, handler.closed_codes
        else:
            assert handler.closed_codes == []


class Serve(Protocol):
    def __call__(
        self, limits: TransportLimits = ..., log_level: str = ..., access_log: bool = ...
    ) -> contextlib.AbstractAsyncContextManager[Running]: ...


@pytest.fixture(params=ADAPTERS, ids=lambda adapter: adapter.name)
def serve(request: pytest.FixtureRequest) -> Serve:
    """`async with serve() as srv`: the real server on the adapter under test."""
    return functools.partial(running, request.param)


# ---------------------------------------------------------------------------------------------
# Raw client


def handshake(path: str = "/echo", *, extra: str = "", **overrides: str | None) -> bytes:
    headers: dict[str, str | None] = {
        "Host": "localhost",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }
    headers.update({k.replace("_", "-"): v for k, v in overrides.items()})
    lines = [f"GET {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items() if v is not None)]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, rcvbuf: int | None = None) -> Raw:
        if rcvbuf is None:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), T)
            return cls(reader, writer)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), T)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        return cls(reader, writer)

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), T)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = b""
        if "content-length" in headers:
            body = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])), T)
        return status, headers, body

    async def upgrade(self, path: str = "/echo") -> None:
        self.writer.write(handshake(path))
        status, _, _ = await self.response()
        assert status == 101

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), T)
        assert not b1 & 0x80, "server frames are never masked"
        size = b1 & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await asyncio.wait_for(self.reader.readexactly(2), T))
        elif size == 127:
            (size,) = struct.unpack("!Q", await asyncio.wait_for(self.reader.readexactly(8), T))
        payload = await asyncio.wait_for(self.reader.readexactly(size), T)
        return bool(b0 & 0x80), b0 & 0x0F, payload

    async def close_frame(self) -> tuple[int, str]:
        """Skip data frames up to the server's close frame; then the server drops TCP."""
        while True:
            _, opcode, payload = await self.frame()
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0]
                assert await asyncio.wait_for(self.reader.read(), T) == b""
                return code, payload[2:].decode()

    async def __aenter__(self) -> Raw:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), T)


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """A client frame (masked unless told otherwise); `length` overrides the header only."""
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask_bit = 0x80 if mask else 0
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


# ---------------------------------------------------------------------------------------------
# REST and WebSocket on one port


async def test_rest_get_and_post_on_the_websocket_port(serve: Serve) -> None:
    """FastAPI answers GET and POST on the same port that serves WebSockets."""
    async with (
        serve() as srv,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}", timeout=T) as http,
    ):
        response = await http.get("/hello")
        assert response.status_code == 200
        assert response.json() == {"hello": "world"}
        response = await http.post("/items", json={"a": 1})
        assert response.json() == {"received": {"a": 1}}
        async with connect(srv.url("/echo"), open_timeout=T) as ws:
            await ws.send("together")
            assert await asyncio.wait_for(ws.recv(), T) == "together"
        assert (await http.get("/missing")).status_code == 404


async def test_http_request_then_upgrade_on_one_keepalive_connection(serve: Serve) -> None:
    """A keep-alive connection can serve a GET and then upgrade to WebSocket."""
    async with serve() as srv, await Raw.open(srv.port) as raw:
        raw.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await raw.response()
        assert (status, json.loads(body)) == (200, {"hello": "world"})
        await raw.upgrade("/echo")
        raw.send(frame(TEXT, b"after http"))
        assert await raw.frame() == (True, TEXT, b"after http")
        raw.send(frame(CLOSE, struct.pack("!H", 1000)))
        assert await raw.close_frame() == (1000, "normal")


async def test_accept_echo_and_peer_close(serve: Serve) -> None:
    """An accepted connection echoes text; a peer close is answered 1000 `normal` and the
    Handler sees on_closed(1000) once; the request carries path, query, headers and peer."""
    async with serve() as srv:
        async with connect(srv.url("/echo?a=1&a=2&b="), open_timeout=T, origin=Origin("http://x")) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), T) == "hello"
            await ws.send("h\u00e9llo \u2603")
            assert await asyncio.wait_for(ws.recv(), T) == "h\u00e9llo \u2603"
        assert ws.close_code == 1000
        assert ws.close_reason == "normal"
        handler = srv.app.handlers[0]
        await asyncio.wait_for(handler.closed.wait(), T)
        assert handler.closed_codes == [1000]
        request = handler.request
        assert request.path == "/echo"
        assert request.query == {"a": "1", "b": ""}
        assert request.headers["origin"] == "http://x"
        assert request.peer is not None
        assert request.peer.startswith("127.0.0.1:")


async def test_a_decision_taken_at_once_is_answered_like_an_awaited_one(serve: Serve) -> None:
    """The app's `decide_now` accepts (101, then frames flow) or refuses (the JSON HTTP
    answer) without the app being awaited; None from it falls back to awaiting the app."""
    async with serve() as srv:
        async with connect(srv.url("/echo?now="), open_timeout=T) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), T) == "hello"
        with pytest.raises(InvalidStatus) as caught:
            await connect(srv.url("/echo?now=403"), open_timeout=T)
        assert caught.value.response.status_code == 403
        assert json.loads(bytes(caught.value.response.body))["message"] == "refused at once"
        assert ([r.query["now"] for r in srv.app.decided_now], srv.app.requests) == (["", "403"], [])
        async with connect(srv.url("/echo?now=wait"), open_timeout=T) as ws:
            await ws.send("awaited")
            assert await asyncio.wait_for(ws.recv(), T) == "awaited"
        assert [r.query["now"] for r in srv.app.requests] == ["wait"]


async def test_server_close_with_code(serve: Serve) -> None:
    """Socket.close(4003, ...) reaches the client and the Handler sees on_closed(4003)."""
    async with serve() as srv, connect(srv.url("/echo"), open_timeout=T) as ws:
        await ws.send("close:4003")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), T)
        assert (ws.close_code, ws.close_reason) == (4003, "forbidden")
        handler = srv.app.handlers[0]
        await asyncio.wait_for(handler.closed.wait(), T)
        assert handler.closed_codes == [4003]


async def test_ping_pong_both_ways(serve: Serve) -> None:
    """Socket.ping() gets the client's pong to Handler.on_pong; a client ping gets a pong."""
    async with serve() as srv, connect(srv.url("/echo"), open_timeout=T) as ws:
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), T) == "ponged"
        pong = await ws.ping(b"abc")
        await asyncio.wait_for(pong, T)
        assert srv.app.handlers[0].pongs == 1


# ---------------------------------------------------------------------------------------------
# Handshake refusals


@pytest.mark.parametrize("status", [401, 403, 503])
async def test_app_refusals_are_json_http_responses(serve: Serve, status: int) -> None:
    """A Refusal is an HTTP response (JSON body, its headers, Connection: close) before any
    upgrade; no Handler is created."""
    async with serve() as srv:
        with pytest.raises(InvalidStatus) as caught:
            await connect(srv.url(f"/echo?deny={status}"), open_timeout=T)
        response = caught.value.response
        assert response.status_code == status
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["Connection"] == "close"
        body = json.loads(bytes(response.body))
        assert body["error"] in {"unauthorized", "forbidden", "unavailable"}
        assert body["message"] == f"refused with {status}"
        if status == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"
        assert srv.app.handlers == []


async def test_firefox_connection_header_is_accepted(serve: Serve) -> None:
    """Firefox sends `Connection: keep-alive, Upgrade`: still a 101."""
    async with serve() as srv, await Raw.open(srv.port) as raw:
        raw.send(handshake("/echo", Connection="keep-alive, Upgrade"))
        status, headers, _ = await raw.response()
        assert status == 101
        assert headers["upgrade"].lower() == "websocket"
        raw.send(frame(TEXT, b"firefox"))
        assert await raw.frame() == (True, TEXT, b"firefox")


@pytest.mark.parametrize(
    ("request_bytes", "status", "error"),
    [
        (handshake(Sec_WebSocket_Version="8"), 426, "upgrade_required"),
        (handshake(Sec_WebSocket_Version=None), 426, "upgrade_required"),
        (handshake(Sec_WebSocket_Key=None), 400, "bad_request"),
        (handshake(Sec_WebSocket_Key="c2hvcnQ="), 400, "bad_request"),
        (handshake(extra=f"X-Big: {'a' * 20000}\r\n"), 431, "headers_too_large"),
    ],
    ids=["version-8", "no-version", "no-key", "short-key", "huge-head"],
)
async def test_invalid_upgrades_are_refused(
    serve: Serve, request_bytes: bytes, status: int, error: str
) -> None:
    """Transport-level refusals: wrong version 426 (+ Sec-WebSocket-Version: 13), bad or
    missing key 400, oversized head 431; JSON bodies; the app is never asked."""
    async with serve() as srv:
        async with await Raw.open(srv.port) as raw:
            raw.send(request_bytes)
            got, headers, body = await raw.response()
            assert got == status
            assert json.loads(body)["error"] == error
            assert headers["content-type"] == "application/json"
            if status == 426:
                assert headers["sec-websocket-version"] == "13"
            assert await asyncio.wait_for(raw.reader.read(), T) == b""
        assert srv.app.requests == []


async def test_app_exception_is_a_500(serve: Serve) -> None:
    """A WebSocketApp that raises gives a JSON 500, not a hung connection."""
    async with serve() as srv:
        with pytest.raises(InvalidStatus) as caught:
            await connect(srv.url("/crash"), open_timeout=T)
        assert caught.value.response.status_code == 500
        assert json.loads(bytes(caught.value.response.body))["error"] == "internal"


async def test_handshake_timeout(serve: Serve) -> None:
    """An app that never answers: 503 `handshake_timeout` after handshake_timeout_s, and the
    app's coroutine is cancelled."""
    async with serve() as srv, await Raw.open(srv.port) as raw:
        started = asyncio.get_running_loop().time()
        raw.send(handshake("/hang"))
        status, _, body = await raw.response()
        elapsed = asyncio.get_running_loop().time() - started
        assert status == 503
        assert json.loads(body)["error"] == "handshake_timeout"
        assert LIMITS.handshake_timeout_s - 0.05 <= elapsed < LIMITS.handshake_timeout_s + 2
        await asyncio.wait_for(srv.app.cancelled.wait(), T)


@pytest.mark.parametrize(
    "partial", [b"", b"GET /echo HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half-a-head"]
)
async def test_incomplete_request_head_is_cut_after_the_handshake_timeout(
    serve: Serve, partial: bytes
) -> None:
    """A peer that never completes its request head (slowloris) is disconnected once
    handshake_timeout_s has passed since it connected; no app call, no Handler."""
    async with serve() as srv, await Raw.open(srv.port) as raw:
        started = asyncio.get_running_loop().time()
        raw.send(partial)
        assert await asyncio.wait_for(raw.reader.read(), T) == b""
        elapsed = asyncio.get_running_loop().time() - started
        assert LIMITS.handshake_timeout_s - 0.05 <= elapsed < LIMITS.handshake_timeout_s + 2
        assert srv.app.requests == []


async def test_peer_leaving_during_handshake_cancels_the_app(serve: Serve) -> None:
    """The peer disconnects while the app decides: the app call is cancelled; no Handler."""
    async with serve() as srv, await Raw.open(srv.port) as raw:
        raw.send(handshake("/slow"))
        await raw.writer.drain()
        await asyncio.wait_for(srv.app.requested.wait(), T)
        raw.writer.transport.abort()
        await asyncio.wait_for(srv.app.cancelled.wait(), T)
        assert srv.app.handlers == []


# ---------------------------------------------------------------------------------------------
# Frames


async def test_message_over_limit_is_1009(serve: Serve) -> None:
    """One frame over max_message_bytes: close 1009 `message_too_big`."""
    async with serve() as srv, connect(srv.url("/echo"), open_timeout=T) as ws:
        await ws.send("x" * (LIMIT + 1))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), T)
        assert (ws.close_code, ws.close_reason) == (1009, "message_too_big")
        handler = srv.app.handlers[0]
        await asyncio.wait_for(handler.closed.wait(), T)
        assert handler.closed_codes == [1009]
        assert handler.messages == []


async def test_message_at_the_limit_passes(serve: Serve) -> None:
    """A message of exactly max_message_bytes is delivered."""
    async with serve() as srv, connect(srv.url("/echo"), open_timeout=T) as ws:
        await ws.send("x" * LIMIT)
        assert await asyncio.wait_for(ws.recv(), T) == "x" * LIMIT


async def test_fragmented_message_is_reassembled(serve: Serve) -> None:
    """Continuation frames (with a ping in between) are delivered as one message."""
    async with serve() as srv:
        async with connect(srv.url("/echo"), open_timeout=T) as ws:
            await ws.send(["frag", "men", "ted"])
            assert await asyncio.wait_for(ws.recv(), T) == "fragmented"
        async with await Raw.open(srv.port) as raw:
            await raw.upgrade()
            raw.send(frame(TEXT, b"a" * 2000, fin=False) + frame(PING, b"p") + frame(CONT, b"b" * 2000))
            assert await raw.frame() == (True, PONG, b"p")
            assert await raw.frame() == (True, TEXT, b"a" * 2000 + b"b" * 2000)
            raw.send(frame(BINARY, b"\x00" * 10, fin=False) + frame(CONT, b"\x01" * 10))
            assert await raw.frame() == (True, TEXT, b"binary:20")


async def test_many_tiny_continuations_over_limit_are_1009(serve: Serve) -> None:
    """A fragmented message growing past max_message_bytes is cut at 1009."""
    async with serve() as srv:
        async with await Raw.open(srv.port) as raw:
            await raw.upgrade()
            raw.send(
                frame(TEXT, b"a", fin=False) + b"".join(frame(CONT, b"b" * 10, fin=False) for _ in range(500))
            )
            assert await raw.close_frame() == (1009, "message_too_big")
        handler = srv.app.handlers[0]
        await asyncio.wait_for(handler.closed.wait(), T)
        assert handler.closed_codes == [1009]
        assert handler.messages == []


async def keep_sending(raw: Raw, chunk: bytes, stop: asyncio.Event) -> int:
    """Write `chunk` again and again until `stop` (or the server resets us): a peer that does
    not look at what it receives. Returns how many chunks it wrote."""
    sent = 0
    # A reset (ConnectionError) or our transport closed under us (RuntimeError from uvloop)
    # ends the sender; whether the close frame arrived is the test's question.
    with contextlib.suppress(ConnectionError, RuntimeError):
        while not stop.is_set():
            raw.send(chunk)
            sent += 1
            await asyncio.wait_for(raw.writer.drain(), T)
    return sent


@pytest.mark.parametrize("oversized", ["continuations", "one-frame"])
async def test_1009_reaches_a_peer_that_keeps_sending(serve: Serve, oversized: str) -> None:
    """A message over the limit while the peer keeps sending (many small continuation frames,
    or the payload of one oversized frame): the peer still reads the close frame 1009
    `message_too_big` and then EOF — the server drains input instead of closing TCP with
    unread data, which would make the kernel reset the connection (RFC 6455 §7.1.1)."""
    async with serve() as srv, await Raw.open(srv.port) as raw:
        await raw.upgrade()
        if oversized == "continuations":
            raw.send(frame(TEXT, b"a", fin=False))
            chunk = b"".join(frame(CONT, b"b" * 10, fin=False) for _ in range(50))
        else:
            raw.send(frame(TEXT, length=LIMIT * 1000)[:-4] + b"\0\0\0\0")  # header, zero mask
            chunk = b"c" * 4096
        stop = asyncio.Event()
        sender = asyncio.get_running_loop().create_task(keep_sending(raw, chunk, stop))
        try:
            assert await raw.close_frame() == (1009, "message_too_big")
        finally:
            stop.set()
            sent = await asyncio.wait_for(sender, T)
        assert sent > 0
        handler = srv.app.handlers[0]
        raw.writer.transport.abort()
        await asyncio.wait_for(handler.closed.wait(), T)
        assert handler.closed_codes == [1009]
        assert handler.messages == []


async def test_our_close_waits_for_the_peer_close(serve: Serve) -> None:
    """After Socket.close() the server shuts its write side (EOF after the close frame) but
    reads on: frames the peer sends meanwhile are discarded, its close frame ends the
    connection; on_closed reports our code."""
    async with serve() as srv, await Raw.open(srv.port) as raw:
        await raw.upgrade()
        raw.send(frame(TEXT, b"close:4003"))
        _, opcode, payload = await raw.frame()
        assert (opcode, payload) == (CLOSE, struct.pack("!H", 4003) + b"forbidden")
        assert await asyncio.wait_for(raw.reader.read(), T) == b""  # FIN right after it
        handler = srv.app.handlers[0]
        raw.send(frame(TEXT, b"ignored") + frame(CLOSE, struct.pack("!H", 4003)))
        await asyncio.wait_for(handler.closed.wait(), T)
        assert handler.closed_codes == [4003]
        assert handler.messages == [(b"close:4003", True)]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(TEXT, length=2**63 - 1), 1009),  # largest valid length: over the limit
        (frame(TEXT, length=2**63), 1002),  # MSB set: RFC 6455 §5.2 violation (picows)
        (frame(TEXT, length=LIMIT + 1), 1009),  # header alone decides: no payload sent
        (frame(TEXT, b"hi", mask=False), 1002),
        (frame(TEXT, b"hi", rsv=4), 1002),
        (frame(TEXT, b"hi", rsv=2), 1002),
        (frame(TEXT, b"hi", rsv=1), 1002),
        (frame(PING, b"hi", rsv=4), 1002),
        (frame(0x3, b"hi"), 1002),
        (frame(0xB, b"hi"), 1002),
        (frame(PING, b"p" * 126), 1002),
        (frame(PING, b"p", fin=False), 1002),
        (frame(CONT, b"orphan"), 1002),
        (frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"), 1002),
        (frame(TEXT, b"a", fin=False) + frame(BINARY, b"b"), 1002),
        (frame(CLOSE, b"\x03"), 1002),
        (frame(CLOSE, struct.pack("!H", 999)), 1002),
        (frame(CLOSE, struct.pack("!H", 1005)), 1002),
        (frame(CLOSE, struct.pack("!H", 1006)), 1002),
        (frame(CLOSE, struct.pack("!H", 5000)), 1002),
        (frame(TEXT, b"\xff\xfe"), 1007),
        (frame(TEXT, "caf\u00e9".encode()[:-1]), 1007),
        (frame(TEXT, b"ok\xc3", fin=False) + frame(CONT, b"\x28"), 1007),
        (frame(CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
    ],
    ids=[
        "len-2^63-1",
        "len-2^63",
        "len-over-limit",
        "unmasked",
        "rsv1",
        "rsv2",
        "rsv3",
        "rsv-on-ping",
        "opcode-3",
        "opcode-B",
        "ping-126",
        "fragmented-ping",
        "orphan-continuation",
        "text-inside-fragment",
        "binary-inside-fragment",
        "close-1-byte",
        "close-999",
        "close-1005",
        "close-1006",
        "close-5000",
        "utf8-invalid",
        "utf8-truncated",
        "utf8-across-fragments",
        "close-reason-utf8",
    ],
)
async def test_frame_violations_close_with_the_right_code(serve: Serve, data: bytes, code: int) -> None:
    """Malformed frames: 1009 over the limit, 1002 protocol violations, 1007 invalid UTF-8;
    nothing is delivered and on_closed(code) runs once."""
    async with serve() as srv:
        async with await Raw.open(srv.port) as raw:
            await raw.upgrade()
            raw.send(data)
            got, reason = await raw.close_frame()
            assert got == code
            if code == 1009:
                assert reason == "message_too_big"
        handler = srv.app.handlers[0]
        await asyncio.wait_for(handler.closed.wait(), T)
        assert handler.closed_codes == [code]
        assert handler.messages == []


async def test_peer_close_codes_reported(serve: Serve) -> None:
    """A peer-initiated close reports our answer, 1000, whatever code the peer chose (here 4000,
    and none at all): the server's own code is what decides a session's end reason."""
    async with serve() as srv:
        for payload, expected in ((struct.pack("!H", 4000) + b"bye", 1000), (b"", 1000)):
            async with await Raw.open(srv.port) as raw:
                await raw.upgrade()
                raw.send(frame(CLOSE, payload))
                assert await raw.close_frame() == (1000, "normal")
            handler = srv.app.handlers[-1]
            await asyncio.wait_for(handler.closed.wait(), T)
            assert handler.closed_codes == [expected]


async def test_binary_is_delivered_as_not_text(serve: Serve) -> None:
    """Binary messages reach the Handler with is_text=False."""
    async with serve() as srv, connect(srv.url("/echo"), open_timeout=T) as ws:
        await ws.send(b"\x00\x01\x02")
        assert await asyncio.wait_for(ws.recv(), T) == "binary:3"
        assert srv.app.handlers[0].messages == [(b"\x00\x01\x02", False)]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200000])
async def test_send_frame_reaches_client_intact(serve: Serve, size: int) -> None:
    """Socket.send_frame(text_frame(...)) writes a frame the client parses byte for byte."""
    async with serve() as srv, connect(srv.url("/echo"), open_timeout=T) as ws:
        await ws.send(f"frame:{size}")
        assert await asyncio.wait_for(ws.recv(), T) == "y" * size


async def test_send_frames_arrive_as_separate_messages_in_order(serve: Serve) -> None:
    """Socket.send_frames (one write for several framed messages) delivers each message
    intact, in order."""
    sizes = [0, 125, 126, 70000, 3]
    async with serve() as srv, connect(srv.url("/echo"), open_timeout=T) as ws:
        await ws.send("frames:" + ",".join(map(str, sizes)))
        received = [await asyncio.wait_for(ws.recv(), T) for _ in sizes]
    assert received == [f"{i}:" + "z" * n for i, n in enumerate(sizes)]


async def test_handler_exception_closes_1011(serve: Serve) -> None:
    """A Handler that raises in on_message: close 1011 `internal_error`, on_closed(1011)."""
    async with serve() as srv, connect(srv.url("/echo"), open_timeout=T) as ws:
        await ws.send("boom")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), T)
        assert (ws.close_code, ws.close_reason) == (1011, "internal_error")
        await asyncio.wait_for(srv.app.handlers[0].closed.wait(), T)
        assert srv.app.handlers[0].closed_codes == [1011]


async def test_tcp_drop_reports_none(serve: Serve) -> None:
    """A peer that vanishes without a close frame: on_closed(None), once."""
    async with serve() as srv, await Raw.open(srv.port) as raw:
        await raw.upgrade()
        raw.writer.transport.abort()
        handler = srv.app.handlers[0]
        await asyncio.wait_for(handler.closed.wait(), T)
        assert handler.closed_codes == [None]


# ---------------------------------------------------------------------------------------------
# Back-pressure and shutdown


async def test_slow_consumer_is_closed_4008_with_bounded_memory(serve: Serve) -> None:
    """A peer that never reads while the server floods it: the held queue never exceeds
    send_queue, the transport buffer stays near its high-water mark, then 4008 and abort."""
    async with serve() as srv, await Raw.open(srv.port, rcvbuf=4096) as raw:
        raw.send(handshake("/flood"))
        status, _, _ = await raw.response()
        assert status == 101
        # ...and never read again.
        handler = srv.app.handlers[0]
        await asyncio.wait_for(handler.closed.wait(), T * 2)
        assert handler.closed_codes == [4008]
        assert 0 < handler.max_queued <= LIMITS.send_queue
        assert handler.max_write_buffer < 512 * 1024
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(raw.reader.read(1 << 20), T):
                pass


async def test_server_shutdown_closes_1001(serve: Serve) -> None:
    """uvicorn shutdown reaches WebSocket connections: clients get 1001 `server_shutdown`,
    each Handler on_closed(1001) once, and the server stops."""
    async with serve() as srv:
        clients = [await connect(srv.url("/echo"), open_timeout=T) for _ in range(3)]
        for ws in clients:
            await ws.send("up")
            assert await asyncio.wait_for(ws.recv(), T) == "up"
        srv.server.should_exit = True
        for ws in clients:
            await asyncio.wait_for(ws.wait_closed(), T)
            assert (ws.close_code, ws.close_reason) == (1001, "server_shutdown")
        await asyncio.wait_for(srv.task, T)
        assert [h.closed_codes for h in srv.app.handlers] == [[1001]] * 3


async def test_shutdown_refuses_pending_handshakes(serve: Serve) -> None:
    """A handshake still waiting for the app at shutdown gets 503 `server_shutdown`."""
    async with serve() as srv, await Raw.open(srv.port) as raw:
        raw.send(handshake("/slow"))
        await asyncio.wait_for(srv.app.requested.wait(), T)
        srv.server.should_exit = True
        status, _, body = await raw.response()
        assert (status, json.loads(body)["error"]) == (503, "server_shutdown")


# ---------------------------------------------------------------------------------------------
# Logs


async def test_access_token_never_logged(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    """`access_token` query values are redacted in uvicorn's access/error logs, for REST
    requests and for WebSocket handshakes (accepted and refused)."""
    secret = "eyJhbGciOiJIUzI1NiJ9.SECRET.sig"
    caplog.set_level(logging.DEBUG)
    async with serve(log_level="info", access_log=True) as srv:
        # uvicorn's dictConfig replaced these loggers' handlers when the server was built.
        uvicorn_loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error")]
        for lg in uvicorn_loggers:
            lg.addHandler(caplog.handler)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}", timeout=T) as http:
                assert (await http.get(f"/hello?access_token={secret}&x=1")).status_code == 200
            async with connect(srv.url(f"/echo?access_token={secret}"), open_timeout=T) as ws:
                await ws.send("hi")
                await asyncio.wait_for(ws.recv(), T)
            with pytest.raises(InvalidStatus):
                await connect(srv.url(f"/echo?deny=401&access_token={secret}"), open_timeout=T)
        finally:
            for lg in uvicorn_loggers:
                lg.removeHandler(caplog.handler)
    messages = [
        record.getMessage() for record in caplog.records if record.name.startswith(("uvicorn", "fleetwire"))
    ]
    assert not [m for m in messages if "SECRET" in m]
    redacted = [m for m in messages if "access_token=[REDACTED]" in m]
    assert any("GET /hello" in m for m in redacted)
    assert any("GET /echo" in m and m.endswith(" 101") for m in redacted)
    assert any("GET /echo" in m and m.endswith(" 401") for m in redacted)
