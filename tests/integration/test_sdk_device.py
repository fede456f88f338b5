"""The SDK's DeviceClient against a real server (issue 17): durable acks, the offline outbox,
command handlers, the close-code policy, backoff, the ping watchdog and token refresh."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fleetwire.client import (
    Action,
    AppClient,
    Backoff,
    ClientClosed,
    ClientOptions,
    Closed,
    Command,
    CommandError,
    Connected,
    DeviceClient,
    Disconnected,
    RequestError,
    SqliteBuffer,
    State,
)
from tests.client_clock import FakeClientClock
from tests.clock import ManualClock
from tests.integration.harness import Node
from tests.integration.sdk_helpers import TIMEOUT, Recorder, advance
from tests.services import free_port

pytestmark = pytest.mark.anyio


def _rfc3339(epoch_ms: int) -> str:
    return (
        datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def always(value: float) -> Callable[[], float]:
    return lambda: value


async def stored(node: Node, device_id: str, key: str = "n") -> list[Any]:
    """The stored values of `key`, oldest first (REST returns newest first)."""
    async with node.rest("viewer") as rest:
        response = await rest.get(f"/devices/{device_id}/telemetry", params={"key": key, "limit": 1000})
        assert response.status_code == 200, response.text
        return [item["value"] for item in reversed(response.json()["items"])]


async def test_send_resolves_on_the_durable_ack(node: Node) -> None:
    """`await send` returns once the record is stored: a REST read right after finds it; the
    connection events are Connecting then Connected with the welcome's session id."""
    await node.register("d1")
    device = DeviceClient(node.ws_url, node.token("d1", "device"))
    recorder = Recorder(device)
    await device.start()
    try:
        for n in range(3):
            await asyncio.wait_for(device.send({"n": n}), TIMEOUT)
        assert await stored(node, "d1") == [0, 1, 2]
        connected = await recorder.next(Connected)
        assert connected.session_id == device.welcome["session_id"]
        assert recorder.kinds()[:2] == ["Connecting", "Connected"]
        assert (device.acked, len(device.buffer)) == (3, 0)
    finally:
        await device.close()
    assert device.state is State.CLOSED


async def test_outbox_flushes_in_order_in_batches_of_at_most_1000(node: Node) -> None:
    """2,500 records queued before the first connect go out in order as telemetry_batch
    messages of ≤ 1,000 records; all 2,500 are stored in order and every future resolves."""
    await node.register("d1")
    device = DeviceClient(node.ws_url, node.token("d1", "device"))
    start = int(time.time() * 1000) - 10_000
    futures = [device.enqueue({"n": n}, ts=start + n) for n in range(2500)]
    assert len(device.buffer) == 2500
    sizes: list[int] = []
    original = device._next_batch
    device._next_batch = lambda: (batch := original(), sizes.append(len(batch)))[0]  # type: ignore[method-assign]  # records each batch's size
    await device.start()
    try:
        await asyncio.wait_for(asyncio.gather(*futures), 20)
        assert await stored(node, "d1") == list(range(1500, 2500))  # the newest page of 1000
        async with node.rest("viewer") as rest:
            oldest = await rest.get(
                "/devices/d1/telemetry", params={"to": _rfc3339(start + 999), "limit": 1000}
            )
        assert [item["value"] for item in reversed(oldest.json()["items"])] == list(range(1000))
        assert [s for s in sizes if s] == [1000, 1000, 500]
    finally:
        await device.close()


async def test_sqlite_outbox_survives_the_process(node: Node, tmp_path: Path) -> None:
    """Records taken by a client that closed before connecting stay in the SQLite file and are
    sent, in order, by the next client on that file."""
    await node.register("d1")
    path = tmp_path / "outbox.db"
    first = DeviceClient(
        f"ws://127.0.0.1:{free_port()}", node.token("d1", "device"), buffer=SqliteBuffer(path)
    )
    taken = [first.enqueue({"n": n}) for n in range(5)]
    await first.start()
    await first.close()  # never connected: nothing acked
    for future in taken:
        with pytest.raises(ClientClosed):
            await future
    second = DeviceClient(node.ws_url, node.token("d1", "device"), buffer=SqliteBuffer(path))
    await second.start()
    try:
        await second.wait_connected(TIMEOUT)
        await asyncio.wait_for(second.send({"n": 5}), TIMEOUT)
        assert await stored(node, "d1") == [0, 1, 2, 3, 4, 5]
        assert len(second.buffer) == 0
    finally:
        await second.close()


