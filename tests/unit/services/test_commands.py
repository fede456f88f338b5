"""CommandService: issue, route, queue, answer, time out and wait for commands."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from fleetwire.auth.principal import Principal, Role
from fleetwire.broker.base import EncodedEvent
from fleetwire.domain.clock import format_ms
from fleetwire.domain.commands import Command, CommandRequest, CommandState
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.store.base import EventWrite
from tests.unit.services.fakes import (
    LIMIT_S,
    OPERATOR,
    VIEWER,
    FakeClientSession,
    FakeDeviceSession,
    Node,
    make_node,
    running,
    until,
)

pytestmark = pytest.mark.anyio


def request(
    device_id: str = "d1",
    name: str = "reboot",
    *,
    params: dict[str, Any] | None = None,
    timeout_s: int = 30,
    queue: bool = False,
    key: str | None = None,
) -> CommandRequest:
    return CommandRequest(device_id, name, params or {}, timeout_s, queue, key)


async def issue(node: Node, wanted: CommandRequest, issuer: FakeClientSession | None = None) -> Command:
    session_id = issuer.session_id if issuer is not None else None
    node_id = node.services.node_id if issuer is not None else None
    coro = node.services.commands.issue(OPERATOR, wanted, issuer_node=node_id, issuer_session=session_id)
    return await asyncio.wait_for(coro, LIMIT_S)


def states(node: Node, device_id: str = "d1") -> list[tuple[str, str]]:
    """(command id, state) of each `command.updated` delivered, in order."""
    return [(d["command_id"], d["state"]) for d in node.log.data(device_id, "command.updated")]


def commands_sent(session: FakeDeviceSession) -> list[dict[str, Any]]:
    return [m for m in session.messages() if m["type"] == "command"]


def issuer(node: Node) -> FakeClientSession:
    client = FakeClientSession(OPERATOR, node.clock.now_ms())
    node.services.sessions.opened(client)
    return client


async def test_issue_to_an_online_device_sends_it(node: Node) -> None:
    """A command for a connected device is stored `sent`, its `command.updated` (sent) is
    delivered, and the device's session receives the `command` message."""
    await node.register("d1")
    session = await node.connect("d1")
    command = await issue(node, request(params={"delay": 5}))
    now = node.clock.now_ms()
    assert (command.state, command.sent_at_ms, command.expires_at_ms) == (
        CommandState.SENT,
        now,
        now + 30_000,
    )
    assert commands_sent(session) == [
        {
            "type": "command",
            "command_id": command.id,
            "name": "reboot",
            "params": {"delay": 5},
            "issued_at": format_ms(now),
            "expires_at": format_ms(now + 30_000),
        }
    ]
    await node.seen("d1", "command.updated")
    assert states(node) == [(command.id, "sent")]


async def test_issue_to_an_offline_device_is_refused(node: Node) -> None:
    """Without `queue`, a command for an offline device is `device_offline` and not stored."""
    await node.register("d1")
    with pytest.raises(FleetwireError) as caught:
        await issue(node, request())
    assert caught.value == FleetwireError(ErrorCode.DEVICE_OFFLINE, "device is not connected")
    assert await node.services.commands.list_for_device("d1", None, 10, None) == []


async def test_queued_commands_are_delivered_on_connect_in_order(node: Node) -> None:
    """Queued commands wait `pending` and are sent, in issue order, when the device connects."""
    await node.register("d1")
    first = await issue(node, request(name="one", queue=True))
    second = await issue(node, request(name="two", queue=True))
    assert (first.state, second.state) == (CommandState.PENDING, CommandState.PENDING)
    session = await node.connect("d1")
    await until(lambda: len(commands_sent(session)) == 2)
    assert [(m["command_id"], m["name"]) for m in commands_sent(session)] == [
        (first.id, "one"),
        (second.id, "two"),
    ]
    await node.seen("d1", "command.updated", 4)
    assert states(node) == [
        (first.id, "pending"),
        (second.id, "pending"),
        (first.id, "sent"),
        (second.id, "sent"),
    ]
    assert (await node.services.commands.get(first.id)).state is CommandState.SENT


