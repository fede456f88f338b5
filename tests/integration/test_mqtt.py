"""MQTT device transport (contract §8, issue 16) against a real server on real ports, with real
third-party clients: paho-mqtt (3.1.1 and 5.0, TCP and WebSocket), aiomqtt, and Debian's
mosquitto_pub / mosquitto_sub. Time the server decides by (keep-alive, token expiry) comes
from a ManualClock."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from typing import Any

import aiomqtt
import httpx
import pytest

from fleetwire.transport.mqtt import codec
from fleetwire.transport.mqtt.codec import AUTH_DATA, AUTH_METHOD
from tests.clock import ManualClock
from tests.integration.harness import Node
from tests.integration.mqtt_clients import PahoDevice, RawDevice, session_properties

pytestmark = pytest.mark.anyio


@pytest.fixture
async def mqtt_node(make_node: Callable[..., Node]) -> Node:
    node = make_node(mqtt_port=0)
    await node.register("d1", "d2")
    return node


@pytest.fixture
async def clocked(make_node: Callable[..., Node]) -> Node:
    node = make_node(mqtt_port=0, clock=ManualClock())
    await node.register("d1")
    return node


async def telemetry_of(node: Node, device_id: str) -> list[tuple[str, Any]]:
    """(key, value) of every stored point, newest first, over REST."""
    async with node.rest() as rest:
        response = await rest.get(f"/devices/{device_id}/telemetry")
        assert response.status_code == 200, response.text
        return [(item["key"], item["value"]) for item in response.json()["items"]]


# paho's callback API (VERSION2) reports a 3.1.1 CONNACK return code as the 5.0 reason code it
# stands for, one to one (paho.mqtt.client.convert_connack_rc_to_reason_code): 0x03 -> 0x88,
# 0x04 -> 0x86, 0x05 -> 0x87. `test_311_refusal_bytes` reads the raw 3.1.1 bytes too.
PAHO_311 = {0x03: 0x88, 0x04: 0x86, 0x05: 0x87}


@pytest.mark.parametrize("version", [4, 5])
async def test_connect_with_a_token_is_announced_with_transport_mqtt(mqtt_node: Node, version: int) -> None:
    """CONNECT with client id = device id and the JWT as password: CONNACK 0, and
    `device.connected` on /ws/client says `transport: mqtt`; the REST connection block agrees."""
    app = await mqtt_node.client()
    await app.request({"type": "subscribe", "devices": ["d1"], "events": ["presence"]})
    device = PahoDevice(mqtt_node.mqtt_port, "d1", version=version)
    connack = await device.connect(mqtt_node.token("d1", "device"))
    assert (connack.code, connack.session_present) == (0, False)
    event = await app.event("device.connected")
    assert event["data"]["transport"] == "mqtt"
    assert event["data"]["node"] == mqtt_node.settings.node_id
    async with mqtt_node.rest() as rest:
        connection = (await rest.get("/devices/d1/connection")).json()
    assert connection["connected"] is True
    assert connection["session_id"] == event["data"]["session_id"]
    async with httpx.AsyncClient(base_url=mqtt_node.http_url, timeout=5) as http:
        metrics = (await http.get("/metrics")).text
    assert 'fleetwire_device_sessions_by_transport{transport="mqtt"} 1.0' in metrics
    assert 'fleetwire_device_sessions_by_transport{transport="websocket"} 0.0' in metrics
    assert 'fleetwire_device_sessions_opened_total{transport="mqtt"} 1.0' in metrics
    if version == 5:
        props = connack.properties
        assert props.MaximumQoS == 1
        assert props.RetainAvailable == 0
        assert props.MaximumPacketSize == mqtt_node.settings.max_message_bytes
    device.disconnect()
    gone = await app.event("device.disconnected")
    assert gone["data"]["reason"] == "closed"


@pytest.mark.parametrize(
    ("case", "v311", "v5"),
    [
        ("bad_token", 0x04, 0x86),
        ("no_password", 0x04, 0x86),
        ("wrong_role", 0x05, 0x87),
        ("unknown_device", 0x05, 0x87),
        ("disabled_device", 0x05, 0x87),
        ("client_id_not_sub", 0x05, 0x87),
    ],
)
@pytest.mark.parametrize("version", [4, 5])
async def test_refusals_have_the_exact_connack_codes(
    mqtt_node: Node, case: str, v311: int, v5: int, version: int
) -> None:
    """Refused before any session: the CONNACK code of §8, and no presence at all."""
    client_id, token = "d1", mqtt_node.token("d1", "device")
    if case == "bad_token":
        token = token[:-4] + "AAAA"
    elif case == "no_password":
        token = None  # type: ignore[assignment]  # no password at all
    elif case == "wrong_role":
        token = mqtt_node.token("d1", "operator")
    elif case == "unknown_device":
        client_id, token = "ghost", mqtt_node.token("ghost", "device")
    elif case == "disabled_device":
        async with mqtt_node.rest() as rest:
            assert (await rest.patch("/devices/d2", json={"disabled": True})).status_code == 200
        client_id, token = "d2", mqtt_node.token("d2", "device")
    else:
        client_id = "d2"  # the token's sub is d1
    device = PahoDevice(mqtt_node.mqtt_port, client_id, version=version)
    connack = await device.connect(token)
    assert connack.code == (v5 if version == 5 else PAHO_311[v311])
    device.stop()
    async with mqtt_node.rest() as rest:
        assert (await rest.get("/connections")).json()["items"] == []


@pytest.mark.parametrize("version", [4, 5])
async def test_connection_limit_refuses_with_0x03_or_0x97(
    make_node: Callable[..., Node], version: int
) -> None:
    node = make_node(mqtt_port=0, max_connections=1)
    await node.register("d1", "d2")
    first = PahoDevice(node.mqtt_port, "d1", version=version)
    assert (await first.connect(node.token("d1", "device"))).code == 0
    second = PahoDevice(node.mqtt_port, "d2", version=version)
    assert (await second.connect(node.token("d2", "device"))).code == (
        0x97 if version == 5 else PAHO_311[0x03]
    )
    second.stop()
    first.disconnect()


@pytest.mark.parametrize("version", [4, 5])
async def test_telemetry_is_acked_only_once_queryable(mqtt_node: Node, version: int) -> None:
    """QoS 1 telemetry (single and batch): when the PUBACK arrives, REST returns the records."""
    device = PahoDevice(mqtt_node.mqtt_port, "d1", version=version)
    await device.connect(mqtt_node.token("d1", "device"))
    mid = await device.publish(
        "devices/d1/telemetry", json.dumps({"ts": 1_700_000_000_000, "data": {"t": 21.5}})
    )
    assert (await device.next("puback", mid=mid)).code == 0
    assert await telemetry_of(mqtt_node, "d1") == [("t", 21.5)]
    batch = {
        "records": [
            {"ts": 1_700_000_001_000, "data": {"t": 22}},
            {"ts": 1_700_000_002_000, "data": {"t": 23}},
        ]
    }
    mid = await device.publish("devices/d1/telemetry", json.dumps(batch))
    assert (await device.next("puback", mid=mid)).code == 0
    assert await telemetry_of(mqtt_node, "d1") == [("t", 23), ("t", 22), ("t", 21.5)]
    device.disconnect()


@pytest.mark.parametrize("version", [4, 5])
async def test_invalid_telemetry_is_refused_with_its_error_on_the_errors_topic(
    mqtt_node: Node, version: int
) -> None:
    """Never stored; the §2.1 error object (id = the packet id) on devices/d1/errors; 5.0
    PUBACK 0x99; a bad JSON payload likewise; the session goes on (a valid one is stored)."""
    device = PahoDevice(mqtt_node.mqtt_port, "d1", version=version)
    await device.connect(mqtt_node.token("d1", "device"))
    assert (await device.subscribe("devices/d1/errors", 1)).codes == [1]
    mid = await device.publish("devices/d1/telemetry", json.dumps({"data": {"t": "x" * 2000}}))
    error = await device.next("message", topic="devices/d1/errors")
    body = json.loads(error.payload)
    assert body["type"] == "error"
    assert body["id"] == mid
    assert body["code"] == "invalid_message"
    assert body["details"][0]["loc"] == ["data", "t"]
    assert (await device.next("puback", mid=mid)).code == (0x99 if version == 5 else 0)
    mid = await device.publish("devices/d1/telemetry", b"{not json")
    assert (
        json.loads((await device.next("message", topic="devices/d1/errors")).payload)["code"]
        == "invalid_json"
    )
    assert (await device.next("puback", mid=mid)).code == (0x99 if version == 5 else 0)
    assert await telemetry_of(mqtt_node, "d1") == []
    mid = await device.publish("devices/d1/telemetry", json.dumps({"data": {"t": 1}}))
    assert (await device.next("puback", mid=mid)).code == 0
    assert len(await telemetry_of(mqtt_node, "d1")) == 1
    device.disconnect()


async def test_publish_and_subscribe_outside_the_devices_topics_are_not_authorized_on_5(
    mqtt_node: Node,
) -> None:
    """5.0: PUBACK 0x87 for another device's topic (nothing stored), SUBACK 0x87 outside
    devices/d1/#, 0x9E for a shared subscription; the session goes on."""
    device = PahoDevice(mqtt_node.mqtt_port, "d1", version=5)
    await device.connect(mqtt_node.token("d1", "device"))
    mid = await device.publish("devices/d2/telemetry", json.dumps({"data": {"t": 1}}))
    assert (await device.next("puback", mid=mid)).code == 0x87
    assert (await device.subscribe("devices/d2/commands")).codes == [0x87]
    assert (await device.subscribe("devices/+/commands")).codes == [0x87]
    assert (await device.subscribe("#")).codes == [0x87]
    assert (await device.subscribe("$share/g/devices/d1/commands")).codes == [0x9E]
    assert (await device.subscribe("devices/d1/#")).codes == [1]
    assert await telemetry_of(mqtt_node, "d2") == []
    mid = await device.publish("devices/d1/telemetry", json.dumps({"data": {"t": 1}}))
    assert (await device.next("puback", mid=mid)).code == 0
    device.disconnect()


