"""The session core (realtime/session.py) driven with messages and a time value only:
no socket, no event loop, no real clock. Each test states one rule of the module docstring."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fleetwire.auth.principal import Principal, Role
from fleetwire.domain.close import Close
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.events import Event
from fleetwire.realtime.protocol import Request
from fleetwire.realtime.session import (
    PAUSE,
    PING,
    RESUME,
    Action,
    Call,
    CloseSocket,
    Send,
    SendFrame,
    Session,
    SessionLimits,
)
from fleetwire.services.subscriptions import SubscriptionPlan

T0 = 1_795_000_000_000  # ms
HOUR = 3_600_000
STATUS = b'{"type":"status","id":"%d","status":"on"}'


def limits(**overrides: Any) -> SessionLimits:
    values: dict[str, Any] = {
        "rate": 1000.0,
        "close_after": 3,
        "warning_s": 60.0,
        "max_clock_skew_s": 300.0,
        "heartbeat_s": 20.0,
        "max_in_flight": 4,
        "close_grace_s": 2.0,
        "max_held": 3,
        **overrides,
    }
    return SessionLimits(**values)


def device(**overrides: Any) -> Session:
    principal = Principal("d1", Role.DEVICE, T0 + HOUR)
    return Session(principal, session_id="s1", is_device=True, limits=limits(**overrides), now_ms=T0)


def client(**overrides: Any) -> Session:
    principal = Principal("app", Role.OPERATOR, T0 + HOUR)
    return Session(principal, session_id="s2", is_device=False, limits=limits(**overrides), now_ms=T0)


def sent(actions: list[Action]) -> list[dict[str, Any]]:
    return [orjson.loads(a.payload) for a in actions if isinstance(a, Send)]


def calls(actions: list[Action]) -> list[Request]:
    return [a.request for a in actions if isinstance(a, Call)]


def status(n: int) -> bytes:
    return STATUS % n


def test_welcome_of_a_device_and_of_a_client() -> None:
    """The first message names the session; a device learns heartbeat_s, a client its role."""
    d = device()
    d.welcome(T0, "d1")
    assert sent(d.actions()) == [
        {
            "type": "welcome",
            "device_id": "d1",
            "session_id": "s1",
            "server_time": "2026-11-18T11:06:40.000Z",
            "token_expires_at": "2026-11-18T12:06:40.000Z",
            "heartbeat_s": 20.0,
        }
    ]
    c = client()
    c.welcome(T0)
    assert sent(c.actions())[0]["role"] == "operator"


def test_a_device_request_waits_for_device_connected() -> None:
    """Requests received before `device.connected` is recorded run only after it, in order."""
    d = device()
    d.receive(status(1), True, T0)
    d.receive(status(2), True, T0 + 1)
    assert d.actions() == []
    d.connected()
    assert [r.id for r in calls(d.actions())] == ["1", "2"]
    d.receive(status(3), True, T0 + 2)
    assert [r.id for r in calls(d.actions())] == ["3"]
    assert d.last_seen_ms == T0 + 2


def test_a_client_request_runs_at_once_and_replies_in_completion_order() -> None:
    """Each request is one Call; each completion sends its reply as it comes."""
    c = client()
    c.receive(b'{"type":"unsubscribe","id":1,"subscription_id":"x"}', True, T0)
    c.receive(b'{"type":"unsubscribe","id":2,"subscription_id":"y"}', True, T0)
    assert [r.id for r in calls(c.actions())] == [1, 2]
    c.completed(b'{"type":"ack","id":2}', T0)
    c.failed(Request("unsubscribe", 1, "x"), FleetwireError(ErrorCode.NOT_FOUND, "no such subscription"), T0)
    assert [(m["type"], m["id"]) for m in sent(c.actions())] == [("ack", 2), ("error", 1)]
    assert c.in_flight == 0


def test_bad_messages_are_answered_at_once_without_a_call() -> None:
    """An invalid message costs no call: its error reply is the only action."""
    d = device()
    d.connected()
    d.receive(b"{nope", True, T0)
    d.receive(b"\x00\x01", False, T0)
    replies = sent(d.actions())
    assert [m["code"] for m in replies] == ["invalid_json", "invalid_message"]
    assert d.in_flight == 0


def test_reading_pauses_at_the_in_flight_cap_and_resumes_below_it() -> None:
    """At max_in_flight accepted requests the core pauses reading; a completion resumes it."""
    d = device(max_in_flight=2)
    d.connected()
    d.receive(status(1), True, T0)
    assert [type(a) for a in d.actions()] == [Call]
    d.receive(status(2), True, T0)
    assert d.actions()[0] == PAUSE
    d.completed(b"{}", T0)
    assert d.actions() == [Send(b"{}"), RESUME]


def test_messages_read_past_the_cap_wait_for_a_free_slot() -> None:
    """The transport may deliver the rest of a read buffer after the pause: those requests
    wait, parsed, and run one per completion, never more than max_in_flight at once."""
    d = device(max_in_flight=2)
    d.connected()
    for n in range(5):
        d.receive(status(n), True, T0)
    actions = d.actions()
    assert [r.id for r in calls(actions)] == ["0", "1"]
    assert actions.count(PAUSE) == 1
    assert (d.running, d.in_flight) == (2, 5)
    d.completed(b"a0", T0)
    assert [r.id for r in calls(d.actions())] == ["2"]
    for reply in (b"a1", b"a2", b"a3"):
        d.completed(reply, T0)
    assert d.actions()[-1] == RESUME  # 1 in flight: below the cap again
    assert (d.running, d.in_flight) == (1, 1)


def test_a_server_close_waits_for_replies_of_accepted_requests() -> None:
    """Replies of requests already accepted leave before the close frame (issue 13.11)."""
    d = device()
    d.connected()
    d.receive(status(1), True, T0)
    d.actions()
    d.close(Close.SERVER_SHUTDOWN, T0)
    assert d.actions() == [PAUSE]
    d.receive(status(2), True, T0)  # nothing more is read once closing
    assert d.actions() == []
    d.completed(b'{"type":"ack","id":"1"}', T0 + 5)
    assert d.actions() == [
        Send(b'{"type":"ack","id":"1"}'),
        CloseSocket(Close.SERVER_SHUTDOWN, "server_shutdown"),
    ]
    assert d.disconnect_reason(1000) == "server_shutdown"


def test_a_close_gives_up_waiting_after_the_grace_period() -> None:
    """A call that never finishes delays the close by close_grace_s, no longer."""
    d = device(close_grace_s=2.0)
    d.connected()
    d.receive(status(1), True, T0)
    d.close(Close.REPLACED, T0)
    d.actions()
    assert d.next_deadline_ms() == T0 + 2000
    d.timer(T0 + 1999)
    assert d.actions() == []
    d.timer(T0 + 2000)
    assert d.actions() == [CloseSocket(Close.REPLACED, "replaced")]
    d.completed(b"late", T0 + 3000)  # the socket is closing: nothing more is sent
    assert d.actions() == []


def test_requests_waiting_for_connected_are_still_answered_by_a_closing_session() -> None:
    """A close before `device.connected` waits (within the grace period) for the requests
    it accepted: they run once the event is recorded, and their replies precede the close."""
    d = device()
    d.receive(status(1), True, T0)
    d.close(Close.REPLACED, T0)
    assert d.actions() == [PAUSE]
    d.connected()
    assert [r.id for r in calls(d.actions())] == ["1"]
    d.completed(b"ack-1", T0 + 1)
    assert d.actions() == [Send(b"ack-1"), CloseSocket(Close.REPLACED, "replaced")]


def test_requests_waiting_for_connected_are_dropped_when_the_grace_ends() -> None:
    """If `device.connected` is not recorded within close_grace_s, the session closes
    anyway and the waiting requests never run."""
    d = device(close_grace_s=1.0)
    d.receive(status(1), True, T0)
    d.close(Close.SERVER_SHUTDOWN, T0)
    d.actions()
    d.timer(T0 + 1000)
    assert d.actions() == [CloseSocket(Close.SERVER_SHUTDOWN, "server_shutdown")]
    d.connected()
    assert d.actions() == []


def test_a_flood_gets_rate_limited_replies_then_4029_after_accepted_replies() -> None:
    """Past the bucket: `rate_limited` errors, then 4029 once accepted requests replied."""
    d = device(rate=2.0, close_after=2)
    d.connected()
    for n in range(4):
        d.receive(status(n), True, T0)
    actions = d.actions()
    assert len(calls(actions)) == 2
    assert [m["code"] for m in sent(actions)] == ["rate_limited", "rate_limited"]
    assert actions[-1] == PAUSE
    d.completed(b"a0", T0)
    d.completed(b"a1", T0)
    assert d.actions() == [Send(b"a0"), Send(b"a1"), CloseSocket(Close.RATE_LIMITED, "rate_limited")]


def test_heartbeat_pings_then_drops_a_silent_peer_with_reason_timeout() -> None:
    """A tick pings; a pong clears it; the next tick with no pong ends the session."""
    d = device()
    d.heartbeat(T0)
    assert d.actions() == [PING]
    d.pong(T0 + 10)
    d.heartbeat(T0 + 20_000)
    assert d.actions() == [PING]
    d.heartbeat(T0 + 40_000)
    assert d.actions() == [CloseSocket(Close.SERVER_SHUTDOWN, "timeout")]
    assert d.disconnect_reason(None) == "timeout"
    d.heartbeat(T0 + 60_000)
    assert d.actions() == []


def test_token_warns_then_closes_4001_and_a_refresh_moves_the_deadline() -> None:
    """`token_expiring` at exp - warning_s, 4001 at exp; an `auth` refresh moves both."""
    d = device()
    assert d.next_deadline_ms() == T0 + HOUR - 60_000
    d.timer(T0 + HOUR - 60_000)
    assert sent(d.actions()) == [{"type": "token_expiring", "expires_at": "2026-11-18T12:06:40.000Z"}]
    assert d.refresh(Principal("d1", Role.DEVICE, T0 + 2 * HOUR)) is None
    assert d.next_deadline_ms() == T0 + 2 * HOUR - 60_000
    d.timer(T0 + HOUR)
    assert d.actions() == []
    d.timer(T0 + 2 * HOUR - 60_000)
    d.timer(T0 + 2 * HOUR)
    assert d.actions()[-1] == CloseSocket(Close.TOKEN_EXPIRED, "token_expired")
    assert d.disconnect_reason(1000) == "token_expired"


def test_a_session_the_server_did_not_close_ended_closed() -> None:
    """The transport reports 1000 when it answered the peer's close (whatever code the peer
    sent) and None when TCP dropped: both are `closed`."""
    assert device().disconnect_reason(1000) == "closed"
    assert device().disconnect_reason(None) == "closed"


def _plan(events: list[Event], resume: dict[str, int]) -> SubscriptionPlan:
    return SubscriptionPlan(
        subscription_id="sub-1",
        events=frozenset({"status"}),
        snapshot=[{"device_id": "d1"}],
        recovered={"d1": True},
        replays={"d1": events},
        resume=resume,
        device_ids=["d1"],
    )


def test_subscribe_sends_ack_then_replay_then_held_live_events_newer_than_it() -> None:
    """Live events held during the replay follow it, minus those the replay covered."""
    c = client()
    request = Request("subscribe", 7, None)
    c.receive(b'{"type":"subscribe","id":7,"devices":["d1"]}', True, T0)
    c.actions()
    c.hold(["d1"])
    assert c.holding
    c.deliver("d1", 5, b"live-5")  # already part of the replay
    c.deliver("d1", 6, b"live-6")
    c.deliver("d2", 1, b"other")  # not held: straight out
    assert c.actions() == [SendFrame(b"other")]
    replay = [Event("d1", s, "device.status", T0, {"status": "x"}) for s in (4, 5)]
    c.subscribed(request, _plan(replay, {"d1": 3}), T0)
    actions = c.actions()
    first = orjson.loads(actions[0].payload)  # type: ignore[union-attr]  # a Send, checked below
    assert (first["type"], first["id"], first["recovered"]) == ("ack", 7, {"d1": True})
    assert [orjson.loads(a.payload)["seq"] for a in actions[1:3]] == [4, 5]  # type: ignore[union-attr]
    assert actions[3:] == [SendFrame(b"live-6")]
    assert not c.holding
    assert c.in_flight == 0


def test_too_many_held_events_close_4008() -> None:
    """A replay that lets more than max_held live events pile up ends in slow_consumer."""
    c = client(max_held=2)
    c.hold(["d1"])
    for seq in (1, 2, 3):
        c.deliver("d1", seq, b"e")
    assert c.actions() == [CloseSocket(Close.SLOW_CONSUMER, "slow_consumer")]
    assert c.close_code is Close.SLOW_CONSUMER


@pytest.mark.parametrize("code", [Close.FORBIDDEN, Close.REPLACED, Close.SERVER_SHUTDOWN])
def test_a_second_close_changes_nothing(code: Close) -> None:
    """The first close decides the code; later ones are ignored."""
    d = device()
    d.close(code, T0)
    d.close(Close.TOKEN_EXPIRED, T0)
    assert d.actions() == [CloseSocket(code, code.reason)]
    assert d.close_code is code