async def test_the_queue_of_an_offline_device_is_bounded() -> None:
    """An offline device queues at most max_pending_commands; one more is `too_large`."""
    async with running(make_node(max_pending_commands=2)) as node:
        await node.register("d1")
        await issue(node, request(queue=True))
        await issue(node, request(queue=True))
        with pytest.raises(FleetwireError) as caught:
            await issue(node, request(queue=True))
        assert caught.value == FleetwireError(ErrorCode.TOO_LARGE, "the device already has 2 queued commands")


async def test_same_idempotency_key_returns_the_same_command(node: Node) -> None:
    """The same key from the same issuer returns the earlier command; nothing new is stored."""
    await node.register("d1")
    await node.connect("d1")
    first = await issue(node, request(key="k1"))
    again = await issue(node, request(key="k1"))
    assert again.id == first.id
    assert [c.id for c in await node.services.commands.list_for_device("d1", None, 10, None)] == [first.id]


async def test_idempotency_key_for_another_command_is_a_conflict(node: Node) -> None:
    """A key reused for another device (or name) is a `conflict`."""
    await node.register("d1")
    await node.register("d2")
    await node.connect("d1")
    await node.connect("d2")
    await issue(node, request(key="k1"))
    for other in (request("d2", key="k1"), request("d1", "other", key="k1")):
        with pytest.raises(FleetwireError) as caught:
            await issue(node, other)
        assert caught.value == FleetwireError(
            ErrorCode.CONFLICT, "this idempotency_key was used for another command"
        )


async def test_a_viewer_may_not_send_commands(node: Node) -> None:
    """Sending needs the operator role: a viewer is `forbidden`."""
    await node.register("d1")
    with pytest.raises(FleetwireError) as caught:
        await node.services.commands.issue(VIEWER, request())
    assert caught.value == FleetwireError(ErrorCode.FORBIDDEN, "sending commands needs the operator role")


async def test_a_device_outside_the_claim_is_forbidden(node: Node) -> None:
    """An operator whose `devices` claim excludes the device is `forbidden`."""
    await node.register("d1")
    restricted = Principal("olga", Role.OPERATOR, 2**62, ("other-*",))
    with pytest.raises(FleetwireError) as caught:
        await node.services.commands.issue(restricted, request())
    assert caught.value == FleetwireError(ErrorCode.FORBIDDEN, "device outside your `devices` claim")


async def test_unknown_and_disabled_devices_are_refused(node: Node) -> None:
    """An unknown device is `not_found`, a disabled one `forbidden`."""
    await node.register("d2", disabled=True)
    with pytest.raises(FleetwireError) as unknown:
        await issue(node, request("nope"))
    assert unknown.value == FleetwireError(ErrorCode.NOT_FOUND, "no such device")
    with pytest.raises(FleetwireError) as disabled:
        await issue(node, request("d2", queue=True))
    assert disabled.value == FleetwireError(ErrorCode.FORBIDDEN, "device is disabled")


async def test_a_device_deleted_before_the_insert_is_not_found(node: Node) -> None:
    """A device gone between the read and the insert of its command is `not_found`."""
    node.store.phantoms.add("ghost")
    with pytest.raises(FleetwireError) as caught:
        await issue(node, request("ghost", queue=True))
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such device")


