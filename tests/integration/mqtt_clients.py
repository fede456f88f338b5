"""Real MQTT clients for the interoperability tests (contract §8): paho-mqtt in its own
network thread, its callbacks turned into a queue read with bounded waits from async tests."""

from __future__ import annotations

import asyncio
import contextlib
import queue
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleetwire.transport.mqtt import codec

TIMEOUT = 5.0


@dataclass
class Seen:
    kind: str  # connack, message, puback, suback, unsuback, disconnect
    code: int = 0
    topic: str = ""
    payload: bytes = b""
    qos: int = 0
    dup: bool = False
    mid: int = 0
    codes: list[int] = field(default_factory=list)
    session_present: bool = False
    properties: Any = None


class PahoDevice:
    """One paho-mqtt client (3.1.1 or 5.0, TCP or WebSocket) and what it saw, in order."""

    def __init__(
        self,
        port: int,
        client_id: str,
        *,
        version: int = 5,
        transport: str = "tcp",
        clean: bool = True,
        auto_ack: bool = True,
    ) -> None:
        self.port = port
        self.version = version
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            transport=transport,  # type: ignore[arg-type]  # "tcp" or "websockets"
            clean_session=clean if version == 4 else None,
            reconnect_on_failure=False,
        )
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        self.client.manual_ack_set(not auto_ack)
        self.clean = clean
        self.seen: queue.Queue[Seen] = queue.Queue()
        self.kept: list[Seen] = []
        client = self.client
        client.on_connect = lambda c, u, flags, rc, props: self.seen.put(
            Seen("connack", rc.value, session_present=bool(flags.session_present), properties=props)
        )
        client.on_message = lambda c, u, m: self.seen.put(
            Seen("message", topic=m.topic, payload=m.payload, qos=m.qos, dup=bool(m.dup), mid=m.mid)
        )
        client.on_publish = lambda c, u, mid, rc, props: self.seen.put(Seen("puback", rc.value, mid=mid))
        client.on_subscribe = lambda c, u, mid, rcs, props: self.seen.put(
            Seen("suback", mid=mid, codes=[r.value for r in rcs])
        )
        client.on_disconnect = lambda c, u, flags, rc, props: self.seen.put(Seen("disconnect", rc.value))

    async def connect(
        self, token: str | None, *, keepalive: int = 60, properties: Properties | None = None
    ) -> Seen:
        if token is not None:
            self.client.username_pw_set("ignored", token)
        kwargs: dict[str, Any] = {"keepalive": keepalive}
        if self.version == 5:
            kwargs["clean_start"] = self.clean
            kwargs["properties"] = properties
        await asyncio.to_thread(self.client.connect, "127.0.0.1", self.port, **kwargs)
        self.client.loop_start()
        return await self.next("connack")

    async def next(self, kind: str, timeout: float = TIMEOUT, **match: Any) -> Seen:
        """The next thing seen of `kind` (and matching fields), keeping the others."""
        for index, item in enumerate(self.kept):
            if item.kind == kind and all(getattr(item, k) == v for k, v in match.items()):
                return self.kept.pop(index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {kind} {match} within {timeout}s; kept {self.kept}")
            try:
                item = await asyncio.to_thread(self.seen.get, True, min(remaining, 0.5))
            except queue.Empty:
                continue
            if item.kind == kind and all(getattr(item, k) == v for k, v in match.items()):
                return item
            self.kept.append(item)

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> int:
        info = self.client.publish(topic, payload, qos=qos)
        return info.mid

    async def subscribe(self, topic: str, qos: int = 1) -> Seen:
        _, mid = self.client.subscribe(topic, qos)
        return await self.next("suback", mid=mid)

    def stop(self) -> None:
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def jwt_connect_properties(token: str, session_expiry: int = 0) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.AuthenticationMethod = "jwt"
    props.AuthenticationData = token.encode()
    if session_expiry:
        props.SessionExpiryInterval = session_expiry
    return props


def session_properties(session_expiry: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    return props


class RawDevice:
    """A minimal MQTT client on fleetwire's own codec, for what no third-party client here
    does (5.0 AUTH re-authentication, raw 3.1.1 CONNACK bytes). Every read is bounded."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: codec.Version
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.version = version
        self.decoder = codec.StreamDecoder(1 << 20)
        self.decoder.version = version
        self.packets: list[codec.Packet] = []

    @classmethod
    async def open(cls, port: int, version: codec.Version = 5) -> RawDevice:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
        return cls(reader, writer, version)

    async def connect(
        self, client_id: str, password: bytes | None, properties: codec.Properties | None = None
    ) -> codec.Packet:
        await self.send(
            codec.Connect(client_id, self.version, True, 60, "ignored", password, None, properties or {})
        )
        return await self.recv()

    async def send(self, packet: codec.Packet) -> None:
        self.writer.write(codec.encode(packet, self.version))
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    async def recv(self, timeout: float = TIMEOUT) -> codec.Packet:
        async with asyncio.timeout(timeout):
            while not self.packets:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed by the server")
                self.packets += self.decoder.feed(data)
        return self.packets.pop(0)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)
