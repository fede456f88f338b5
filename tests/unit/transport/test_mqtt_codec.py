"""The MQTT codec: exact bytes of the packets of the subset, strictness on malformed input, and
properties: a round trip of every packet, no crash (only MalformedPacket) on arbitrary bytes."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetwire.transport.mqtt import codec
from fleetwire.transport.mqtt.codec import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    MalformedPacket,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    StreamDecoder,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
    encode,
    encode_varint,
)

# paho-mqtt 2.2's CONNECT of client "d1", keep-alive 60, user "u", password "pw", MQTT 3.1.1.
PAHO_311_CONNECT = bytes.fromhex("101500044d51545404c2003c000264310001750002" + "7077")


def decode_one(data: bytes, version: codec.Version | None = None, cap: int = 1 << 20) -> codec.Packet:
    decoder = StreamDecoder(cap)
    decoder.version = version
    packets = decoder.feed(data)
    assert len(packets) == 1
    return packets[0]


def test_varint_boundaries() -> None:
    """§1.5.5: 1 to 4 bytes, 127 / 128 / 16383 / 16384 / 268435455 at the edges."""
    assert encode_varint(0) == b"\x00"
    assert encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01"
    assert encode_varint(16383) == b"\xff\x7f"
    assert encode_varint(16384) == b"\x80\x80\x01"
    assert encode_varint(268_435_455) == b"\xff\xff\xff\x7f"
    with pytest.raises(ValueError, match="out of range"):
        encode_varint(268_435_456)


def test_decodes_a_real_311_connect() -> None:
    assert decode_one(PAHO_311_CONNECT) == Connect("d1", 4, True, 60, "u", b"pw")


def test_connect_5_with_properties_and_will() -> None:
    packet = Connect(
        "dev-1",
        5,
        False,
        30,
        None,
        b"token",
        Will("devices/dev-1/status", b"{}", 1, True, {codec.PAYLOAD_FORMAT: 1}),
        {codec.SESSION_EXPIRY: 3600, codec.AUTH_METHOD: "jwt", codec.AUTH_DATA: b"t"},
    )
    data = encode(packet, 5)
    assert decode_one(data) == packet


def test_exact_server_packets() -> None:
    """Byte for byte: what the server sends (CONNACK 5.0 with Maximum QoS 1, PUBACK 0x99 …)."""
    assert encode(Connack(False, 0x05), 4) == b"\x20\x02\x00\x05"
    assert encode(Connack(True, 0, {codec.MAXIMUM_QOS: 1}), 5) == b"\x20\x05\x01\x00\x02\x24\x01"
    assert encode(PubAck(7), 5) == b"\x40\x02\x00\x07"
    assert encode(PubAck(7, 0x99), 5) == b"\x40\x03\x00\x07\x99"
    assert encode(PubAck(7, 0x99), 4) == b"\x40\x02\x00\x07"
    assert encode(Suback(3, (1, 0x80)), 4) == b"\x90\x04\x00\x03\x01\x80"
    assert encode(Suback(3, (0x87,)), 5) == b"\x90\x04\x00\x03\x00\x87"
    assert encode(Unsuback(3), 4) == b"\xb0\x02\x00\x03"
    assert encode(Unsuback(3, (0,)), 5) == b"\xb0\x04\x00\x03\x00\x00"
    assert encode(PingResp(), 4) == b"\xd0\x00"
    assert encode(Disconnect(0x8E), 5) == b"\xe0\x01\x8e"
    assert encode(Disconnect(), 5) == b"\xe0\x00"
    assert encode(Auth(0x18, {codec.AUTH_METHOD: "jwt"}), 5) == b"\xf0\x08\x18\x06\x15\x00\x03jwt"
    publish = Publish("a/b", b"hi", 1, 9, True)
    assert encode(publish, 4) == b"\x3a\x09\x00\x03a/b\x00\x09hi"
    assert encode(publish, 5) == b"\x3a\x0a\x00\x03a/b\x00\x09\x00hi"


def test_stream_decoder_splits_and_joins() -> None:
    """Packets cut at every byte, and several in one read, come out whole and in order."""
    data = PAHO_311_CONNECT + encode(PingReq(), 4) + encode(Publish("t", b"x" * 300, 1, 2), 4)
    decoder = StreamDecoder(1024)
    out: list[codec.Packet] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == [Connect("d1", 4, True, 60, "u", b"pw"), PingReq(), Publish("t", b"x" * 300, 1, 2)]
    assert decoder.version == 4
    again = StreamDecoder(1024)
    assert len(again.feed(data)) == 3


@pytest.mark.parametrize(
    ("data", "version", "reason"),
    [
        (b"\x30\xff\xff\xff\xff\x01", 4, 0x81),  # varint of 5 bytes
        (b"\x00\x00", 4, 0x82),  # reserved type 0
        (b"\x50\x02\x00\x01", 4, 0x82),  # PUBREC: QoS 2 is not offered
        (b"\x62\x02\x00\x01", 4, 0x82),  # PUBREL
        (b"\x80\x05\x00\x01\x00\x01a", 4, 0x81),  # SUBSCRIBE without its 0b0010 flags
        (b"\x82\x02\x00\x01", 4, 0x82),  # SUBSCRIBE without a filter
        (b"\x82\x06\x00\x00\x00\x01a\x00", 4, 0x82),  # packet id 0
        (b"\x82\x06\x00\x01\x00\x01a\x03", 4, 0x81),  # requested QoS 3
        (b"\x82\x06\x00\x01\x00\x01a\x04", 4, 0x81),  # 3.1.1 reserved option bits
        (b"\x36\x05\x00\x01t\x00\x01", 4, 0x81),  # PUBLISH QoS 3
        (b"\x38\x03\x00\x01t", 4, 0x81),  # DUP on QoS 0
        (b"\x30\x03\x00\x02\xc3\x28", 4, 0x81),  # invalid UTF-8 topic (and short)
        (b"\x30\x04\x00\x02\xc3\x28", 4, 0x81),  # invalid UTF-8 topic
        (b"\x30\x03\x00\x01\x00", 4, 0x81),  # U+0000 in a string
        (b"\xc0\x01\x00", 4, 0x81),  # PINGREQ with a body
        (b"\xc1\x00", 4, 0x81),  # PINGREQ with flags
        (b"\xf0\x00", 4, 0x82),  # AUTH on 3.1.1
        (b"\x30\x06\x00\x01t\x03\x01\x01", 5, 0x81),  # properties longer than the packet
        (b"\x30\x07\x00\x01t\x02\x07\x00x", 5, 0x81),  # unknown property 0x07
        (b"\x30\x08\x00\x01t\x04\x01\x01\x01\x01", 5, 0x82),  # Payload Format Indicator twice
        (b"\xe0\x03\x00\x01\x99", 5, 0x81),  # a property runs past the property length
        (b"\xa2\x03\x00\x01\x00", 5, 0x82),  # UNSUBSCRIBE 5.0 without a filter
    ],
)
def test_malformed_packets(data: bytes, version: codec.Version, reason: int) -> None:
    with pytest.raises(MalformedPacket) as raised:
        StreamDecoder(1024).feed(data) if version is None else decode_one(data, version)
    assert raised.value.reason == reason


@pytest.mark.parametrize(
    ("connect", "reason"),
    [
        (bytes.fromhex("100c00064d514973647003020000"), 0x84),  # MQTT 3.1 "MQIsdp"
        (bytes.fromhex("100a00044d5154540602003c0000"), 0x84),  # level 6
        (bytes.fromhex("100a00044d5154540403003c0000"), 0x81),  # reserved flag
        (bytes.fromhex("100a00044d5154540418003c0000"), 0x81),  # will QoS 3
        (bytes.fromhex("100a00044d5154540420003c0000"), 0x81),  # will retain without will
        (bytes.fromhex("100c00044d5154540442003c00000000"), 0x81),  # 3.1.1 password, no user
        (bytes.fromhex("100b00044d5154540402003c000000"), 0x81),  # bytes after the end
    ],
)
def test_malformed_connect(connect: bytes, reason: int) -> None:
    with pytest.raises(MalformedPacket) as raised:
        StreamDecoder(1024).feed(connect)
    assert raised.value.reason == reason


def test_size_cap_refuses_before_buffering() -> None:
    """A packet announced over the cap is refused on its fixed header (0x95), unread."""
    decoder = StreamDecoder(1000)
    header = b"\x30" + encode_varint(998)  # 1 + 2 + 998 = 1001 bytes in all
    with pytest.raises(MalformedPacket) as raised:
        decoder.feed(header)
    assert raised.value.reason == 0x95
    exact = b"\x30" + encode_varint(997) + b"\x00\x01t" + b"x" * 994
    assert len(exact) == 1000
    assert decode_one(exact, 4, cap=1000) == Publish("t", b"x" * 994)


def test_properties_repeatable() -> None:
    props: codec.Properties = {codec.USER_PROPERTY: [("a", "1"), ("a", "2")], 0x0B: [1, 268_435_455]}
    packet = Publish("t", b"", 0, None, False, False, props)
    assert decode_one(encode(packet, 5), 5) == packet


# -- properties -----------------------------------------------------------------------------------
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
u16 = st.integers(0, 0xFFFF)
packet_ids = st.integers(1, 0xFFFF)
reason = st.integers(0, 255)


def props_for(version: int) -> st.SearchStrategy[codec.Properties]:
    if version == 4:
        return st.just({})
    return st.fixed_dictionaries(
        {},
        optional={
            codec.PAYLOAD_FORMAT: st.integers(0, 1),
            codec.SESSION_EXPIRY: st.integers(0, 2**32 - 1),
            codec.AUTH_METHOD: text,
            codec.AUTH_DATA: st.binary(max_size=20),
            codec.RECEIVE_MAXIMUM: u16,
            codec.USER_PROPERTY: st.lists(st.tuples(text, text), min_size=1, max_size=3),
            codec.REASON_STRING: text,
        },
    )


@st.composite
def packets(draw: Any) -> tuple[codec.Packet, codec.Version]:
    version: codec.Version = draw(st.sampled_from([4, 5]))
    props = draw(props_for(version))
    kind = draw(st.integers(0, 11))
    packet: codec.Packet
    if kind == 0:
        qos = draw(st.integers(0, 1))
        packet = Publish(
            draw(text),
            draw(st.binary(max_size=64)),
            qos,
            draw(packet_ids) if qos else None,
            draw(st.booleans()) if qos else False,
            draw(st.booleans()),
            props,
        )
    elif kind == 1:
        code = draw(reason) if version == 5 else 0
        packet = PubAck(draw(packet_ids), code, props if code or version == 5 else {})
        if version == 5 and not code and props:
            packet = PubAck(packet.packet_id, 0x10, props)
    elif kind == 2:
        options = st.integers(0, 2) if version == 4 else st.integers(0, 0x3F).filter(lambda o: o & 3 != 3)
        filters = draw(st.lists(st.tuples(text, options), min_size=1, max_size=4))
        packet = Subscribe(draw(packet_ids), tuple(filters), props)
    elif kind == 3:
        packet = Suback(draw(u16), tuple(draw(st.lists(reason, max_size=4))), props)
    elif kind == 4:
        packet = Unsubscribe(draw(packet_ids), tuple(draw(st.lists(text, min_size=1, max_size=4))), props)
    elif kind == 5:
        codes = tuple(draw(st.lists(reason, max_size=4))) if version == 5 else ()
        packet = Unsuback(draw(u16), codes, props)
    elif kind == 6:
        packet = PingReq()
    elif kind == 7:
        packet = PingResp()
    elif kind == 8:
        code = draw(reason) if version == 5 else 0
        packet = Disconnect(code if code or not props else 0x04, props) if version == 5 else Disconnect()
    elif kind == 9:
        packet = Connack(draw(st.booleans()), draw(reason), props)
    elif kind == 10 and version == 5:
        packet = Auth(draw(st.sampled_from([0x18, 0x19])), props)
    else:
        will = None
        if draw(st.booleans()):
            will = Will(
                draw(text),
                draw(st.binary(max_size=16)),
                draw(st.integers(0, 2)),
                draw(st.booleans()),
                draw(props_for(version)),
            )
        username = draw(st.none() | text)
        password = draw(st.none() | st.binary(max_size=16))
        if version == 4 and username is None:
            password = None
        packet = Connect(draw(text), version, draw(st.booleans()), draw(u16), username, password, will, props)
    return packet, version


@settings(max_examples=400, deadline=None)
@given(packets())
def test_round_trip(case: tuple[codec.Packet, codec.Version]) -> None:
    """encode then decode gives the packet back, for every packet of the subset."""
    packet, version = case
    data = encode(packet, version)
    assert decode_one(data, None if isinstance(packet, Connect) else version) == packet


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([None, 4, 5]), st.integers(1, 64))
def test_fuzz_arbitrary_bytes(data: bytes, version: codec.Version | None, chunk: int) -> None:
    """Any bytes, in any cuts: packets or MalformedPacket, never another exception; the
    buffer never holds more than the cap plus one read."""
    decoder = StreamDecoder(128)
    decoder.version = version
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i : i + chunk])
            assert len(decoder._buffer) <= 128 + chunk
    except MalformedPacket as exc:  # the one exception allowed, with a known reason
        assert exc.reason in (0x81, 0x82, 0x84, 0x95)  # noqa: PT017  # a property over many cases


@settings(max_examples=300, deadline=None)
@given(packets(), st.integers(0, 200), st.integers(0, 255))
def test_fuzz_mutated_packets(case: tuple[codec.Packet, codec.Version], where: int, byte: int) -> None:
    """A valid packet with one byte changed: decoded (to something) or refused, never a crash."""
    packet, version = case
    data = bytearray(encode(packet, version))
    data[where % len(data)] = byte
    decoder = StreamDecoder(1 << 16)
    decoder.version = None if isinstance(packet, Connect) else version
    with contextlib.suppress(MalformedPacket):
        decoder.feed(bytes(data))
