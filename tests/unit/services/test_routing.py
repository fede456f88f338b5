"""NodeRouter: a message or a close for a session, on this node or through the broker."""

from __future__ import annotations

import orjson
import pytest

from fleetwire.domain.close import Close
from tests.unit.services.fakes import ADMIN, FakeClientSession, Node

pytestmark = pytest.mark.anyio


def client_on(node: Node) -> FakeClientSession:
    session = FakeClientSession(ADMIN, node.clock.now_ms())
    node.services.sessions.opened(session)
    return session


async def test_local_send_and_close(node: Node) -> None:
    """A target on this node is served directly: the JSON message is sent, a close closes
    (suppressed when asked, and always for `replaced`)."""
    router = node.services.router
    a, b, c = client_on(node), client_on(node), client_on(node)
    await router.send("n1", a.session_id, {"type": "x", "n": 1})
    assert a.sent == [orjson.dumps({"type": "x", "n": 1})]
    await router.close("n1", a.session_id, Close.FORBIDDEN)
    await router.close("n1", b.session_id, Close.FORBIDDEN, suppress=True)
    await router.close("n1", c.session_id, Close.REPLACED)
    assert (a.closes, b.closes, c.closes) == ([Close.FORBIDDEN], [Close.FORBIDDEN], [Close.REPLACED])
    assert node.services.sessions.local.suppressed == {b.session_id, c.session_id}


async def test_remote_send_reaches_the_other_node(pair: tuple[Node, Node]) -> None:
    """A message for a session on another node travels through the broker to it."""
    n1, n2 = pair
    target = client_on(n2)
    await n1.services.router.send("n2", target.session_id, {"type": "command_result", "id": "c1"})
    assert target.messages() == [{"type": "command_result", "id": "c1"}]


async def test_remote_close_reaches_the_other_node(pair: tuple[Node, Node]) -> None:
    """A close for a session on another node closes it there, with `suppress` carried over
    (and implied by `replaced`)."""
    n1, n2 = pair
    plain, quiet, replaced = client_on(n2), client_on(n2), client_on(n2)
    router = n1.services.router
    await router.close("n2", plain.session_id, Close.TOKEN_EXPIRED)
    await router.close("n2", quiet.session_id, Close.FORBIDDEN, suppress=True)
    await router.close("n2", replaced.session_id, Close.REPLACED)
    assert (plain.closes, quiet.closes, replaced.closes) == (
        [Close.TOKEN_EXPIRED],
        [Close.FORBIDDEN],
        [Close.REPLACED],
    )
    assert n2.services.sessions.local.suppressed == {quiet.session_id, replaced.session_id}


async def test_a_command_reaches_a_device_on_another_node(pair: tuple[Node, Node]) -> None:
    """A command issued on n1 for a device connected to n2 is delivered by n2's session."""
    from fleetwire.domain.commands import CommandRequest
    from tests.unit.services.fakes import OPERATOR

    n1, n2 = pair
    await n1.register("d1")
    await n2.seen("d1", "device.registered")
    session = await n2.connect("d1")
    command = await n1.services.commands.issue(OPERATOR, CommandRequest("d1", "ping", {}, 30, False, None))
    assert [(m["type"], m["command_id"]) for m in session.messages()] == [("command", command.id)]


async def test_on_message_send_close_and_unknown(node: Node) -> None:
    """The broker handler sends, closes (suppress from the message or implied by 4009) and
    ignores unknown kinds and unknown sessions."""
    router = node.services.router
    a, b, c = client_on(node), client_on(node), client_on(node)
    router.on_message({"kind": "send", "session_id": a.session_id, "message": {"type": "hi"}})
    router.on_message({"kind": "send", "session_id": "nobody", "message": {"type": "hi"}})
    router.on_message({"kind": "close", "session_id": a.session_id, "code": 4003, "suppress": False})
    router.on_message({"kind": "close", "session_id": b.session_id, "code": 4003, "suppress": True})
    router.on_message({"kind": "close", "session_id": c.session_id, "code": 4009})
    router.on_message({"kind": "close", "session_id": "nobody", "code": 4003})
    router.on_message({"kind": "teleport", "session_id": a.session_id})
    assert a.messages() == [{"type": "hi"}]
    assert (a.closes, b.closes, c.closes) == ([Close.FORBIDDEN], [Close.FORBIDDEN], [Close.REPLACED])
    assert node.services.sessions.local.suppressed == {b.session_id, c.session_id}