async def test_result_ok_succeeds_and_tells_the_issuer(node: Node) -> None:
    """A successful result makes the command `succeeded`, sends `command_result` to the
    issuing session and delivers `command.updated` (succeeded) after `sent`."""
    await node.register("d1")
    await node.connect("d1")
    client = issuer(node)
    command = await issue(node, request(), client)
    node.clock.advance(0.25)
    done = await node.services.commands.result("d1", command.id, True, {"uptime": 7}, None)
    at = node.clock.now_ms()
    assert (done.state, done.result, done.completed_at_ms) == (CommandState.SUCCEEDED, {"uptime": 7}, at)
    assert client.messages() == [
        {
            "type": "command_result",
            "command_id": command.id,
            "device_id": "d1",
            "state": "succeeded",
            "result": {"uptime": 7},
            "error": None,
            "at": format_ms(at),
        }
    ]
    await node.seen("d1", "command.updated", 2)
    assert states(node) == [(command.id, "sent"), (command.id, "succeeded")]


async def test_result_not_ok_fails(node: Node) -> None:
    """A result with ok false makes the command `failed` with the device's error."""
    await node.register("d1")
    await node.connect("d1")
    command = await issue(node, request())
    done = await node.services.commands.result("d1", command.id, False, None, {"code": "busy"})
    assert (done.state, done.result, done.error) == (CommandState.FAILED, None, {"code": "busy"})


async def test_result_for_another_device_is_not_found(node: Node) -> None:
    """A result naming another device's command, or an unknown command, is `not_found`."""
    await node.register("d1")
    await node.register("d2")
    await node.connect("d1")
    command = await issue(node, request())
    for device_id, command_id in (("d2", command.id), ("d1", "nope")):
        with pytest.raises(FleetwireError) as caught:
            await node.services.commands.result(device_id, command_id, True, None, None)
        assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such command for this device")
    assert (await node.services.commands.get(command.id)).state is CommandState.SENT


async def test_timeout_of_a_sent_command(node: Node) -> None:
    """When its timeout passes on the clock, a sent command is `timed_out`, the issuer is
    told and a late result is a `conflict`."""
    await node.register("d1")
    await node.connect("d1")
    client = issuer(node)
    command = await issue(node, request(timeout_s=5), client)
    node.clock.advance(4.9)
    await node.services.tasks.drain(LIMIT_S)
    assert (await node.services.commands.get(command.id)).state is CommandState.SENT
    node.clock.advance(0.1)
    await until(lambda: len(client.sent) == 1)
    assert client.messages()[0]["state"] == "timed_out"
    stored = await node.services.commands.get(command.id)
    assert (stored.state, stored.completed_at_ms) == (CommandState.TIMED_OUT, command.expires_at_ms)
    with pytest.raises(FleetwireError) as caught:
        await node.services.commands.result("d1", command.id, True, None, None)
    assert caught.value == FleetwireError(
        ErrorCode.CONFLICT, "command is timed_out; the result was not applied"
    )
    await node.seen("d1", "command.updated", 2)
    assert states(node) == [(command.id, "sent"), (command.id, "timed_out")]


async def test_timeout_of_a_queued_command_expires_it(node: Node) -> None:
    """A queued command never delivered ends `expired` when its timeout passes."""
    await node.register("d1")
    command = await issue(node, request(timeout_s=2, queue=True))
    node.clock.advance(2)
    await node.seen("d1", "command.updated", 2)
    assert states(node) == [(command.id, "pending"), (command.id, "expired")]
    assert (await node.services.commands.get(command.id)).state is CommandState.EXPIRED


async def test_a_result_that_wins_the_race_with_the_timeout(node: Node) -> None:
    """A result and an expiry racing: the compare-and-set lets the result win, the expiry
    changes nothing and records nothing."""
    await node.register("d1")
    await node.connect("d1")
    command = await issue(node, request())
    commands = node.services.commands
    done, _ = await asyncio.wait_for(
        asyncio.gather(commands.result("d1", command.id, True, None, None), commands.expire(command.id)),
        LIMIT_S,
    )
    assert done.state is CommandState.SUCCEEDED
    await node.settle()
    assert states(node) == [(command.id, "sent"), (command.id, "succeeded")]