async def test_outside_topics_on_311_suback_0x80_and_a_publish_closes(mqtt_node: Node) -> None:
    device = PahoDevice(mqtt_node.mqtt_port, "d1", version=4)
    await device.connect(mqtt_node.token("d1", "device"))
    assert (await device.subscribe("devices/d2/#")).codes == [0x80]
    assert (await device.subscribe("devices/d1/commands")).codes == [1]
    await device.publish("devices/d2/telemetry", json.dumps({"data": {"t": 1}}))
    await device.next("disconnect")
    device.stop()
    assert await telemetry_of(mqtt_node, "d2") == []


@pytest.mark.parametrize("version", [4, 5])
async def test_command_from_a_client_reaches_the_device_and_its_result_the_issuer(
    mqtt_node: Node, version: int
) -> None:
    device = PahoDevice(mqtt_node.mqtt_port, "d1", version=version)
    await device.connect(mqtt_node.token("d1", "device"))
    await device.subscribe("devices/d1/commands")
    operator = await mqtt_node.client("operator")
    ack = await operator.request(
        {"type": "command", "device_id": "d1", "name": "reboot", "params": {"in": 5}}
    )
    assert ack["state"] == "sent"
    command = await device.next("message", topic="devices/d1/commands")
    assert command.qos == 1
    body = json.loads(command.payload)
    assert body["command_id"] == ack["command_id"]
    assert (body["name"], body["params"]) == ("reboot", {"in": 5})
    assert "type" not in body
    result = {"ok": True, "result": {"done": True}}
    mid = await device.publish(f"devices/d1/commands/{ack['command_id']}/result", json.dumps(result))
    assert (await device.next("puback", mid=mid)).code == 0
    outcome = await operator.next_of("command_result")
    assert (outcome["command_id"], outcome["state"], outcome["result"]) == (
        ack["command_id"],
        "succeeded",
        {"done": True},
    )
    device.disconnect()


