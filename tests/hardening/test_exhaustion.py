"""Resource exhaustion at the HTTP level (issue 7): hundreds of half-open sockets that never
finish their request head (slowloris) are cut by the handshake timeout while a normal client
still connects at once; no permessage-deflate, so no compression bomb. (The connection limit,
rate limit, slow consumer and heartbeat cases are in tests/integration/test_sessions.py.)"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import zlib
from collections.abc import Callable

import httpx
import pytest

from tests.integration.harness import TIMEOUT, Node

pytestmark = pytest.mark.anyio

HEAD_TIMEOUT_S = 1.0
SILENT, PARTIAL, DRIBBLING = 150, 150, 20
PARTIAL_HEAD = (
    b"GET /ws/device HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)


async def _cut_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes this connection (EOF or reset); bounded by `limit`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(4096), limit):
            pass
    return loop.time() - started


async def test_half_open_sockets_are_cut_and_others_still_connect(make_node: Callable[..., Node]) -> None:
    """With FLEETWIRE_HANDSHAKE_TIMEOUT_S=1: 150 sockets that send nothing, 150 that send part
    of an upgrade head and 20 that dribble a byte every 0.2 s are all closed by the server
    within the timeout + 1.5 s of connecting; meanwhile a device completes its WebSocket
    handshake and a REST call answers, each in under 1 s. The device session, upgraded before
    the timeout, is not cut by it: it still acks after every half-open socket is gone."""
    node = make_node(handshake_timeout_s=HEAD_TIMEOUT_S)
    await node.register("d1")
    loop = asyncio.get_running_loop()
    opened = [
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", node.port), TIMEOUT)
        for _ in range(SILENT + PARTIAL + DRIBBLING)
    ]
    for _, writer in opened[SILENT : SILENT + PARTIAL]:
        writer.write(PARTIAL_HEAD)
    limit = HEAD_TIMEOUT_S + 1.5
    cut = [asyncio.ensure_future(_cut_after(reader, limit)) for reader, _ in opened]

    async def dribble(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            for byte in PARTIAL_HEAD * 10:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.2)  # the attack itself: one byte at a time

    dribblers = [asyncio.ensure_future(dribble(writer)) for _, writer in opened[SILENT + PARTIAL :]]
    try:
        started = loop.time()
        device = await node.device("d1")
        assert loop.time() - started < 1.0
        started = loop.time()
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            assert (await http.get(f"{node.http_url}/healthz")).status_code == 200
        assert loop.time() - started < 1.0
        durations = await asyncio.wait_for(asyncio.gather(*cut), limit + TIMEOUT)
        assert max(durations) < limit
        assert (await device.request({"type": "status", "status": "still-open"}))["type"] == "ack"
    finally:
        for task in (*cut, *dribblers):
            task.cancel()
        for _, writer in opened:
            writer.transport.abort()


async def test_permessage_deflate_is_never_negotiated(node: Node) -> None:
    """A client offering `permessage-deflate` gets a 101 without `Sec-WebSocket-Extensions`
    (so no compression bomb can be inflated past the size limit); a compressed frame sent
    anyway (RSV1 set: 10 MB of zeros deflated to ~10 KB) is closed 1002 without being
    inflated, and the server goes on serving."""
    await node.register("d1")
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET /ws/device HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        f"Authorization: Bearer {node.token('d1', 'device')}\r\n\r\n"
    )
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", node.port), TIMEOUT)
    try:
        writer.write(head.encode())
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert response.startswith(b"HTTP/1.1 101 ")
        assert b"sec-websocket-extensions" not in response.lower()
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        bomb = compressor.compress(b"\x00" * 10_000_000) + compressor.flush(zlib.Z_SYNC_FLUSH)[:-4]
        assert len(bomb) < node.settings.max_message_bytes
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(bomb))
        writer.write(bytes((0x80 | 0x40 | 0x1, 0x80 | 127)) + len(bomb).to_bytes(8, "big") + mask + masked)
        code = None
        while True:  # the welcome first, then the close frame
            first, second = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
            size = second & 0x7F
            if size == 126:
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), TIMEOUT), "big")
            payload = await asyncio.wait_for(reader.readexactly(size), TIMEOUT)
            if first & 0x0F == 0x8:
                code = int.from_bytes(payload[:2], "big")
                break
        assert code == 1002
    finally:
        writer.transport.abort()
    device = await node.device("d1")
    assert (await device.request({"type": "status", "status": "fine"}))["type"] == "ack"


async def test_requests_in_flight_are_capped_and_reading_pauses_during_a_stall(
    make_node: Callable[..., Node],
) -> None:
    """Issue 13.6: while the database is held locked by another connection, a device that
    keeps sending has at most FLEETWIRE_MAX_IN_FLIGHT requests in the server; the rest wait
    unread in TCP. When the lock goes, every message is acked, in order, and stored once."""
    import sqlite3

    node = make_node(max_in_flight=8)
    await node.register("d1")
    device = await node.device("d1")
    assert (await device.request({"type": "telemetry", "id": 0, "data": {"n": 0}}))["accepted"] == 1
    services = node.app.state.services

    def in_flight() -> int:
        count: int = services.sessions.local.devices["d1"].core.running
        return count

    lock = sqlite3.connect(node.settings.data_dir / "fleetwire.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # every writer of the node now waits on the lock
    try:
        for n in range(1, 101):
            await device.send({"type": "telemetry", "id": n, "data": {"n": n}})
        for _ in range(200):  # bounded: the server reads until the cap, then pauses
            if node.call(in_flight) >= 8:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # what the server would read meanwhile, if it still read
        assert node.call(in_flight) == 8
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    acks = [await device.recv() for _ in range(100)]
    assert [a["id"] for a in acks] == list(range(1, 101))
    assert all(a["type"] == "ack" for a in acks)


async def test_subscriptions_and_patterns_per_connection_are_capped(make_node: Callable[..., Node]) -> None:
    """Issue 13.4: with FLEETWIRE_MAX_SUBSCRIPTIONS=3 and FLEETWIRE_MAX_PATTERNS=5, the 4th
    subscribe, or one that takes the connection past 5 ids and patterns, gets `too_large`
    and adds nothing; unsubscribing frees room; another connection has its own budget."""
    node = make_node(max_subscriptions=3, max_patterns=5)
    await node.register("d1")
    viewer = await node.client()
    ok = [await viewer.request({"type": "subscribe", "devices": [f"x{n}-*"]}) for n in range(2)]
    assert [r["subscription_id"] for r in ok] == ["sub-1", "sub-2"]
    wide = await viewer.request({"type": "subscribe", "devices": ["a*", "b*", "c*", "d*"]})
    assert wide["code"] == "too_large"
    third = await viewer.request({"type": "subscribe", "devices": ["a*", "b*", "c*"]})
    assert third["subscription_id"] == "sub-3"
    fourth = await viewer.request({"type": "subscribe", "devices": ["d1"]})
    assert fourth["code"] == "too_large"
    assert (await viewer.request({"type": "unsubscribe", "subscription_id": "sub-1"}))["type"] == "ack"
    assert (await viewer.request({"type": "subscribe", "devices": ["d1"]}))["subscription_id"] == "sub-4"
    other = await node.client()
    assert (await other.request({"type": "subscribe", "devices": ["a*", "b*", "c*", "d*", "e*"]}))[
        "type"
    ] == "ack"