async def test_expire_leaves_final_and_unknown_commands(node: Node) -> None:
    """expire does nothing for a command already final or unknown."""
    await node.register("d1")
    await node.connect("d1")
    command = await issue(node, request())
    await node.services.commands.result("d1", command.id, True, None, None)
    await node.services.commands.expire(command.id)
    await node.services.commands.expire("nope")
    await node.settle()
    assert (await node.services.commands.get(command.id)).state is CommandState.SUCCEEDED
    assert states(node) == [(command.id, "sent"), (command.id, "succeeded")]


async def test_sweep_ends_commands_no_local_timer_covers(node: Node) -> None:
    """The sweep expires due commands this process has no timer for (left by a previous
    process): a sent one `timed_out`, a pending one `expired`, a future one untouched."""
    await node.register("d1")
    now = node.clock.now_ms()

    def left(command_id: str, state: CommandState, expires_at_ms: int) -> Command:
        return Command(command_id, "d1", "x", {}, state, now - 60_000, expires_at_ms, "olga")

    store = node.store
    await store.create_command(left("c1", CommandState.SENT, now - 1))
    await store.create_command(left("c2", CommandState.PENDING, now - 1))
    await store.create_command(left("c3", CommandState.SENT, now + 60_000))
    await node.services.commands.sweep()
    got = {c: (await node.services.commands.get(c)).state for c in ("c1", "c2", "c3")}
    assert got == {"c1": CommandState.TIMED_OUT, "c2": CommandState.EXPIRED, "c3": CommandState.SENT}


async def test_get_and_list(node: Node) -> None:
    """get of an unknown command is `not_found`; the list is newest first, by state, paged."""
    await node.register("d1")
    first = await issue(node, request(queue=True))
    second = await issue(node, request(queue=True))
    commands = node.services.commands
    with pytest.raises(FleetwireError) as caught:
        await commands.get("nope")
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such command")
    assert [c.id for c in await commands.list_for_device("d1", None, 10, None)] == [second.id, first.id]
    assert [c.id for c in await commands.list_for_device("d1", None, 10, second.id)] == [first.id]
    assert await commands.list_for_device("d1", CommandState.SENT, 10, None) == []


async def test_wait_returns_when_the_command_ends(node: Node) -> None:
    """wait() blocked on a sent command returns the final command as soon as its
    `command.updated` (succeeded) reaches this node's hub."""
    await node.register("d1")
    await node.connect("d1")
    command = await issue(node, request())
    commands = node.services.commands
    waiting = asyncio.ensure_future(commands.wait(command.id, LIMIT_S))
    await until(lambda: command.id in commands._waiters)
    await commands.result("d1", command.id, True, {"ok": 1}, None)
    ended = await asyncio.wait_for(waiting, LIMIT_S)
    assert ended is not None
    assert (ended.id, ended.state) == (command.id, CommandState.SUCCEEDED)
    assert commands._waiters == {}


async def test_wait_on_other_events_keeps_waiting(node: Node) -> None:
    """A `command.updated` that is not final wakes wait(), which reads the command again and
    keeps waiting until it ends."""
    await node.register("d1")
    await node.connect("d1")
    command = await issue(node, request())
    commands = node.services.commands
    waiting = asyncio.ensure_future(commands.wait(command.id, LIMIT_S))
    await until(lambda: command.id in commands._waiters)
    again = EventWrite("d1", "command.updated", node.clock.now_ms(), command.event_data())
    await node.services.writer.submit(again)  # `sent` again: not final
    await until(lambda: command.id not in commands._waiters)
    await until(lambda: command.id in commands._waiters)
    assert not waiting.done()
    await commands.result("d1", command.id, False, None, {"code": "no"})
    ended = await asyncio.wait_for(waiting, LIMIT_S)
    assert ended is not None
    assert ended.state is CommandState.FAILED