async def test_queued_commands_are_delivered_once_the_device_subscribes(mqtt_node: Node) -> None:
    operator = await mqtt_node.client("operator")
    ids = []
    for name in ("first", "second"):
        ack = await operator.request({"type": "command", "device_id": "d1", "name": name, "queue": True})
        assert ack["state"] == "pending"
        ids.append(ack["command_id"])
    device = PahoDevice(mqtt_node.mqtt_port, "d1", version=5)
    await device.connect(mqtt_node.token("d1", "device"))
    await device.subscribe("devices/d1/commands")
    got = [json.loads((await device.next("message", topic="devices/d1/commands")).payload) for _ in ids]
    assert [c["command_id"] for c in got] == ids
    device.disconnect()


@pytest.mark.parametrize("version", [4, 5])
async def test_a_persistent_session_keeps_subscriptions_and_resends_unacked_commands_with_dup(
    mqtt_node: Node, version: int
) -> None:
    """3.1.1 CleanSession 0 / 5.0 Clean Start 0 + Session Expiry > 0: the next CONNACK says
    session present; a command the device never acknowledged comes again with DUP, and a
    command queued meanwhile flows without a new SUBSCRIBE."""
    token = mqtt_node.token("d1", "device")
    props = session_properties(600) if version == 5 else None
    device = PahoDevice(mqtt_node.mqtt_port, "d1", version=version, clean=False, auto_ack=False)
    assert (await device.connect(token, properties=props)).session_present is False
    await device.subscribe("devices/d1/commands")
    operator = await mqtt_node.client("operator")
    await operator.request({"type": "subscribe", "devices": ["d1"], "events": ["presence"]})
    first = await operator.request({"type": "command", "device_id": "d1", "name": "one", "timeout_s": 600})
    unacked = await device.next("message", topic="devices/d1/commands")
    assert (json.loads(unacked.payload)["command_id"], unacked.dup) == (first["command_id"], False)
    device.stop()  # gone without a PUBACK
    assert (await operator.event("device.disconnected"))["data"]["reason"] == "closed"
    again = PahoDevice(mqtt_node.mqtt_port, "d1", version=version, clean=False)
    second = await operator.request(
        {"type": "command", "device_id": "d1", "name": "two", "queue": True, "timeout_s": 600}
    )
    connack = await again.connect(token, properties=props)
    assert connack.session_present is True
    resent = await again.next("message", topic="devices/d1/commands")
    assert (json.loads(resent.payload)["command_id"], resent.dup) == (first["command_id"], True)
    queued = await again.next("message", topic="devices/d1/commands")
    assert (json.loads(queued.payload)["command_id"], queued.dup) == (second["command_id"], False)
    again.disconnect()


