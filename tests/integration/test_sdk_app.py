"""The SDK's AppClient against a real server (issue 17): subscriptions that resume after a
reconnect, gaps filled from the history, no duplicate or out-of-order event, commands."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from fleetwire.client import (
    AppClient,
    Backoff,
    ClientOptions,
    Command,
    CommandFailed,
    CommandResultLost,
    CommandTimedOut,
    Connected,
    DeviceClient,
    Disconnected,
    Event,
    RequestError,
    Subscription,
)
from tests.client_clock import FakeClientClock
from tests.clock import ManualClock
from tests.integration.harness import Node
from tests.integration.sdk_helpers import TIMEOUT, Recorder

pytestmark = pytest.mark.anyio


async def values(subscription: Subscription, count: int) -> list[Any]:
    events = [await subscription.get(TIMEOUT) for _ in range(count)]
    assert all(e.name == "device.telemetry" for e in events), events
    return [e.data["values"]["n"] for e in events]


async def test_subscription_resumes_after_a_reconnect(node: Node) -> None:
    """Events sent while the app is away arrive after it resubscribes, with `resume` from the
    last seq: recovered is true, each record exactly once, in order."""
    await node.register("d1")
    device = await node.device("d1")
    clock = FakeClientClock()
    app = AppClient(node.ws_url, node.token("app", "viewer"), clock=clock)
    recorder = Recorder(app)
    await app.start()
    try:
        await app.wait_connected(TIMEOUT)
        subscription = await app.subscribe(["d1"], ["telemetry"])
        for n in range(3):
            await device.request({"type": "telemetry", "data": {"n": n}})
        assert await values(subscription, 3) == [0, 1, 2]
        app.drop()  # the TCP connection drops
        dropped = await recorder.next(Disconnected)
        for n in range(3, 6):
            await device.request({"type": "telemetry", "data": {"n": n}})
        assert dropped.delay_s is not None
        clock.advance(dropped.delay_s)
        await recorder.next(Connected)
        assert await values(subscription, 3) == [3, 4, 5]
        await device.request({"type": "telemetry", "data": {"n": 6}})
        assert await values(subscription, 1) == [6]  # live again after the replay
        assert subscription.recovered == {"d1": True}
        assert subscription.resubscribed == 1
        assert app.backfilled == 0
    finally:
        await app.close()


async def test_unrecovered_resume_is_filled_from_the_history(make_node: Callable[..., Node]) -> None:
    """With FLEETWIRE_MAX_REPLAY=0 the server replays nothing (recovered false): the missed
    records come from GET /events instead, exactly once and in order, before the live ones.
    The presence events in between (not subscribed) are not handed on."""
    node = make_node(max_replay=0)
    await node.register("d1")
    clock = FakeClientClock()
    app = AppClient(node.ws_url, node.token("app", "viewer"), clock=clock)
    recorder = Recorder(app)
    await app.start()
    device = await node.device("d1")
    try:
        await app.wait_connected(TIMEOUT)
        subscription = await app.subscribe(["d1"], ["telemetry"])
        await device.request({"type": "telemetry", "data": {"n": 0}})
        assert await values(subscription, 1) == [0]
        app.drop()
        dropped = await recorder.next(Disconnected)
        await device.close()
        device = await node.device("d1")  # a disconnect and a connect in the gap
        for n in range(1, 4):
            await device.request({"type": "telemetry", "data": {"n": n}})
        assert dropped.delay_s is not None
        clock.advance(dropped.delay_s)
        await recorder.next(Connected)
        await device.request({"type": "telemetry", "data": {"n": 4}})
        assert await values(subscription, 4) == [1, 2, 3, 4]
        assert subscription.recovered == {"d1": False}
        # The three records came from the history, with the events of other classes in the
        # gap (presence, and whatever else the server records on a connect): at least 4.
        assert app.backfilled >= 4
        assert app.duplicates_dropped == 0
    finally:
        await app.close()


async def test_a_live_gap_is_filled_and_repeats_dropped(node: Node) -> None:
    """A seq beyond last + 1 on the live stream is filled from the history before the event
    (the subscription's classes only), and a repeated seq is dropped (fed through the client's
    message handler: a real server does not repeat itself on one connection)."""
    await node.register("d1")
    device = await node.device("d1")
    app = AppClient(node.ws_url, node.token("app", "viewer"))
    await app.start()
    try:
        await app.wait_connected(TIMEOUT)
        subscription = await app.subscribe(["d1"], ["telemetry"])
        await device.request({"type": "telemetry", "data": {"n": 0}})
        first = await subscription.get(TIMEOUT)
        await device.request({"type": "telemetry", "data": {"n": 1}})
        await device.request({"type": "telemetry", "data": {"n": 2}})
        second = await subscription.get(TIMEOUT)
        third = await subscription.get(TIMEOUT)
        # Replay the first as a repeat and forget the last seq seen, as if seq 2..3 were lost.
        await app._on_message(_wire(first))
        app.last_seq["d1"] = first.seq
        await device.request({"type": "telemetry", "data": {"n": 3}})
        got = [await subscription.get(TIMEOUT) for _ in range(3)]
        assert [e.data["values"]["n"] for e in got] == [1, 2, 3]
        assert [e.seq for e in got] == [second.seq, third.seq, third.seq + 1]
        assert app.duplicates_dropped >= 1
        assert app.backfilled == 2
    finally:
        await app.close()


def _wire(event: Event) -> dict[str, Any]:
    return {
        "type": "event",
        "event": event.name,
        "device_id": event.device_id,
        "seq": event.seq,
        "at": event.at,
        "data": event.data,
    }


async def test_command_round_trip_between_the_two_clients(make_node: Callable[..., Node]) -> None:
    """app.command → the device's handler → the final result, or the typed error: failed,
    timed out (the server clock passes timeout_s), refused (offline, unknown device)."""
    node = make_node(clock=ManualClock())
    await node.register("d1", "d2")
    device = DeviceClient(node.ws_url, node.token("d1", "device"))
    started = asyncio.Event()
    release = asyncio.Event()

    @device.command("add")
    def add(command: Command) -> dict[str, Any]:
        return {"sum": command.params["a"] + command.params["b"]}

    @device.command("fail")
    def fail(command: Command) -> None:
        raise ValueError("no")

    @device.command("hang")
    async def hang(command: Command) -> None:
        started.set()
        await release.wait()

    await device.start()
    app = AppClient(node.ws_url, node.token("ops", "operator"))
    await app.start()
    try:
        await device.wait_connected(TIMEOUT)
        await app.wait_connected(TIMEOUT)
        result = await app.command("d1", "add", {"a": 2, "b": 3}, timeout=10)
        assert (result.state, result.result, result.device_id) == ("succeeded", {"sum": 5}, "d1")
        with pytest.raises(CommandFailed) as failed:
            await app.command("d1", "fail", timeout=10)
        assert failed.value.error == {"code": "handler_error", "message": "ValueError: no"}
        hanging = asyncio.ensure_future(app.command("d1", "hang", timeout=3))
        await asyncio.wait_for(started.wait(), TIMEOUT)
        node.advance(3)
        with pytest.raises(CommandTimedOut) as timed_out:
            await asyncio.wait_for(hanging, TIMEOUT)
        assert timed_out.value.state == "timed_out"
        release.set()
        with pytest.raises(RequestError) as offline:
            await app.command("d2", "add", {})
        assert offline.value.code == "device_offline"
        with pytest.raises(RequestError) as missing:
            await app.command("nope", "add", {})
        assert missing.value.code == "not_found"
    finally:
        await app.close()
        await device.close()


async def test_pending_requests_fail_at_once_on_disconnect(node: Node) -> None:
    """A command waiting for its result fails with CommandResultLost (carrying the command id)
    the moment the session drops, long before its 600 s timeout."""
    await node.register("d1")
    device = await node.device("d1")
    app = AppClient(
        node.ws_url, node.token("ops", "operator"),
        clock=FakeClientClock(), options=ClientOptions(backoff=Backoff(random=lambda: 1.0)),
    )  # fmt: skip
    await app.start()
    try:
        await app.wait_connected(TIMEOUT)
        waiting = asyncio.ensure_future(app.command("d1", "slow", timeout=600))
        command = await device.next_of("command")
        app.drop()
        with pytest.raises(CommandResultLost) as lost:
            await asyncio.wait_for(waiting, TIMEOUT)
        assert lost.value.command_id == command["command_id"]
    finally:
        await app.close()