async def test_refused_record_fails_alone(node: Node) -> None:
    """In a batch, the record the server refuses (NaN is not a finite number... here: a bad
    key) fails its own send with invalid_message; the others are stored."""
    await node.register("d1")
    device = DeviceClient(node.ws_url, node.token("d1", "device"))
    good = [device.enqueue({"n": n}) for n in range(2)]
    bad = device.enqueue({"bad key!": 1})
    late = device.enqueue({"n": 2})
    await device.start()
    try:
        await asyncio.wait_for(asyncio.gather(*good, late), TIMEOUT)
        with pytest.raises(RequestError) as refused:
            await asyncio.wait_for(bad, TIMEOUT)
        assert refused.value.code == "invalid_message"
        assert await stored(node, "d1") == [0, 1, 2]
        assert (device.acked, device.refused) == (3, 1)
    finally:
        await device.close()


async def test_command_handlers_answer_automatically(node: Node) -> None:
    """A registered handler's return value is the result; a CommandError is ok: false with
    its code; a command without a handler answers unknown_command."""
    await node.register("d1")
    device = DeviceClient(node.ws_url, node.token("d1", "device"))

    @device.command("reboot")
    async def reboot(command: Command) -> dict[str, Any]:
        return {"rebooting_in": command.params["delay"]}

    @device.command("explode")
    def explode(command: Command) -> None:
        raise CommandError("busy", "not now")

    await device.start()
    operator = await node.client("operator")
    try:
        await device.wait_connected(TIMEOUT)
        for name, params in (("reboot", {"delay": 3}), ("explode", {}), ("dance", {})):
            await operator.request({"type": "command", "device_id": "d1", "name": name, "params": params})
        results = [await operator.next_of("command_result") for _ in range(3)]
        assert [(r["state"], r["result"], r["error"]) for r in results] == [
            ("succeeded", {"rebooting_in": 3}, None),
            ("failed", None, {"code": "busy", "message": "not now"}),
            ("failed", None, {"code": "unknown_command", "message": "no handler for 'dance'"}),
        ]
        assert device.commands_handled == 3
    finally:
        await device.close()


async def test_expired_command_is_skipped(make_node: Callable[..., Node]) -> None:
    """A command whose expires_at has passed on the device's clock (here it runs 60 s ahead)
    is not run; the command after it is (the sentinel), and the skipped one times out."""
    node = make_node(clock=ManualClock())
    await node.register("d1")
    ran: list[str] = []
    device = DeviceClient(node.ws_url, node.token("d1", "device"), clock=FakeClientClock(wall_offset_s=60))

    @device.command("work")
    def work(command: Command) -> dict[str, Any]:
        ran.append(command.params["which"])
        return {}

    await device.start()
    operator = await node.client("operator")
    try:
        await device.wait_connected(TIMEOUT)
        first = await operator.request(
            {
                "type": "command",
                "device_id": "d1",
                "name": "work",
                "params": {"which": "short"},
                "timeout_s": 5,
            }
        )
        await operator.request(
            {
                "type": "command",
                "device_id": "d1",
                "name": "work",
                "params": {"which": "long"},
                "timeout_s": 600,
            }
        )
        result = await operator.next_of("command_result")
        assert (result["state"], ran) == ("succeeded", ["long"])
        node.advance(5)
        timed_out = await operator.next_of("command_result", command_id=first["command_id"])
        assert timed_out["state"] == "timed_out"
    finally:
        await device.close()