async def test_wait_without_waiting(node: Node) -> None:
    """wait() returns at once: None for an unknown command, the command when it is final,
    and the current command when the timeout is 0."""
    await node.register("d1")
    await node.connect("d1")
    command = await issue(node, request())
    commands = node.services.commands
    assert await asyncio.wait_for(commands.wait("nope", LIMIT_S), LIMIT_S) is None
    current = await asyncio.wait_for(commands.wait(command.id, 0), LIMIT_S)
    assert current is not None
    assert current.state is CommandState.SENT
    await commands.result("d1", command.id, True, None, None)
    final = await asyncio.wait_for(commands.wait(command.id, LIMIT_S), LIMIT_S)
    assert final is not None
    assert final.state is CommandState.SUCCEEDED


async def test_wait_deadline_follows_the_clock(node: Node) -> None:
    """wait(timeout_s=5) returns the command still `sent` when the Clock passes 5 s."""
    await node.register("d1")
    await node.connect("d1")
    command = await issue(node, request(timeout_s=60))
    waiting = asyncio.ensure_future(node.services.commands.wait(command.id, 5))
    try:
        await until(lambda: command.id in node.services.commands._waiters)
        node.clock.advance(6)
        await until(waiting.done, steps=500)
        current = waiting.result()
        assert current is not None
        assert current.state is CommandState.SENT
        assert node.services.commands._waiters == {}
    finally:
        waiting.cancel()


async def test_on_event_ignores_other_events(node: Node) -> None:
    """The hub listener ignores events other than `command.updated` and `command.updated`
    of other commands: a waiter stays blocked until its own command's event."""
    await node.register("d1")
    await node.connect("d1")
    command = await issue(node, request())
    commands = node.services.commands
    commands.on_event(EncodedEvent("d1", 90, "command.updated", "command", b"{}"))  # nobody waits yet
    waiting = asyncio.ensure_future(commands.wait(command.id, LIMIT_S))
    await until(lambda: command.id in commands._waiters)
    [future] = commands._waiters[command.id]
    other = orjson.dumps({"data": {"command_id": "other"}})
    commands.on_event(EncodedEvent("d1", 91, "device.status", "status", b"{}"))
    commands.on_event(EncodedEvent("d1", 92, "command.updated", "command", other))
    assert not future.done()
    await commands.result("d1", command.id, True, None, None)
    ended = await asyncio.wait_for(waiting, LIMIT_S)
    assert ended is not None
    assert ended.state is CommandState.SUCCEEDED


async def test_close_cancels_the_timers(node: Node) -> None:
    """close() cancels every command timer (at shutdown): none is left pending."""
    await node.register("d1")
    before = node.clock.pending
    await issue(node, request(queue=True))
    await issue(node, request(queue=True))
    assert node.clock.pending == before + 2
    node.services.commands.close()
    assert node.clock.pending == before


async def test_commands_beyond_the_issuing_cap_are_refused_at_once() -> None:
    """Issue 12, admission control: with FLEETWIRE_MAX_ISSUING_COMMANDS=2 and the database
    holding every command insert, a third concurrent command is `rate_limited` at once,
    without waiting; once the first two finish, commands are accepted again."""
    from fleetwire.store.memory import MemoryStore

    gate = asyncio.Event()

    class HeldStore(MemoryStore):
        async def create_command(self, command: Command) -> Command:
            await gate.wait()
            return await super().create_command(command)

    async with running(make_node(store=HeldStore(), max_issuing_commands=2)) as node:  # type: ignore[arg-type]  # a MemoryStore, as FlakyStore is
        await node.register("d1")
        await node.connect("d1")
        held = [asyncio.ensure_future(issue(node, request(name=f"c{n}"))) for n in range(2)]
        await until(lambda: node.services.commands._issuing == 2)
        with pytest.raises(FleetwireError) as refused:
            await issue(node, request(name="c2"))
        assert refused.value.code is ErrorCode.RATE_LIMITED
        gate.set()
        assert [c.state for c in await asyncio.gather(*held)] == [CommandState.SENT] * 2
        assert (await issue(node, request(name="c3"))).state is CommandState.SENT
