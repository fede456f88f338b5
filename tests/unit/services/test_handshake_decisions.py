"""The WebSocket handshake's decisions: `decide_now` (no I/O, no task) takes the same decision
as awaiting the Handshake, and leaves to it (None) exactly what needs I/O."""

from __future__ import annotations

import pytest

from fleetwire.app import websocket_handshake
from fleetwire.auth.principal import Principal, Role
from fleetwire.realtime.endpoint import DeviceEndpoint
from fleetwire.realtime.handshake import Handshake
from fleetwire.settings import Settings
from fleetwire.transport.base import Handler, Refusal, UpgradeRequest
from tests.unit.services.fakes import Node

pytestmark = pytest.mark.anyio

HOUR_MS = 3_600_000


def handshake(node: Node) -> Handshake:
    settings = Settings(node_id=node.services.node_id, jwt_secret="x" * 32)
    return websocket_handshake(settings, node.services)


def token(node: Node, name: str, sub: str, role: Role) -> str:
    node.verifier.tokens[name] = Principal(sub=sub, role=role, expires_at_ms=node.clock.now_ms() + HOUR_MS)
    return name


def upgrade(path: str, bearer: str | None = None, **headers: str) -> UpgradeRequest:
    if bearer is not None:
        headers["authorization"] = f"Bearer {bearer}"
    return UpgradeRequest(path, {}, headers, "127.0.0.1:50000")


def status(answer: Handler | Refusal | None) -> int | str | None:
    """A refusal's status, else the kind of endpoint (None: no decision)."""
    if answer is None or isinstance(answer, Refusal):
        return None if answer is None else answer.status
    return type(answer).__name__


async def test_a_cached_device_is_admitted_without_waiting(node: Node) -> None:
    await node.register("d1")
    request = upgrade("/ws/device", token(node, "t1", "d1", Role.DEVICE))
    now = handshake(node).decide_now(request)
    assert isinstance(now, DeviceEndpoint)
    assert isinstance(await handshake(node)(request), DeviceEndpoint)


@pytest.mark.parametrize(
    ("path", "sub", "role", "headers", "expected"),
    [
        ("/ws/nowhere", "op", Role.OPERATOR, {}, 404),
        ("/ws/client", "op", Role.OPERATOR, {"origin": "https://evil.example"}, 403),
        ("/ws/client", "op", Role.OPERATOR, {}, "ClientEndpoint"),
        ("/ws/client", "d1", Role.DEVICE, {}, 403),
        ("/ws/device", "op", Role.OPERATOR, {}, 403),
        ("/ws/device", "not a device id!", Role.DEVICE, {}, 403),
        ("/ws/device", "d2", Role.DEVICE, {}, 403),  # disabled, and cached as such
    ],
)
async def test_decide_now_and_the_awaited_decision_agree(
    node: Node, path: str, sub: str, role: Role, headers: dict[str, str], expected: int | str
) -> None:
    await node.register("d2", disabled=True)
    request = upgrade(path, token(node, "t", sub, role), **headers)
    assert status(handshake(node).decide_now(request)) == expected
    assert status(await handshake(node)(request)) == expected


async def test_a_missing_or_bad_token_is_refused_at_once(node: Node) -> None:
    assert status(handshake(node).decide_now(upgrade("/ws/device"))) == 401
    assert status(handshake(node).decide_now(upgrade("/ws/device", "forged"))) == 401


async def test_what_needs_io_is_left_to_the_awaited_decision(node: Node) -> None:
    """None, never a wrong answer: a device the cache does not hold (it may have been
    registered on another node a moment ago), a key set to refresh, storage being probed."""
    shake = handshake(node)
    unknown = upgrade("/ws/device", token(node, "t-ghost", "ghost", Role.DEVICE))
    assert shake.decide_now(unknown) is None
    assert status(await shake(unknown)) == 403  # the store says: no such device

    await node.register("d1")
    rotated = upgrade("/ws/device", token(node, "t-rotated", "d1", Role.DEVICE))
    node.verifier.rotated.add("t-rotated")
    assert shake.decide_now(rotated) is None
    assert isinstance(await shake(rotated), DeviceEndpoint)
    assert node.verifier.refreshes == 1

    cached = upgrade("/ws/device", token(node, "t1", "d1", Role.DEVICE))
    node.services.writer.healthy = False  # an outage was seen: the next handshake probes
    assert shake.decide_now(cached) is None
    assert isinstance(await shake(cached), DeviceEndpoint)
    assert node.services.writer.healthy
    assert isinstance(shake.decide_now(cached), DeviceEndpoint)