async def test_redelivered_command_runs_once(node: Node) -> None:
    """A command_id seen before is ignored: the handler ran once and one result was sent
    (the server never redelivers on /ws/device, so the second delivery is fed to the client's
    message handler directly; the first is real)."""
    await node.register("d1")
    device = DeviceClient(node.ws_url, node.token("d1", "device"))
    calls: list[str] = []

    @device.command("ping")
    def ping(command: Command) -> dict[str, Any]:
        calls.append(command.command_id)
        return {"pong": True}

    await device.start()
    operator = await node.client("operator")
    try:
        await device.wait_connected(TIMEOUT)
        ack = await operator.request({"type": "command", "device_id": "d1", "name": "ping", "params": {}})
        assert (await operator.next_of("command_result"))["state"] == "succeeded"
        assert calls == [ack["command_id"]]
        delivered = {
            "type": "command",
            "command_id": ack["command_id"],
            "name": "ping",
            "params": {},
            "issued_at": "2026-01-01T00:00:00.000Z",
            "expires_at": "2999-01-01T00:00:00.000Z",
        }
        await device._on_message(delivered)
        second = await operator.request({"type": "command", "device_id": "d1", "name": "ping", "params": {}})
        await operator.next_of("command_result", command_id=second["command_id"])  # the sentinel
        assert calls == [ack["command_id"], second["command_id"]]
    finally:
        await device.close()


async def test_replaced_stops_and_does_not_fight_back(node: Node) -> None:
    """4009 replaced: the client closes for good; the newer session stays connected (a status
    request on it succeeds after the SDK client reported Closed)."""
    await node.register("d1")
    device = DeviceClient(node.ws_url, node.token("d1", "device"))
    recorder = Recorder(device)
    await device.start()
    await device.wait_connected(TIMEOUT)
    newer = await node.device("d1")
    closed = await recorder.next(Closed)
    assert (closed.code, closed.reason) == (4009, "replaced")
    assert recorder.kinds() == ["Connecting", "Connected", "Closed"]
    assert (await newer.request({"type": "status", "status": "ok"}))["type"] == "ack"
    async with node.rest("viewer") as rest:
        connection = (await rest.get("/devices/d1/connection")).json()
    assert connection["session_id"] == newer.welcome["session_id"]


async def test_disabled_device_stops_on_4003_and_403(node: Node) -> None:
    """Disabled while connected → 4003 → Closed; a fresh client for it is refused 403 → Closed
    with status 403 and no retry."""
    await node.register("d1")
    device = DeviceClient(node.ws_url, node.token("d1", "device"))
    recorder = Recorder(device)
    await device.start()
    await device.wait_connected(TIMEOUT)
    async with node.rest("admin") as rest:
        assert (await rest.patch("/devices/d1", json={"disabled": True})).status_code == 200
    closed = await recorder.next(Closed)
    assert (closed.code, closed.reason) == (4003, "forbidden")
    again = DeviceClient(node.ws_url, node.token("d1", "device"))
    again_recorder = Recorder(again)
    await again.start()
    refused = await again_recorder.next(Closed)
    assert (refused.status, refused.code, refused.reason) == (403, None, "forbidden")
    assert again_recorder.kinds() == ["Connecting", "Closed"]


async def test_backoff_delays_are_full_jitter_exponential_and_capped(node: Node) -> None:
    """Nothing listens on the port: with random() = 1 the waits are exactly the ceilings
    0.5, 1, 2, 4, 8, 16, 30, 30 s; with random() = 0.25 a quarter of each."""
    port = free_port()
    for fraction, expected in (
        (1.0, [0.5, 1, 2, 4, 8, 16, 30, 30]),
        (0.25, [0.125, 0.25, 0.5, 1, 2, 4, 7.5, 7.5]),
    ):
        clock = FakeClientClock()
        device = DeviceClient(
            f"ws://127.0.0.1:{port}",
            "unused",
            clock=clock,
            options=ClientOptions(backoff=Backoff(random=always(fraction))),
        )
        recorder = Recorder(device)
        await device.start()
        delays = []
        for _ in expected:
            event = await recorder.next(Disconnected)
            assert (event.action, event.code, event.status) == (Action.RECONNECT, None, None)
            assert event.delay_s is not None
            delays.append(event.delay_s)
            clock.advance(event.delay_s)
        await device.close()
        assert delays == expected


