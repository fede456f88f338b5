"""MQTT 3.1.1 and 5.0 packets without I/O: bytes in, packets out, and back (contract §8).

    decoder = StreamDecoder(max_packet_bytes=262144)
    for packet in decoder.feed(data):     # complete packets, in order; raises MalformedPacket
        ...
    data = encode(packet, version)        # version 4 (3.1.1) or 5 (5.0)

The decoder is strict: every rule of the fixed header (MQTT 5.0 §2.1, 3.1.1 §2.2), the
variable byte integer (§1.5.5), UTF-8 strings (§1.5.4: valid UTF-8, no U+0000), properties
(§2.2.2: known identifiers, no duplicates except User Property and Subscription Identifier)
and each packet's own layout is checked, and a violation raises `MalformedPacket` with the 5.0
reason code to disconnect with (0x81 malformed, 0x82 protocol error, 0x95 packet too large).
A packet whose announced size is over `max_packet_bytes` is refused as soon as its fixed header
is read, so the buffer never holds more than one packet's worth plus one read.

The version (4 or 5) decides whether packets carry properties; it is learnt from CONNECT
(`StreamDecoder.version`), which has the same layout up to its protocol level in both.
QoS 2 is not part of the subset (PUBREC, PUBREL, PUBCOMP are refused; a QoS 2 PUBLISH decodes
and the session refuses it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "AUTH",
    "CONNACK",
    "CONNECT",
    "DISCONNECT",
    "PINGREQ",
    "PINGRESP",
    "PUBACK",
    "PUBLISH",
    "SUBACK",
    "SUBSCRIBE",
    "UNSUBACK",
    "UNSUBSCRIBE",
    "Auth",
    "Connack",
    "Connect",
    "Disconnect",
    "MalformedPacket",
    "Packet",
    "PingReq",
    "PingResp",
    "Properties",
    "PubAck",
    "Publish",
    "StreamDecoder",
    "Suback",
    "Subscribe",
    "Unsuback",
    "Unsubscribe",
    "Will",
    "decode_packet",
    "encode",
    "encode_varint",
]

# Control packet types (MQTT 5.0 §2.1.2).
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14
AUTH: Final = 15

# Reason codes the decoder raises with (5.0 §2.4).
MALFORMED: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
PACKET_TOO_LARGE: Final = 0x95
UNSUPPORTED_VERSION: Final = 0x84  # CONNECT of a protocol level other than 4 or 5

MAX_VARINT: Final = 268_435_455  # four bytes of 7 bits (§1.5.5)

Version = Literal[4, 5]


class MalformedPacket(Exception):
    """The peer broke the protocol; `reason` is the 5.0 reason code to end the connection with."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# -- properties (5.0 §2.2.2.2) --------------------------------------------------------------------
# identifier -> value type; "pair" = a UTF-8 string pair (User Property).
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
PROPERTY_TYPES: Final[dict[int, int]] = {
    0x01: _BYTE,  # Payload Format Indicator
    0x02: _U32,  # Message Expiry Interval
    0x03: _STR,  # Content Type
    0x08: _STR,  # Response Topic
    0x09: _BIN,  # Correlation Data
    0x0B: _VARINT,  # Subscription Identifier
    0x11: _U32,  # Session Expiry Interval
    0x12: _STR,  # Assigned Client Identifier
    0x13: _U16,  # Server Keep Alive
    0x15: _STR,  # Authentication Method
    0x16: _BIN,  # Authentication Data
    0x17: _BYTE,  # Request Problem Information
    0x18: _U32,  # Will Delay Interval
    0x19: _BYTE,  # Request Response Information
    0x1A: _STR,  # Response Information
    0x1C: _STR,  # Server Reference
    0x1F: _STR,  # Reason String
    0x21: _U16,  # Receive Maximum
    0x22: _U16,  # Topic Alias Maximum
    0x23: _U16,  # Topic Alias
    0x24: _BYTE,  # Maximum QoS
    0x25: _BYTE,  # Retain Available
    0x26: _PAIR,  # User Property
    0x27: _U32,  # Maximum Packet Size
    0x28: _BYTE,  # Wildcard Subscription Available
    0x29: _BYTE,  # Subscription Identifier Available
    0x2A: _BYTE,  # Shared Subscription Available
}
PAYLOAD_FORMAT: Final = 0x01
SESSION_EXPIRY: Final = 0x11
ASSIGNED_CLIENT_ID: Final = 0x12
SERVER_KEEP_ALIVE: Final = 0x13
AUTH_METHOD: Final = 0x15
AUTH_DATA: Final = 0x16
REASON_STRING: Final = 0x1F
RECEIVE_MAXIMUM: Final = 0x21
TOPIC_ALIAS_MAXIMUM: Final = 0x22
TOPIC_ALIAS: Final = 0x23
MAXIMUM_QOS: Final = 0x24
RETAIN_AVAILABLE: Final = 0x25
USER_PROPERTY: Final = 0x26
MAXIMUM_PACKET_SIZE: Final = 0x27
WILDCARD_AVAILABLE: Final = 0x28
SUBSCRIPTION_ID_AVAILABLE: Final = 0x29
SHARED_AVAILABLE: Final = 0x2A
_REPEATABLE: Final = frozenset({USER_PROPERTY, 0x0B})