@pytest.mark.parametrize("version", [4, 5])
async def test_keep_alive_expiry_is_reason_timeout(clocked: Node, version: int) -> None:
    """No packet for 1.5 × keep-alive (on the server's clock) ends the session: presence
    reason `timeout`, 5.0 DISCONNECT 0x8D first. At 1.4 × it is still there."""
    app = await clocked.client()
    await app.request({"type": "subscribe", "devices": ["d1"], "events": ["presence"]})
    device = PahoDevice(clocked.mqtt_port, "d1", version=version)
    await device.connect(clocked.token("d1", "device"), keepalive=100)
    await app.event("device.connected")
    clocked.advance(140)
    mid = await device.publish("devices/d1/status", json.dumps({"status": "alive"}))
    assert (await device.next("puback", mid=mid)).code == 0  # the sentinel: still connected
    clocked.advance(149.9)  # 1.499 × 100 s after that publish
    mid = await device.publish("devices/d1/status", json.dumps({"status": "later"}))
    assert (await device.next("puback", mid=mid)).code == 0
    clocked.advance(150)
    gone = await app.event("device.disconnected")
    assert gone["data"]["reason"] == "timeout"
    disconnect = await device.next("disconnect")
    if version == 5:
        assert disconnect.code == 0x8D
    device.stop()


@pytest.mark.parametrize("version", [4, 5])
async def test_a_second_connect_replaces_the_first(mqtt_node: Node, version: int) -> None:
    app = await mqtt_node.client()
    await app.request({"type": "subscribe", "devices": ["d1"], "events": ["presence"]})
    token = mqtt_node.token("d1", "device")
    first = PahoDevice(mqtt_node.mqtt_port, "d1", version=version)
    await first.connect(token)
    one = await app.event("device.connected")
    second = PahoDevice(mqtt_node.mqtt_port, "d1", version=version)
    await second.connect(token)
    replaced = await app.event("device.disconnected")
    assert replaced["data"] == {
        **replaced["data"],
        "session_id": one["data"]["session_id"],
        "reason": "replaced",
    }
    two = await app.event("device.connected")
    assert two["data"]["session_id"] != one["data"]["session_id"]
    disconnect = await first.next("disconnect")
    if version == 5:
        assert disconnect.code == 0x8E
    first.stop()
    mid = await second.publish("devices/d1/telemetry", json.dumps({"data": {"t": 1}}))
    assert (await second.next("puback", mid=mid)).code == 0
    second.disconnect()


