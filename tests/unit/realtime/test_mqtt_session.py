"""The MQTT session core without I/O: packets and the time in, exact actions out."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fleetwire.auth.principal import Principal, Role
from fleetwire.domain.clock import format_ms
from fleetwire.domain.close import Close
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.realtime.mqtt.session import (
    REFUSE_BUSY,
    REFUSE_NOT_AUTHORIZED,
    REFUSE_TOKEN,
    Inbound,
    MqttLimits,
    MqttSession,
    Run,
    SendBytes,
    matches,
    refusal,
    valid_filter,
)
from fleetwire.realtime.session import CloseSocket, PauseReading, ResumeReading
from fleetwire.transport.mqtt import codec
from fleetwire.transport.mqtt.codec import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)

T0 = 1_800_000_000_000
LIMITS = MqttLimits(rate=100, close_after=3, max_clock_skew_s=300, max_packet_bytes=4096, max_in_flight=4)


def session(
    version: codec.Version = 5, *, limits: MqttLimits = LIMITS, ttl_ms: int = 3_600_000, **connect: Any
) -> MqttSession:
    packet = Connect("d1", version, **connect)
    core = MqttSession(
        Principal("d1", Role.DEVICE, T0 + ttl_ms), packet, session_id="s1", limits=limits, now_ms=T0
    )
    core.start(T0)
    core.actions()
    core.connected()
    return core


def packets(core: MqttSession) -> list[Any]:
    """The actions, with written bytes decoded back to packets."""
    out: list[Any] = []
    for action in core.actions():
        if isinstance(action, SendBytes):
            decoder = codec.StreamDecoder(1 << 20)
            decoder.version = core.version
            out += decoder.feed(action.data)
        else:
            out.append(action)
    return out


def telemetry(
    packet_id: int | None = 1, body: bytes = b'{"data": {"t": 1}}', topic: str = "devices/d1/telemetry"
) -> Publish:
    return Publish(topic, body, 1 if packet_id else 0, packet_id)


def test_connack_5_says_what_is_offered() -> None:
    core = MqttSession(
        Principal("d1", Role.DEVICE, T0 + 1000),
        Connect("d1", 5, keep_alive=0, properties={codec.AUTH_METHOD: "jwt"}),
        session_id="s1",
        limits=LIMITS,
        now_ms=T0,
    )
    core.start(T0)
    [connack] = packets(core)
    assert connack == Connack(
        False,
        0,
        {
            codec.MAXIMUM_QOS: 1,
            codec.RETAIN_AVAILABLE: 0,
            codec.WILDCARD_AVAILABLE: 1,
            codec.SUBSCRIPTION_ID_AVAILABLE: 0,
            codec.SHARED_AVAILABLE: 0,
            codec.MAXIMUM_PACKET_SIZE: 4096,
            codec.RECEIVE_MAXIMUM: 4,
            codec.SERVER_KEEP_ALIVE: 1200,  # keep-alive 0 becomes the maximum
            codec.SESSION_EXPIRY: 0,
            codec.AUTH_METHOD: "jwt",
        },
    )


def test_refusal_connacks() -> None:
    assert refusal(Connect("d1", 4), REFUSE_TOKEN, "x") == b"\x20\x02\x00\x04"
    assert refusal(Connect("d1", 4), REFUSE_NOT_AUTHORIZED, "x") == b"\x20\x02\x00\x05"
    assert refusal(Connect("d1", 4), REFUSE_BUSY, "x") == b"\x20\x02\x00\x03"
    assert refusal(Connect("d1", 5), REFUSE_TOKEN, "no") == codec.encode(
        Connack(False, 0x86, {codec.REASON_STRING: "no"}), 5
    )


def test_telemetry_is_run_and_acked_when_completed_in_arrival_order() -> None:
    """Two QoS 1 publishes: the second completes first, PUBACKs still go 1 then 2."""
    core = session()
    core.receive(telemetry(1), T0)
    core.receive(telemetry(2, b'{"records": [{"data": {"t": 2}}]}'), T0)
    first, second = (a.request for a in core.actions())
    assert (first.type, first.packet_id, second.type) == ("telemetry", 1, "telemetry_batch")
    core.completed(second, None, T0)
    assert packets(core) == []
    core.completed(first, None, T0)
    assert packets(core) == [PubAck(1), PubAck(2)]


def test_qos0_telemetry_gets_no_puback() -> None:
    core = session()
    core.receive(telemetry(None), T0)
    [run] = core.actions()
    core.completed(run.request, None, T0)
    assert packets(core) == []


@pytest.mark.parametrize("version", [4, 5])
def test_an_invalid_publish_reports_to_the_errors_topic_with_its_packet_id(version: codec.Version) -> None:
    core = session(version)
    core.receive(Subscribe(1, (("devices/d1/errors", 0),)), T0)
    assert packets(core) == [Suback(1, (0,))]
    core.receive(telemetry(7, b'{"data": {}}'), T0)
    error, puback = packets(core)
    assert error.topic == "devices/d1/errors"
    body = orjson.loads(error.payload)
    assert (body["type"], body["id"], body["code"]) == ("error", 7, "invalid_message")
    assert puback == PubAck(7, 0x99 if version == 5 else 0)


def test_errors_are_not_sent_without_a_subscription_and_unknown_topics_are_0x90() -> None:
    core = session()
    core.receive(telemetry(3, b"{}", topic="devices/d1/nope"), T0)
    assert packets(core) == [PubAck(3, 0x90)]
    core.receive(telemetry(4, b"[1]"), T0)
    assert packets(core) == [PubAck(4, 0x99)]


def test_a_failed_request_gets_its_reason() -> None:
    core = session()
    core.receive(Publish("devices/d1/commands/c1/result", b'{"ok": true}', 1, 9), T0)
    [run] = core.actions()
    assert run.request.type == "command_result"
    assert run.request.value[0] == "c1"  # the topic names the command
    core.completed(run.request, FleetwireError(ErrorCode.NOT_FOUND, "no such command"), T0)
    assert packets(core) == [PubAck(9, 0x80)]


def test_another_devices_topic_is_0x87_on_5_and_closes_311() -> None:
    core = session(5)
    core.receive(telemetry(1, topic="devices/d2/telemetry"), T0)
    assert packets(core) == [PubAck(1, 0x87)]
    old = session(4)
    old.receive(telemetry(1, topic="devices/d2/telemetry"), T0)
    assert packets(old) == [CloseSocket(Close.PROTOCOL_ERROR, "protocol_error")]


def test_subscribe_rules() -> None:
    core = session(5)
    core.receive(
        Subscribe(
            2,
            (
                ("devices/d1/commands", 2),
                ("devices/d1/#", 0),
                ("devices/d2/#", 1),
                ("devices/+/commands", 1),
                ("$share/g/devices/d1/commands", 1),
                ("devices/d1/a#", 1),
            ),
        ),
        T0,
    )
    assert packets(core) == [Suback(2, (1, 0, 0x87, 0x87, 0x9E, 0x8F))]
    old = session(4)
    old.receive(Subscribe(2, (("devices/d2/#", 1), ("devices/d1/commands", 1))), T0)
    assert packets(old) == [Suback(2, (0x80, 1))]
    core.receive(Unsubscribe(3, ("devices/d1/#", "devices/d1/x")), T0)
    assert packets(core) == [Unsuback(3, (0, 0x11))]


def test_filters() -> None:
    assert [valid_filter(f) for f in ("a/+/b/#", "a/b#", "a/#/b", "", "a+/b", "#")] == [
        True,
        False,
        False,
        False,
        False,
        True,
    ]
    assert matches("devices/d1/#", "devices/d1/commands")
    assert matches("devices/d1/+", "devices/d1/errors")
    assert not matches("devices/d1/+", "devices/d1/commands/x")
    assert not matches("devices/d1/commands", "devices/d1")


def command(command_id: str, expires_ms: int = T0 + 60_000) -> dict[str, Any]:
    return {
        "type": "command",
        "command_id": command_id,
        "name": "n",
        "params": {},
        "issued_at": format_ms(T0),
        "expires_at": format_ms(expires_ms),
    }


def test_commands_wait_for_the_subscription_then_go_as_qos1_without_type() -> None:
    core = session()
    core.command(command("c1"), T0)
    assert packets(core) == []
    core.receive(Subscribe(1, (("devices/d1/commands", 1),)), T0)
    suback, publish = packets(core)
    assert suback == Suback(1, (1,))
    assert (publish.topic, publish.qos, publish.packet_id, publish.dup) == (
        "devices/d1/commands",
        1,
        1,
        False,
    )
    assert orjson.loads(publish.payload) == {k: v for k, v in command("c1").items() if k != "type"}
    core.receive(PubAck(1), T0)
    core.command(command("c2"), T0)
    assert [p.packet_id for p in packets(core)] == [2]


def test_the_devices_receive_maximum_bounds_unacked_commands() -> None:
    core = session(properties={codec.RECEIVE_MAXIMUM: 1})
    core.receive(Subscribe(1, (("devices/d1/commands", 1),)), T0)
    core.actions()
    core.command(command("c1"), T0)
    core.command(command("c2"), T0)
    assert [orjson.loads(p.payload)["command_id"] for p in packets(core)] == ["c1"]
    core.receive(PubAck(1), T0)
    assert [orjson.loads(p.payload)["command_id"] for p in packets(core)] == ["c2"]


def test_a_persistent_session_resends_unacked_with_dup_and_drops_expired() -> None:
    core = session(4, clean_start=False)
    assert core.persistent
    core.receive(Subscribe(1, (("devices/d1/commands", 1),)), T0)
    core.command(command("c1"), T0)
    core.command(command("short", T0 + 10), T0)
    core.actions()
    state = core.persisted(T0)
    assert state is not None
    assert [c.packet_id for c in state.unacked] == [1, 2]
    again = MqttSession(
        Principal("d1", Role.DEVICE, T0 + 3_600_000),
        Connect("d1", 4, clean_start=False),
        session_id="s2",
        limits=LIMITS,
        now_ms=T0 + 100,
        restored=state,
    )
    again.start(T0 + 100)
    connack, resent = packets(again)
    assert connack == Connack(True, 0)
    assert (resent.packet_id, resent.dup, orjson.loads(resent.payload)["command_id"]) == (1, True, "c1")
    clean = MqttSession(
        Principal("d1", Role.DEVICE, T0 + 3_600_000),
        Connect("d1", 4),
        session_id="s3",
        limits=LIMITS,
        now_ms=T0,
        restored=state,
    )
    clean.start(T0)
    assert packets(clean) == [Connack(False, 0)]
    assert clean.persisted(T0) is None


def test_5_persistence_needs_a_session_expiry() -> None:
    assert not session(5, clean_start=False).persistent
    assert session(5, clean_start=False, properties={codec.SESSION_EXPIRY: 10}).persistent


def test_requests_wait_for_connected_and_reading_pauses_at_the_cap() -> None:
    core = MqttSession(
        Principal("d1", Role.DEVICE, T0 + 3_600_000),
        Connect("d1", 5),
        session_id="s",
        limits=LIMITS,
        now_ms=T0,
    )
    core.start(T0)
    core.actions()
    for packet_id in (1, 2, 3, 4):
        core.receive(telemetry(packet_id), T0)
    assert core.actions() == [PauseReading()]  # the 4th reaches max_in_flight
    core.connected()
    runs = core.actions()
    assert [a.request.packet_id for a in runs] == [1, 2, 3, 4]
    for run in runs:
        core.completed(run.request, None, T0)
    assert packets(core) == [PubAck(1), ResumeReading(), PubAck(2), PubAck(3), PubAck(4)]


def test_keep_alive_timeout_at_one_and_a_half_times() -> None:
    core = session(5, keep_alive=10)
    assert core.next_deadline_ms() == T0 + 15_000
    core.timer(T0 + 14_999)
    assert packets(core) == []
    core.receive(PingReq(), T0 + 14_999)
    assert packets(core) == [PingResp()]
    core.timer(T0 + 29_999)
    assert packets(core) == [Disconnect(0x8D), CloseSocket(Close.SERVER_SHUTDOWN, "server_shutdown")]
    assert core.disconnect_reason(None) == "timeout"


def test_token_expiry_and_reauthentication() -> None:
    core = session(5, ttl_ms=10_000, properties={codec.AUTH_METHOD: "jwt"})
    core.receive(Auth(0x19, {codec.AUTH_METHOD: "jwt", codec.AUTH_DATA: b"tok"}), T0)
    [run] = core.actions()
    assert (run.request.type, run.request.value) == ("auth", "tok")
    assert core.reauthenticate(Principal("d1", Role.DEVICE, T0 + 20_000)) is None
    core.completed(run.request, None, T0)
    assert packets(core) == [Auth(0, {codec.AUTH_METHOD: "jwt"})]
    core.timer(T0 + 10_000)
    assert packets(core) == []
    core.receive(PingReq(), T0 + 19_000)
    core.actions()
    core.timer(T0 + 20_000)
    assert packets(core) == [Disconnect(0xA0), CloseSocket(Close.TOKEN_EXPIRED, "token_expired")]
    assert core.disconnect_reason(None) == "token_expired"


def test_reauthentication_rules() -> None:
    without = session(5)
    without.receive(Auth(0x19, {codec.AUTH_METHOD: "jwt", codec.AUTH_DATA: b"t"}), T0)
    assert packets(without) == [Disconnect(0x82), CloseSocket(Close.PROTOCOL_ERROR, "protocol_error")]
    core = session(5, properties={codec.AUTH_METHOD: "jwt"})
    assert core.reauthenticate(Principal("d2", Role.DEVICE, T0 + 1)) is not None
    core.receive(Auth(0x19, {codec.AUTH_METHOD: "jwt", codec.AUTH_DATA: b"t"}), T0)
    [run] = core.actions()
    core.completed(run.request, FleetwireError(ErrorCode.UNAUTHORIZED, "bad"), T0)
    assert packets(core) == [Disconnect(0x87), CloseSocket(Close.FORBIDDEN, "forbidden")]


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (Publish("devices/d1/telemetry", b"{}", 2, 1), 0x9B),
        (Publish("devices/d1/telemetry", b"{}", 1, 1, retain=True), 0x9A),
        (Publish("devices/d1/telemetry", b"{}", 1, 1, properties={codec.TOPIC_ALIAS: 1}), 0x94),
        (Subscribe(1, (("devices/d1/x", 1),), {0x0B: [1]}), 0xA1),
        (Connect("d1"), 0x82),
        (Connack(), 0x82),
    ],
)
def test_protocol_errors_disconnect_with_their_reason(packet: codec.Packet, reason: int) -> None:
    core = session(5)
    core.receive(packet, T0)
    assert packets(core) == [Disconnect(reason), CloseSocket(Close.PROTOCOL_ERROR, "protocol_error")]


def test_decoder_errors_and_server_closes_map_to_reason_codes() -> None:
    core = session(5)
    core.protocol_error(0x95, T0)
    assert packets(core) == [Disconnect(0x95), CloseSocket(Close.MESSAGE_TOO_BIG, "message_too_big")]
    replaced = session(5)
    replaced.close(Close.REPLACED, T0)
    assert packets(replaced) == [Disconnect(0x8E), CloseSocket(Close.REPLACED, "replaced")]
    assert replaced.disconnect_reason(None) == "replaced"
    old = session(4)
    old.close(Close.REPLACED, T0)
    assert packets(old) == [CloseSocket(Close.REPLACED, "replaced")]


def test_a_close_waits_for_accepted_publishes_within_the_grace() -> None:
    core = session(5)
    core.receive(telemetry(1), T0)
    [run] = core.actions()
    core.close(Close.SERVER_SHUTDOWN, T0)
    assert packets(core) == [PauseReading()]
    core.completed(run.request, None, T0)
    assert packets(core) == [
        PubAck(1),
        Disconnect(0x8B),
        CloseSocket(Close.SERVER_SHUTDOWN, "server_shutdown"),
    ]
    stuck = session(5)
    stuck.receive(telemetry(1), T0)
    stuck.actions()
    stuck.close(Close.SERVER_SHUTDOWN, T0)
    stuck.actions()
    assert stuck.next_deadline_ms() == T0 + 2000
    stuck.timer(T0 + 2000)
    assert packets(stuck) == [Disconnect(0x8B), CloseSocket(Close.SERVER_SHUTDOWN, "server_shutdown")]


def test_device_disconnect_is_a_normal_close_without_a_packet() -> None:
    core = session(5, properties={codec.SESSION_EXPIRY: 0})
    core.receive(Disconnect(0, {codec.SESSION_EXPIRY: 5}), T0)  # 0 -> >0 is a protocol error
    assert packets(core) == [Disconnect(0x82), CloseSocket(Close.PROTOCOL_ERROR, "protocol_error")]
    kept = session(5, properties={codec.SESSION_EXPIRY: 60})
    kept.receive(Disconnect(0, {codec.SESSION_EXPIRY: 0}), T0)
    assert packets(kept) == [CloseSocket(Close.NORMAL, "normal")]
    assert not kept.persistent
    assert kept.disconnect_reason(1000) == "closed"


def test_rate_limit_refuses_then_disconnects() -> None:
    limits = MqttLimits(rate=1, close_after=2, max_clock_skew_s=300, max_packet_bytes=4096)
    core = session(5, limits=limits)
    core.receive(telemetry(1), T0)
    [run] = core.actions()
    core.receive(telemetry(2), T0)
    assert packets(core) == []  # refused, acked in order after 1
    core.completed(run.request, None, T0)
    assert packets(core) == [PubAck(1), PubAck(2, 0x97)]
    core.receive(telemetry(3), T0)
    assert packets(core) == [Disconnect(0x96), CloseSocket(Close.RATE_LIMITED, "rate_limited")]


def test_too_many_held_commands_close_as_a_slow_consumer() -> None:
    limits = MqttLimits(rate=100, close_after=3, max_clock_skew_s=300, max_packet_bytes=4096, max_held=2)
    core = session(5, limits=limits)
    core.command(command("c1"), T0)
    core.command(command("c2"), T0)
    core.command(command("c3"), T0)
    assert packets(core) == [Disconnect(0x97), CloseSocket(Close.SLOW_CONSUMER, "slow_consumer")]


def test_inbound_is_a_plain_record() -> None:
    entry = Inbound("status", "on", 1)
    assert (entry.done, entry.error) == (False, None)
    assert isinstance(Run(entry).request, Inbound)


def test_twin_delta_waits_for_the_subscription_latest_only() -> None:
    core = session(5)
    core.twin_delta({"type": "twin_delta", "version": 2, "delta": {"a": 1}})
    core.twin_delta({"type": "twin_delta", "version": 3, "delta": {"a": 2}})
    assert packets(core) == []
    core.receive(Subscribe(1, (("devices/d1/twin/#", 1),)), T0)
    assert packets(core) == [
        Suback(1, (1,)),
        Publish("devices/d1/twin/delta", b'{"version":3,"delta":{"a":2}}'),
    ]
    core.receive(Publish("devices/d1/twin/reported", b'{"reported": {"a": 2}}', 1, 4), T0)
    [run] = core.actions()
    assert run.request.type == "twin_report"


def test_subscriptions_per_session_are_capped() -> None:
    limits = MqttLimits(
        rate=100, close_after=3, max_clock_skew_s=300, max_packet_bytes=4096, max_subscriptions=2
    )
    core = session(5, limits=limits)
    core.receive(
        Subscribe(1, (("devices/d1/a", 1), ("devices/d1/b", 1), ("devices/d1/c", 1), ("devices/d1/a", 0))), T0
    )
    assert packets(core) == [Suback(1, (1, 1, 0x97, 0))]