PropertyValue = int | str | bytes | list[tuple[str, str]] | list[int]
# Identifier -> value; User Property (0x26) is a list of pairs, Subscription Identifier
# (0x0B) a list of ints when repeated (PUBLISH), else an int.
Properties = dict[int, PropertyValue]


# -- packets ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    version: Version = 5
    clean_start: bool = True
    keep_alive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool = False
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    packet_id: int | None = None  # present exactly when qos > 0
    dup: bool = False
    retain: bool = False
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PubAck:
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    filters: tuple[tuple[str, int], ...]  # (topic filter, options byte: QoS in bits 0-1)
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Unsuback:
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # 5.0 only; 3.1.1 UNSUBACK has no payload
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Auth:
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


Packet = (
    Connect
    | Connack
    | Publish
    | PubAck
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | PingReq
    | PingResp
    | Disconnect
    | Auth
)


# -- reading ----------------------------------------------------------------------------------------
class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.remaining:
            raise MalformedPacket(MALFORMED, "packet shorter than its fields")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise MalformedPacket(MALFORMED, "packet shorter than its fields")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u16(self) -> int:
        value: int = struct.unpack_from("!H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack_from("!I", self.take(4))[0]
        return value

    def varint(self) -> int:
        value, self.pos = _read_varint(self.data, self.pos, len(self.data))
        return value

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacket(MALFORMED, "a string is not valid UTF-8") from None
        if "\x00" in text:  # §1.5.4: U+0000 must not appear
            raise MalformedPacket(MALFORMED, "a string contains U+0000")
        return text

    def properties(self) -> Properties:
        length = self.varint()
        end = self.pos + length
        if end > len(self.data):
            raise MalformedPacket(MALFORMED, "properties longer than the packet")
        props: Properties = {}
        while self.pos < end:
            ident = self.varint()
            kind = PROPERTY_TYPES.get(ident)
            if kind is None:
                raise MalformedPacket(MALFORMED, f"unknown property 0x{ident:02x}")
            value: int | str | bytes | tuple[str, str]
            if kind == _BYTE:
                value = self.byte()
            elif kind == _U16:
                value = self.u16()
            elif kind == _U32:
                value = self.u32()
            elif kind == _VARINT:
                value = self.varint()
            elif kind == _STR:
                value = self.string()
            elif kind == _BIN:
                value = self.binary()
            else:
                value = (self.string(), self.string())
            if self.pos > end:
                raise MalformedPacket(MALFORMED, "a property runs past the property length")
            if ident in _REPEATABLE:
                listed = props.setdefault(ident, [])
                assert isinstance(listed, list)
                listed.append(value)  # type: ignore[arg-type]  # pairs for 0x26, ints for 0x0B
            elif ident in props:
                raise MalformedPacket(PROTOCOL_ERROR, f"property 0x{ident:02x} given twice")
            else:
                props[ident] = value  # type: ignore[assignment]  # not a pair: only 0x26 is
        return props

    def end(self) -> None:
        if self.remaining:
            raise MalformedPacket(MALFORMED, "bytes after the end of the packet")


def _read_varint(data: bytes | bytearray, pos: int, limit: int) -> tuple[int, int]:
    """A variable byte integer at `pos` (§1.5.5): (value, position after it). At most 4 bytes."""
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= limit:
            raise MalformedPacket(MALFORMED, "packet shorter than its fields")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise MalformedPacket(MALFORMED, "a variable byte integer longer than 4 bytes")


_FIXED_FLAGS: Final = {
    CONNECT: 0,
    CONNACK: 0,
    PUBACK: 0,
    SUBSCRIBE: 2,
    SUBACK: 0,
    UNSUBSCRIBE: 2,
    UNSUBACK: 0,
    PINGREQ: 0,
    PINGRESP: 0,
    DISCONNECT: 0,
    AUTH: 0,
}


def decode_packet(first: int, body: bytes, version: Version | None) -> Packet:
    """One packet from its first byte and its body (the bytes after the remaining length).
    `version` None: only CONNECT is expected (the first packet of a connection)."""
    kind = first >> 4
    flags = first & 0x0F
    if kind == PUBLISH:
        return _publish(flags, _Reader(body), version or 4)
    expected = _FIXED_FLAGS.get(kind)
    if expected is None:  # 0 reserved; 5, 6, 7: QoS 2 flow, not offered
        raise MalformedPacket(PROTOCOL_ERROR, f"packet type {kind} is not supported")
    if flags != expected:  # §2.1.3
        raise MalformedPacket(MALFORMED, f"invalid fixed header flags for packet type {kind}")
    reader = _Reader(body)
    if kind == CONNECT:
        return _connect(reader)
    v5 = version == 5
    packet: Packet
    if kind == CONNACK:
        ack_flags = reader.byte()
        if ack_flags & 0xFE:
            raise MalformedPacket(MALFORMED, "reserved CONNACK flags set")
        code = reader.byte()
        packet = Connack(bool(ack_flags & 1), code, reader.properties() if v5 else {})
    elif kind == PUBACK:
        packet_id = reader.u16()
        code, props = 0, {}
        if v5 and reader.remaining:  # §3.4.2.1: reason code and properties may be left out
            code = reader.byte()
            if reader.remaining:
                props = reader.properties()
        packet = PubAck(packet_id, code, props)
    elif kind == SUBSCRIBE:
        packet_id = reader.u16()
        props = reader.properties() if v5 else {}
        filters = []
        while reader.remaining:
            topic = reader.string()
            options = reader.byte()
            if options & (0xC0 if v5 else 0xFC) or options & 0x03 == 3:  # §3.8.3.1
                raise MalformedPacket(MALFORMED, "invalid subscription options")
            filters.append((topic, options))
        if not filters:  # §3.8.3: at least one
            raise MalformedPacket(PROTOCOL_ERROR, "SUBSCRIBE without a topic filter")
        packet = Subscribe(_packet_id(packet_id), tuple(filters), props)
    elif kind == SUBACK:
        packet_id = reader.u16()
        props = reader.properties() if v5 else {}
        packet = Suback(packet_id, tuple(reader.take(reader.remaining)), props)
    elif kind == UNSUBSCRIBE:
        packet_id = reader.u16()
        props = reader.properties() if v5 else {}
        topics = []
        while reader.remaining:
            topics.append(reader.string())
        if not topics:  # §3.10.3
            raise MalformedPacket(PROTOCOL_ERROR, "UNSUBSCRIBE without a topic filter")
        packet = Unsubscribe(_packet_id(packet_id), tuple(topics), props)
    elif kind == UNSUBACK:
        packet_id = reader.u16()
        if v5:
            props = reader.properties()
            packet = Unsuback(packet_id, tuple(reader.take(reader.remaining)), props)
        else:
            packet = Unsuback(packet_id)
    elif kind == PINGREQ:
        packet = PingReq()
    elif kind == PINGRESP:
        packet = PingResp()
    elif kind == DISCONNECT:
        code, props = 0, {}
        if v5 and reader.remaining:  # §3.14.2.1: absent means 0x00
            code = reader.byte()
            if reader.remaining:
                props = reader.properties()
        packet = Disconnect(code, props)
    else:  # AUTH, 5.0 only
        if not v5:
            raise MalformedPacket(PROTOCOL_ERROR, "AUTH is an MQTT 5.0 packet")
        code, props = 0, {}
        if reader.remaining:
            code = reader.byte()
            props = reader.properties()
        packet = Auth(code, props)
    reader.end()
    return packet


def _packet_id(value: int) -> int:
    if value == 0:  # §2.2.1: a packet identifier is non-zero
        raise MalformedPacket(PROTOCOL_ERROR, "packet identifier 0")
    return value


def _connect(reader: _Reader) -> Connect:
    name = reader.string()
    level = reader.byte()
    if name != "MQTT" or level not in (4, 5):
        # 3.1 ("MQIsdp", level 3) and unknown levels: refused with CONNACK 0x01 / 0x84.
        raise MalformedPacket(UNSUPPORTED_VERSION, "only MQTT 3.1.1 (level 4) and 5.0 (level 5)")
    version: Version = 5 if level == 5 else 4
    flags = reader.byte()
    if flags & 0x01:  # §3.1.2.3: reserved
        raise MalformedPacket(MALFORMED, "reserved CONNECT flag set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if will_qos == 3 or (not will_flag and (will_qos or will_retain)):  # §3.1.2.6, §3.1.2.7
        raise MalformedPacket(MALFORMED, "invalid Will flags")
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if version == 4 and has_password and not has_username:  # 3.1.1 §3.1.2.9
        raise MalformedPacket(MALFORMED, "a password without a user name")
    keep_alive = reader.u16()
    props = reader.properties() if version == 5 else {}
    client_id = reader.string()
    will = None
    if will_flag:
        will_props = reader.properties() if version == 5 else {}
        will = Will(reader.string(), reader.binary(), will_qos, will_retain, will_props)
    username = reader.string() if has_username else None
    password = reader.binary() if has_password else None
    reader.end()
    return Connect(client_id, version, bool(flags & 0x02), keep_alive, username, password, will, props)


def _publish(flags: int, reader: _Reader, version: Version) -> Publish:
    qos = (flags >> 1) & 0x03
    dup = bool(flags & 0x08)
    if qos == 3:  # §3.3.1.2
        raise MalformedPacket(MALFORMED, "PUBLISH with QoS 3")
    if qos == 0 and dup:  # §3.3.1.1
        raise MalformedPacket(MALFORMED, "DUP set on a QoS 0 PUBLISH")
    topic = reader.string()
    packet_id = _packet_id(reader.u16()) if qos else None
    props = reader.properties() if version == 5 else {}
    payload = reader.take(reader.remaining)
    return Publish(topic, payload, qos, packet_id, dup, bool(flags & 0x01), props)


class StreamDecoder:
    """Packets from a byte stream, at most `max_packet_bytes` each (the whole packet)."""

    __slots__ = ("_buffer", "max_packet_bytes", "version")

    def __init__(self, max_packet_bytes: int) -> None:
        self.max_packet_bytes = max_packet_bytes
        self.version: Version | None = None  # set by the CONNECT that opens the stream
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        """Every packet `data` completes, in order. Raises MalformedPacket; after it the
        stream is broken (the connection must end)."""
        buffer = self._buffer
        buffer += data
        packets: list[Packet] = []
        pos = 0
        size = len(buffer)
        try:
            while size - pos >= 2:
                try:
                    length, body_at = _read_varint(buffer, pos + 1, size)
                except MalformedPacket:
                    if size - pos - 1 >= 4:  # four bytes read and still not complete
                        raise
                    break  # the remaining length is not complete yet
                if body_at - pos + length > self.max_packet_bytes:
                    raise MalformedPacket(PACKET_TOO_LARGE, "packet over the size limit")
                end = body_at + length
                if end > size:
                    break
                packet = decode_packet(buffer[pos], bytes(buffer[body_at:end]), self.version)
                if isinstance(packet, Connect):
                    self.version = packet.version
                packets.append(packet)
                pos = end
        finally:
            del buffer[:pos]
        return packets


# -- writing ----------------------------------------------------------------------------------------
def encode_varint(value: int) -> bytes:
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


def _binary(raw: bytes) -> bytes:
    return struct.pack("!H", len(raw)) + raw


def encode_properties(props: Properties) -> bytes:
    out = bytearray()
    for ident, value in props.items():
        kind = PROPERTY_TYPES[ident]
        values = value if ident in _REPEATABLE and isinstance(value, list) else [value]
        for item in values:
            out += encode_varint(ident)
            if kind == _BYTE:
                out.append(int(item))  # type: ignore[arg-type]  # by PROPERTY_TYPES
            elif kind == _U16:
                out += struct.pack("!H", item)
            elif kind == _U32:
                out += struct.pack("!I", item)
            elif kind == _VARINT:
                out += encode_varint(int(item))  # type: ignore[arg-type]  # by PROPERTY_TYPES
            elif kind == _STR:
                out += _string(str(item))
            elif kind == _BIN:
                out += _binary(bytes(item))  # type: ignore[arg-type]  # by PROPERTY_TYPES
            else:
                pair: tuple[str, str] = item  # type: ignore[assignment]  # a pair, by PROPERTY_TYPES
                out += _string(pair[0]) + _string(pair[1])
    return encode_varint(len(out)) + bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def encode(packet: Packet, version: Version) -> bytes:
    """The bytes of `packet` for a connection of `version` (5.0 properties only when 5)."""
    v5 = version == 5
    if isinstance(packet, Publish):
        flags = (packet.dup << 3) | (packet.qos << 1) | packet.retain
        body = _string(packet.topic)
        if packet.qos:
            assert packet.packet_id is not None, "a QoS 1/2 PUBLISH needs a packet id"
            body += struct.pack("!H", packet.packet_id)
        if v5:
            body += encode_properties(packet.properties)
        return _packet((PUBLISH << 4) | flags, body + packet.payload)
    if isinstance(packet, PubAck):
        body = struct.pack("!H", packet.packet_id)
        if v5 and (packet.reason_code or packet.properties):
            body += bytes((packet.reason_code,))
            if packet.properties:
                body += encode_properties(packet.properties)
        return _packet(PUBACK << 4, body)
    if isinstance(packet, Connack):
        body = bytes((int(packet.session_present), packet.reason_code))
        if v5:
            body += encode_properties(packet.properties)
        return _packet(CONNACK << 4, body)
    if isinstance(packet, Suback):
        body = struct.pack("!H", packet.packet_id)
        if v5:
            body += encode_properties(packet.properties)
        return _packet(SUBACK << 4, body + bytes(packet.reason_codes))
    if isinstance(packet, Unsuback):
        body = struct.pack("!H", packet.packet_id)
        if v5:
            body += encode_properties(packet.properties) + bytes(packet.reason_codes)
        return _packet(UNSUBACK << 4, body)
    if isinstance(packet, PingResp):
        return bytes((PINGRESP << 4, 0))
    if isinstance(packet, PingReq):
        return bytes((PINGREQ << 4, 0))
    if isinstance(packet, Disconnect):
        body = b""
        if v5 and (packet.reason_code or packet.properties):
            body = bytes((packet.reason_code,))
            if packet.properties:
                body += encode_properties(packet.properties)
        return _packet(DISCONNECT << 4, body)
    if isinstance(packet, Auth):
        body = b""
        if packet.reason_code or packet.properties:
            body = bytes((packet.reason_code,)) + encode_properties(packet.properties)
        return _packet(AUTH << 4, body)
    if isinstance(packet, Subscribe):
        body = struct.pack("!H", packet.packet_id)
        if v5:
            body += encode_properties(packet.properties)
        for topic, options in packet.filters:
            body += _string(topic) + bytes((options,))
        return _packet((SUBSCRIBE << 4) | 2, body)
    if isinstance(packet, Unsubscribe):
        body = struct.pack("!H", packet.packet_id)
        if v5:
            body += encode_properties(packet.properties)
        for topic in packet.filters:
            body += _string(topic)
        return _packet((UNSUBSCRIBE << 4) | 2, body)
    return _encode_connect(packet)


def _encode_connect(packet: Connect) -> bytes:
    will = packet.will
    flags = (
        (packet.username is not None) << 7
        | (packet.password is not None) << 6
        | (will is not None and will.retain) << 5
        | (will.qos if will is not None else 0) << 3
        | (will is not None) << 2
        | packet.clean_start << 1
    )
    body = _string("MQTT") + bytes((packet.version, flags)) + struct.pack("!H", packet.keep_alive)
    if packet.version == 5:
        body += encode_properties(packet.properties)
    body += _string(packet.client_id)
    if will is not None:
        if packet.version == 5:
            body += encode_properties(will.properties)
        body += _string(will.topic) + _binary(will.payload)
    if packet.username is not None:
        body += _string(packet.username)
    if packet.password is not None:
        body += _binary(packet.password)
    return _packet(CONNECT << 4, body)