async def test_token_expiry_disconnects_0xA0_unless_reauthenticated(clocked: Node) -> None:
    """5.0: a device that connected with Authentication Method `jwt` refreshes with AUTH 0x19
    (answered AUTH 0x00) and stays past its first token's exp; the one that did not gets
    DISCONNECT 0xA0 and the reason `token_expired`. paho (hence aiomqtt) and the mosquitto
    clients have no 5.0 re-authentication: the refreshing device is a raw client on the codec;
    the expiring one is paho."""
    await clocked.register("d2")
    app = await clocked.client()
    await app.request({"type": "subscribe", "devices": ["d1", "d2"], "events": ["presence"]})
    refreshing = await RawDevice.open(clocked.mqtt_port)
    connack = await refreshing.connect(
        "d1", None, {AUTH_METHOD: "jwt", AUTH_DATA: clocked.token("d1", "device", ttl_s=60).encode()}
    )
    assert (connack.reason_code, connack.properties[AUTH_METHOD]) == (0, "jwt")
    expiring = PahoDevice(clocked.mqtt_port, "d2", version=5)
    assert (await expiring.connect(clocked.token("d2", "device", ttl_s=60))).code == 0
    clocked.advance(30)
    fresh = clocked.token("d1", "device", ttl_s=600)
    await refreshing.send(codec.Auth(0x19, {AUTH_METHOD: "jwt", AUTH_DATA: fresh.encode()}))
    assert await refreshing.recv() == codec.Auth(0, {AUTH_METHOD: "jwt"})
    clocked.advance(31)
    gone = await app.event("device.disconnected")
    assert (gone["device_id"], gone["data"]["reason"]) == ("d2", "token_expired")
    assert (await expiring.next("disconnect")).code == 0xA0
    await refreshing.send(codec.Publish("devices/d1/status", b'{"status": "on"}', 1, 5))
    assert await refreshing.recv() == codec.PubAck(5)  # still connected past the first exp
    expiring.stop()
    await refreshing.close()


async def test_a_refused_reauthentication_disconnects_0x87(clocked: Node) -> None:
    """AUTH with a token of another device: DISCONNECT 0x87, reason `forbidden`."""
    device = await RawDevice.open(clocked.mqtt_port)
    await device.connect("d1", None, {AUTH_METHOD: "jwt", AUTH_DATA: clocked.token("d1", "device").encode()})
    other = clocked.token("d9", "device")
    await device.send(codec.Auth(0x19, {AUTH_METHOD: "jwt", AUTH_DATA: other.encode()}))
    assert await device.recv() == codec.Disconnect(0x87)
    await device.close()


async def test_311_refusal_bytes(mqtt_node: Node) -> None:
    """The raw 3.1.1 CONNACKs: 0x04 for a bad token, 0x05 for another device's id."""
    for client_id, token, code in (
        ("d1", "not-a-jwt", 0x04),
        ("d2", mqtt_node.token("d1", "device"), 0x05),
    ):
        raw = await RawDevice.open(mqtt_node.mqtt_port, version=4)
        assert await raw.connect(client_id, token.encode()) == codec.Connack(False, code)
        await raw.close()


async def test_mqtt_over_websocket(mqtt_node: Node) -> None:
    """GET /mqtt with subprotocol `mqtt` on the main port: the same session (paho's
    WebSocket transport)."""
    device = PahoDevice(mqtt_node.port, "d1", version=5, transport="websockets")
    assert (await device.connect(mqtt_node.token("d1", "device"))).code == 0
    mid = await device.publish("devices/d1/telemetry", json.dumps({"data": {"t": 7}}))
    assert (await device.next("puback", mid=mid)).code == 0
    assert await telemetry_of(mqtt_node, "d1") == [("t", 7)]
    device.disconnect()