@pytest.mark.parametrize(("stable_s", "expected"), [(30.0, [0.5, 0.5]), (60.0, [0.5, 1.0])])
async def test_watchdog_drops_a_silent_server_and_backoff_resets_after_a_stable_session(
    make_node: Callable[..., Node], stable_s: float, expected: list[float]
) -> None:
    """The server's clock does not move, so it never pings: 2 × heartbeat_s (40 s) after the
    welcome the client drops the session (code None, "no ping") and reconnects. Each session
    lasted 40 s: past a 30 s stable period the backoff starts again at 0.5 s each time; with
    a 60 s stable period it keeps growing (0.5, then 1)."""
    node = make_node(clock=ManualClock())
    await node.register("d1")
    clock = FakeClientClock()
    device = DeviceClient(
        node.ws_url,
        node.token("d1", "device"),
        clock=clock,
        options=ClientOptions(backoff=Backoff(random=always(1.0), stable_s=stable_s)),
    )
    recorder = Recorder(device)
    await device.start()
    try:
        delays = []
        for _ in expected:
            await recorder.next(Connected)
            await asyncio.sleep(0)  # let the watchdog task arm its first sleep
            clock.advance(39.9)
            assert device.state is State.CONNECTED
            clock.advance(0.1)
            dropped = await recorder.next(Disconnected)
            assert (dropped.code, dropped.reason, dropped.action) == (
                None,
                "no ping from the server",
                Action.RECONNECT,
            )
            assert dropped.delay_s is not None
            delays.append(dropped.delay_s)
            clock.advance(dropped.delay_s)
        await recorder.next(Connected)
        assert delays == expected
        assert device.reconnects == len(expected)
    finally:
        await device.close()


async def test_rate_limited_close_backs_off_longer(make_node: Callable[..., Node]) -> None:
    """4029 rate_limited → RECONNECT_SLOW: the wait is the 5 s floor plus the jitter."""
    node = make_node(rate_limit="5/s", rate_limit_close_after=3)
    await node.register("d1")
    device = DeviceClient(
        node.ws_url, node.token("d1", "device"),
        clock=FakeClientClock(), options=ClientOptions(backoff=Backoff(random=always(0.5))),
    )  # fmt: skip
    recorder = Recorder(device)
    await device.start()
    try:
        await device.wait_connected(TIMEOUT)
        flood = [asyncio.ensure_future(device.request({"type": "status", "status": "x"})) for _ in range(20)]
        dropped = await recorder.next(Disconnected)
        await asyncio.gather(*flood, return_exceptions=True)
        assert (dropped.code, dropped.reason, dropped.action) == (4029, "rate_limited", Action.RECONNECT_SLOW)
        assert dropped.delay_s == 5.0 + 0.25
    finally:
        await device.close()


async def test_connection_limit_honours_retry_after(make_node: Callable[..., Node]) -> None:
    """503 at the connection limit carries Retry-After: 5; the wait is at least that."""
    node = make_node(max_connections=1)
    await node.register("d1", "d2")
    holder = await node.device("d1")
    device = DeviceClient(
        node.ws_url, node.token("d2", "device"),
        clock=FakeClientClock(), options=ClientOptions(backoff=Backoff(random=always(1.0))),
    )  # fmt: skip
    recorder = Recorder(device)
    await device.start()
    try:
        refused = await recorder.next(Disconnected)
        assert (refused.status, refused.action, refused.delay_s) == (503, Action.RECONNECT, 5.0)
        await holder.close()
    finally:
        await device.close()


async def test_in_band_refresh_on_token_expiring(make_node: Callable[..., Node]) -> None:
    """token_expiring → the provider is asked again and `auth` sent: the session outlives the
    first token's exp (the server clock moves past it) and a send still succeeds on it."""
    node = make_node(clock=ManualClock())
    await node.register("d1")
    minted: list[str] = []

    async def provider() -> str:
        minted.append(node.token("d1", "device", ttl_s=120))
        return minted[-1]

    device = DeviceClient(node.ws_url, provider)
    recorder = Recorder(device)
    await device.start()
    try:
        await device.wait_connected(TIMEOUT)
        first_expiry = device.token_expires_at
        await advance(node, device, 61)  # the warning is 60 s before exp
        async with asyncio.timeout(TIMEOUT):
            # The refresh has no event of its own: poll its result, bounded by the timeout.
            while device.token_expires_at == first_expiry:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert len(minted) == 2
        await advance(node, device, 70)  # past the first token's exp
        await asyncio.wait_for(device.send({"n": 1}), TIMEOUT)
        assert device.state is State.CONNECTED
        assert recorder.kinds() == ["Connecting", "Connected"]
    finally:
        await device.close()


