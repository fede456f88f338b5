"""The sans-I/O session protocol: envelope, per-type validation, rate limit, token lifetime."""

from __future__ import annotations

import orjson
import pytest

from fleetwire.auth.principal import Principal, Role
from fleetwire.domain.close import Close
from fleetwire.realtime.protocol import (
    CloseWith,
    RateLimiter,
    Reply,
    Request,
    SessionProtocol,
    Subscribe,
    TokenLifetime,
)

NOW_MS = 1_764_093_600_000


def session(role: Role = Role.DEVICE, rate: float = 1000.0, close_after: int = 3) -> SessionProtocol:
    principal = Principal("d1", role, NOW_MS + 3_600_000)
    return SessionProtocol(
        principal,
        is_device=role is Role.DEVICE,
        rate=rate,
        close_after=close_after,
        warning_s=60,
        max_clock_skew_s=300,
    )


def reply_of(outcome: object) -> dict[str, object]:
    assert isinstance(outcome, Reply), outcome
    decoded: dict[str, object] = orjson.loads(outcome.payload)
    return decoded


@pytest.mark.parametrize(
    ("payload", "code", "echo"),
    [
        (b"{not json", "invalid_json", None),
        (b"[1,2]", "invalid_message", None),
        (b'{"id": 7}', "invalid_message", 7),
        (b'{"type": "nope", "id": "a"}', "unknown_type", "a"),
        (b'{"type": "subscribe", "id": 1}', "forbidden", 1),
        (b'{"type": "status", "id": {"x": 1}}', "invalid_message", None),
        (b'{"type": "status", "id": "' + b"x" * 65 + b'"}', "invalid_message", None),
        (b'{"type": "status", "status": "Bad!"}', "invalid_message", None),
        (b'{"type": "telemetry", "data": {"a": NaN}}', "invalid_json", None),
        (b'{"type": "telemetry", "data": {"a": 1e400}}', "invalid_json", None),  # overflows a double
    ],
)
def test_bad_messages_get_one_error_echoing_the_id(payload: bytes, code: str, echo: object) -> None:
    """Each bad message yields exactly one error reply with the contract's code."""
    reply = reply_of(session().receive(payload, 0.0, NOW_MS))
    assert reply["type"] == "error"
    assert reply["code"] == code
    assert reply["id"] == echo


def test_client_cannot_send_telemetry() -> None:
    """A client connection sending telemetry gets `forbidden` (issue 4)."""
    reply = reply_of(session(Role.VIEWER).receive(b'{"type":"telemetry","data":{"a":1}}', 0.0, NOW_MS))
    assert reply["code"] == "forbidden"


def test_valid_requests_are_parsed() -> None:
    """Valid messages come back as typed requests carrying their id."""
    device = session()
    outcome = device.receive(b'{"type":"status","id":"s","status":"online"}', 0.0, NOW_MS)
    assert outcome == Request("status", "s", "online")
    client = session(Role.OPERATOR)
    outcome = client.receive(b'{"type":"subscribe","id":2,"devices":["d1","site-*"]}', 0.0, NOW_MS)
    assert outcome == Request(
        "subscribe", 2, Subscribe(("d1", "site-*"), frozenset({"presence", "status"}), None)
    )


def test_rate_limit_errors_then_closes_4029() -> None:
    """Past the bucket, messages are refused with rate_limited, then the session closes."""
    proto = session(rate=2.0, close_after=3)
    message = b'{"type":"status","status":"on"}'
    assert isinstance(proto.receive(message, 10.0, NOW_MS), Request)
    assert isinstance(proto.receive(message, 10.0, NOW_MS), Request)
    assert reply_of(proto.receive(message, 10.0, NOW_MS))["code"] == "rate_limited"
    assert reply_of(proto.receive(message, 10.0, NOW_MS))["code"] == "rate_limited"
    last = proto.receive(message, 10.0, NOW_MS)
    assert isinstance(last, tuple)
    assert last[1] == CloseWith(Close.RATE_LIMITED)


def test_rate_limit_refills_and_forgives_after_a_quiet_second() -> None:
    """Tokens refill at the rate; refusals are forgotten after a second without one."""
    limiter = RateLimiter(rate=1.0, close_after=2)
    assert limiter.allow(100.0) is True
    assert limiter.allow(100.0) is False
    assert limiter.allow(101.5) is True  # refilled
    assert limiter.allow(101.5) is False  # a refusal 1.5 s after the last: count starts over
    assert limiter.allow(101.6) is None


def test_token_lifetime_warns_then_closes_and_renews() -> None:
    """token_expiring comes warning_s before exp, 4001 at exp; a refresh starts over."""
    life = TokenLifetime(expires_at_ms=100_000, warning_s=60)
    assert life.next_deadline_ms() == 40_000
    assert life.due(39_999) is None
    warning = reply_of(life.due(40_000))
    assert warning == {"type": "token_expiring", "expires_at": "1970-01-01T00:01:40.000Z"}
    assert life.due(50_000) is None
    assert life.due(100_000) == CloseWith(Close.TOKEN_EXPIRED)
    life.renew(200_000)
    assert life.due(100_000) is None
    assert life.next_deadline_ms() == 140_000


def test_refresh_must_keep_sub_and_role() -> None:
    """An auth refresh for another sub or a changed role is refused; the old expiry stands."""
    proto = session(Role.OPERATOR)
    before = proto.token.expires_at_ms
    problem = proto.refresh(Principal("d1", Role.VIEWER, before + 10_000))
    assert problem is not None
    assert problem.code == "forbidden"
    assert proto.token.expires_at_ms == before
    assert proto.refresh(Principal("d1", Role.OPERATOR, before + 10_000)) is None
    assert proto.token.expires_at_ms == before + 10_000