async def test_aiomqtt_publishes_and_receives_a_command(mqtt_node: Node) -> None:
    operator = await mqtt_node.client("operator")
    async with asyncio.timeout(10):
        async with aiomqtt.Client(
            "127.0.0.1",
            mqtt_node.mqtt_port,
            identifier="d1",
            username="d1",
            password=mqtt_node.token("d1", "device"),
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            await client.publish("devices/d1/telemetry", json.dumps({"data": {"t": 3}}), qos=1)
            assert await telemetry_of(mqtt_node, "d1") == [("t", 3)]
            await client.subscribe("devices/d1/commands", qos=1)
            ack = await operator.request({"type": "command", "device_id": "d1", "name": "blink"})
            async for message in client.messages:
                assert str(message.topic) == "devices/d1/commands"
                assert json.loads(message.payload)["command_id"] == ack["command_id"]  # type: ignore[arg-type]
                break


async def test_mosquitto_pub_and_sub(mqtt_node: Node) -> None:
    """Debian's mosquitto clients: mosquitto_pub with QoS 1 returns once acked, and the record is
    then queryable; mosquitto_sub receives a command (mosquitto_sub -C 1)."""
    token = mqtt_node.token("d1", "device")
    common = ["-h", "127.0.0.1", "-p", str(mqtt_node.mqtt_port), "-i", "d1", "-u", "d1", "-P", token]
    published = await asyncio.to_thread(
        subprocess.run,
        [
            "mosquitto_pub",
            *common,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "devices/d1/telemetry",
            "-m",
            '{"data":{"t":9}}',
        ],
        capture_output=True,
        timeout=10,
    )
    assert published.returncode == 0, published.stderr
    assert await telemetry_of(mqtt_node, "d1") == [("t", 9)]
    operator = await mqtt_node.client("operator")
    await operator.request({"type": "subscribe", "devices": ["d1"], "events": ["presence"]})
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub",
        *common,
        "-V",
        "mqttv311",
        "-q",
        "1",
        "-t",
        "devices/d1/commands",
        "-C",
        "1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await operator.event("device.connected")
        ack = await operator.request({"type": "command", "device_id": "d1", "name": "ping"})
        out, err = await asyncio.wait_for(sub.communicate(), 10)
    finally:
        if sub.returncode is None:
            sub.kill()
    assert sub.returncode == 0, err
    assert json.loads(out)["command_id"] == ack["command_id"]


@pytest.mark.parametrize("version", [4, 5])
async def test_a_packet_over_the_size_limit_ends_the_connection(
    make_node: Callable[..., Node], version: int
) -> None:
    """FLEETWIRE_MAX_MESSAGE_BYTES caps a packet: 5.0 DISCONNECT 0x95, 3.1.1 close; nothing of
    it is stored and the refusal comes from the fixed header, before the body is read."""
    node = make_node(mqtt_port=0, max_message_bytes=2048)
    await node.register("d1")
    device = await RawDevice.open(node.mqtt_port, version=version)
    connack = await device.connect("d1", node.token("d1", "device").encode())
    assert isinstance(connack, codec.Connack)
    assert connack.reason_code == 0
    body = json.dumps({"data": {"k": "x" * 1000, "j": "y" * 1000}}).encode()
    await device.send(codec.Publish("devices/d1/telemetry", body, 1, 1))
    if version == 5:
        assert await device.recv() == codec.Disconnect(0x95)
    with pytest.raises(ConnectionError):
        await device.recv()
    await device.close()
    assert await telemetry_of(node, "d1") == []


async def test_a_text_frame_on_mqtt_over_websocket_closes(mqtt_node: Node) -> None:
    """MQTT over WebSocket is binary frames only (MQTT 5.0 §6): a text frame closes (1003)."""
    from websockets.asyncio.client import connect

    async with asyncio.timeout(10):
        ws = await connect(f"{mqtt_node.ws_url}/mqtt", subprotocols=["mqtt"])  # type: ignore[list-item]
        assert ws.subprotocol == "mqtt"
        await ws.send("hello")
        await ws.wait_closed()
        assert ws.close_code == 1003


@pytest.mark.parametrize("version", [4, 5])
async def test_twin_delta_and_reported(mqtt_node: Node, version: int) -> None:
    """A desired change set before the device connects reaches it on devices/d1/twin/delta once
    it subscribes; a publish to devices/d1/twin/reported is acked after the write, and the
    delta it closes arrives empty."""
    async with mqtt_node.rest("operator") as rest:
        changed = await rest.patch("/devices/d1/twin", json={"desired": {"led": "on"}})
        assert changed.status_code == 200, changed.text
    version_before = changed.json()["version"]
    device = PahoDevice(mqtt_node.mqtt_port, "d1", version=version)
    await device.connect(mqtt_node.token("d1", "device"))
    await device.subscribe("devices/d1/twin/delta", 1)
    delta = await device.next("message", topic="devices/d1/twin/delta")
    assert json.loads(delta.payload) == {"version": version_before, "delta": {"led": "on"}}
    mid = await device.publish("devices/d1/twin/reported", json.dumps({"reported": {"led": "on"}}))
    assert (await device.next("puback", mid=mid)).code == 0
    closed = await device.next("message", topic="devices/d1/twin/delta")
    assert json.loads(closed.payload) == {"version": version_before + 1, "delta": {}}
    async with mqtt_node.rest() as rest:
        twin = (await rest.get("/devices/d1/twin")).json()
    assert (twin["reported"], twin["delta"]) == ({"led": "on"}, {})
    device.disconnect()