async def test_expired_token_is_refreshed_then_reconnects(make_node: Callable[..., Node]) -> None:
    """401 at the handshake (the provider's first token has expired) → REFRESH_TOKEN: the
    provider is asked again and the next attempt connects. A fixed token that expires mid-
    session closes 4001 and the client stops (nothing to refresh with)."""
    node = make_node(clock=ManualClock())
    await node.register("d1", "d2")
    assert node.clock is not None
    past = node.clock.now_ms() / 1000 - 100
    tokens = [node.token("d1", "device", ttl_s=10, now=past), node.token("d1", "device")]

    async def provider() -> str:
        return tokens.pop(0)

    clock = FakeClientClock()
    device = DeviceClient(node.ws_url, provider, clock=clock)
    recorder = Recorder(device)
    await device.start()
    try:
        refused = await recorder.next(Disconnected)
        assert (refused.status, refused.action) == (401, Action.REFRESH_TOKEN)
        assert refused.delay_s is not None
        clock.advance(refused.delay_s)
        await recorder.next(Connected)
        assert tokens == []
    finally:
        await device.close()

    fixed = DeviceClient(node.ws_url, node.token("d2", "device", ttl_s=100))
    fixed_recorder = Recorder(fixed)
    await fixed.start()
    await fixed.wait_connected(TIMEOUT)
    await advance(node, fixed, 100)
    closed = await fixed_recorder.next(Closed)
    assert (closed.code, closed.reason) == (4001, "token_expired")


async def test_no_token_in_logs(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    """With every logger at DEBUG, a session, a refusal and a reconnect log no token text."""
    caplog.set_level("DEBUG")
    await node.register("d1")
    token = node.token("d1", "device")
    device = DeviceClient(node.ws_url, token)
    await device.start()
    await device.wait_connected(TIMEOUT)
    await asyncio.wait_for(device.send({"n": 1}), TIMEOUT)
    await device.close()
    refused_token = node.token("nobody", "device")
    refused = DeviceClient(node.ws_url, refused_token)
    await refused.start()
    await refused.wait_closed(TIMEOUT)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "fleetwire" in text  # the client did log (a control)
    assert token not in text
    assert refused_token not in text
    assert token.split(".")[1] not in text


async def test_twin_delta_handler_converges(node: Node) -> None:
    """A desired state set while the device was offline reaches on_delta after the welcome;
    the handler's return value is reported, the next delta is {} (converged); a later
    twin_update from an AppClient goes the same way, and twin() shows the result."""
    await node.register("d1")
    async with node.rest("operator") as rest:
        response = await rest.patch(
            "/devices/d1/twin", json={"desired": {"led": {"on": True}, "interval_s": 10}}
        )
        assert response.status_code == 200, response.text
    device = DeviceClient(node.ws_url, node.token("d1", "device"))
    calls: list[tuple[dict[str, Any], int]] = []
    called = asyncio.Event()

    @device.on_delta
    def adopt(delta: dict[str, Any], version: int) -> dict[str, Any]:
        calls.append((delta, version))
        called.set()
        return delta

    async def next_call() -> tuple[dict[str, Any], int]:
        async with asyncio.timeout(TIMEOUT):
            while True:
                called.clear()
                if len(calls) > seen:
                    return calls[seen]
                await called.wait()

    app = AppClient(node.ws_url, node.token("ops", "operator"))
    await device.start()
    await app.start()
    try:
        seen = 0
        assert await next_call() == ({"led": {"on": True}, "interval_s": 10}, 2)
        seen = 1
        assert await next_call() == ({}, 3)  # the report made the delta empty
        await app.wait_connected(TIMEOUT)
        assert await app.twin_update("d1", {"led": {"on": False}}) == 4
        seen = 2
        assert await next_call() == ({"led": {"on": False}}, 4)
        seen = 3
        assert await next_call() == ({}, 5)
        twin = await device.twin()
        assert (twin["reported"], twin["delta"], twin["version"]) == (
            {"led": {"on": False}, "interval_s": 10},
            {},
            5,
        )
        assert len(calls) == 4
    finally:
        await app.close()
        await device.close()


async def test_batches_shrink_below_the_servers_message_limit(make_node: Callable[..., Node]) -> None:
    """The server's FLEETWIRE_MAX_MESSAGE_BYTES is 2048: the first batch (40 records, ~2.6 KB)
    is closed with 1009; the client halves its batch bound under that size, reconnects and
    every record is stored in order. A single record over the limit is refused too_large
    instead of being retried forever."""
    node = make_node(max_message_bytes=2048)
    await node.register("d1", "d2")
    options = ClientOptions(backoff=Backoff(random=always(0.0)))
    device = DeviceClient(node.ws_url, node.token("d1", "device"), options=options)
    recorder = Recorder(device)
    futures = [device.enqueue({"n": n, "padding": "x" * 20}) for n in range(40)]
    await device.start()
    try:
        await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)
        closed = await recorder.next(Disconnected)
        assert (closed.code, closed.reason) == (1009, "message_too_big")
        assert device.max_batch_bytes < 2048
        assert await stored(node, "d1") == list(range(40))
    finally:
        await device.close()
    big = DeviceClient(node.ws_url, node.token("d2", "device"), options=options)
    too_big = big.enqueue({"text": "y" * 1024, "more": "z" * 1024})
    after = big.enqueue({"n": 1})
    await big.start()
    try:
        with pytest.raises(RequestError) as refused:
            await asyncio.wait_for(too_big, TIMEOUT)
        assert refused.value.code == "too_large"
        await asyncio.wait_for(after, TIMEOUT)
        assert await stored(node, "d2") == [1]
    finally:
        await big.close()


async def test_send_right_after_a_drop_waits_for_the_next_session(node: Node) -> None:
    """A record taken just after the TCP connection dropped (before the read loop noticed)
    is sent by the next session: the outbox waits for the session to end instead of retrying
    on the dead socket (which fails without yielding and would starve the loop)."""
    await node.register("d1")
    device = DeviceClient(
        node.ws_url, node.token("d1", "device"), options=ClientOptions(backoff=Backoff(random=always(0.0)))
    )
    await device.start()
    try:
        await device.wait_connected(TIMEOUT)
        device.drop()
        # One loop turn: the transport has seen the loss, the read loop not yet; a send now
        # fails at once (without yielding), which once made the outbox spin.
        await asyncio.sleep(0)
        await asyncio.wait_for(device.send({"n": 1}), TIMEOUT)
        assert device.reconnects == 1
        assert await stored(node, "d1") == [1]
    finally:
        await device.close()


async def test_a_failing_token_provider_backs_off_and_retries(node: Node) -> None:
    """The provider raising is a failed attempt (reason names the exception), not a dead
    client: after the backoff the provider is asked again and the client connects."""
    await node.register("d1")
    answers: list[str | Exception] = [OSError("vault unreachable"), node.token("d1", "device")]

    async def provider() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = FakeClientClock()
    device = DeviceClient(node.ws_url, provider, clock=clock)
    recorder = Recorder(device)
    await device.start()
    try:
        failed = await recorder.next(Disconnected)
        assert (failed.reason, failed.action) == ("token provider failed: OSError", Action.RECONNECT)
        assert failed.delay_s is not None
        clock.advance(failed.delay_s)
        await recorder.next(Connected)
    finally:
        await device.close()


async def test_refused_refresh_ends_in_4001_then_a_fresh_token_reconnects(
    make_node: Callable[..., Node],
) -> None:
    """Mid-session: the in-band refresh is refused (the provider's second token names another
    device: forbidden, the old expiry stands), so at exp the server closes 4001; the client asks
    the provider again and reconnects with its third token."""
    node = make_node(clock=ManualClock())
    await node.register("d1", "d2")
    tokens = [node.token("d1", "device", ttl_s=100), node.token("d2", "device"), node.token("d1", "device")]

    async def provider() -> str:
        return tokens.pop(0)

    clock = FakeClientClock()
    device = DeviceClient(node.ws_url, provider, clock=clock)
    recorder = Recorder(device)
    await device.start()
    try:
        await recorder.next(Connected)
        await advance(node, device, 41)  # token_expiring (60 s before exp): the refresh is refused
        async with asyncio.timeout(TIMEOUT):
            while len(tokens) == 2:  # noqa: ASYNC110  # the refresh has no event of its own
                await asyncio.sleep(0.01)
        await advance(node, device, 60)
        expired = await recorder.next(Disconnected)
        assert (expired.code, expired.reason, expired.action) == (4001, "token_expired", Action.REFRESH_TOKEN)
        assert expired.delay_s is not None
        clock.advance(expired.delay_s)
        await recorder.next(Connected)
        assert tokens == []
        await asyncio.wait_for(device.send({"n": 1}), TIMEOUT)
    finally:
        await device.close()
