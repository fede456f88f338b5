"""Bare picows servers: the transport fleetwire uses, with no application logic.

    python -m benchmarks.bare MODE PORT        (MODE: fanout, ingest, connections, commands)

They speak just enough of fleetwire's protocol for the same load generator to drive them:
every connection gets a `welcome` text frame first, and

- fanout: a `/ws/client` message (the subscribe) is answered with an ack and puts the
  connection in the subscriber set; each `/ws/device` message is framed ONCE and the same bytes
  are written to every subscriber's transport (no parsing, no envelope);
- ingest: each message is parsed (orjson) and answered `{"type":"ack","id":…,"accepted":n}`;
- connections: accept (and the welcome);
- commands: a client's `command` is parsed and relayed to the device named in it (ack to the
  client), the device's `command_result` is relayed back to the issuer (ack to the device).

No authentication: peers are told apart by the `X-Bench-Id` header. The same picows settings as
fleetwire's transport: uvloop, `read_buffer_init_size=2048`, auto-pong, no auto-ping.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import orjson
import uvloop
from picows import WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from benchmarks.common import BENCH_ID_HEADER
from benchmarks.sysinfo import raise_nofile

_TEXT = WSMsgType.TEXT
_WELCOME = b'{"type":"welcome"}'


def text_frame(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


class _Base(WSListener):
    def __init__(self) -> None:
        super().__init__()
        self.tr: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.tr = transport
        transport.send(_TEXT, _WELCOME)


# -- fanout ------------------------------------------------------------------------------------
class _FanoutHub:
    def __init__(self) -> None:
        self.subscribers: list[Any] = []  # asyncio transports


class _Subscriber(_Base):
    def __init__(self, hub: _FanoutHub) -> None:
        super().__init__()
        self.hub = hub
        self.raw: Any = None

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type is not _TEXT:
            return
        request = orjson.loads(frame.get_payload_as_bytes())
        if self.raw is None:
            self.raw = transport.underlying_transport
            self.hub.subscribers.append(self.raw)
        transport.send(_TEXT, orjson.dumps({"type": "ack", "id": request.get("id")}))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.raw is not None:
            self.hub.subscribers.remove(self.raw)
            self.raw = None


class _Publisher(_Base):
    def __init__(self, hub: _FanoutHub) -> None:
        super().__init__()
        self.hub = hub

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type is not _TEXT:
            return
        data = text_frame(frame.get_payload_as_bytes())
        for raw in self.hub.subscribers:
            raw.write(data)


# -- ingest ------------------------------------------------------------------------------------
class _Ingest(_Base):
    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type is not _TEXT:
            return
        message = orjson.loads(frame.get_payload_as_bytes())
        records = message.get("records")
        accepted = len(records) if isinstance(records, list) else 1
        transport.send(_TEXT, orjson.dumps({"type": "ack", "id": message.get("id"), "accepted": accepted}))


class _Idle(_Base):
    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        pass


# -- commands ----------------------------------------------------------------------------------
class _Relay:
    def __init__(self) -> None:
        self.devices: dict[str, WSTransport] = {}
        self.issuers: dict[str, tuple[WSTransport, Any]] = {}
        self.next_id = 0


class _CommandDevice(_Base):
    def __init__(self, relay: _Relay, name: str) -> None:
        super().__init__()
        self.relay = relay
        self.name = name

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        self.relay.devices[self.name] = transport

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type is not _TEXT:
            return
        message = orjson.loads(frame.get_payload_as_bytes())
        transport.send(_TEXT, orjson.dumps({"type": "ack", "id": message.get("id")}))
        command_id = message.get("command_id")
        issuer = self.relay.issuers.pop(command_id, None)
        if issuer is not None:
            client, _ = issuer
            client.send(
                _TEXT,
                orjson.dumps(
                    {
                        "type": "command_result",
                        "command_id": command_id,
                        "device_id": self.name,
                        "state": "succeeded" if message.get("ok") else "failed",
                        "result": message.get("result"),
                        "error": message.get("error"),
                    }
                ),
            )

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.relay.devices.get(self.name) is transport:
            del self.relay.devices[self.name]


class _CommandClient(_Base):
    def __init__(self, relay: _Relay) -> None:
        super().__init__()
        self.relay = relay

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type is not _TEXT:
            return
        message = orjson.loads(frame.get_payload_as_bytes())
        relay = self.relay
        device = relay.devices.get(message.get("device_id"))
        if device is None:
            transport.send(
                _TEXT, orjson.dumps({"type": "error", "id": message.get("id"), "code": "device_offline"})
            )
            return
        relay.next_id += 1
        command_id = f"c{relay.next_id}"
        relay.issuers[command_id] = (transport, message.get("id"))
        transport.send(
            _TEXT,
            orjson.dumps({"type": "ack", "id": message.get("id"), "command_id": command_id, "state": "sent"}),
        )
        device.send(
            _TEXT,
            orjson.dumps(
                {
                    "type": "command",
                    "command_id": command_id,
                    "name": message.get("name"),
                    "params": message.get("params"),
                }
            ),
        )


def listener_factory(mode: str) -> Any:
    hub = _FanoutHub()
    relay = _Relay()

    def factory(request: WSUpgradeRequest) -> WSListener:
        is_device = request.path.split(b"?", 1)[0] == b"/ws/device"
        if mode == "fanout":
            return _Publisher(hub) if is_device else _Subscriber(hub)
        if mode == "ingest":
            return _Ingest()
        if mode == "commands":
            if is_device:
                return _CommandDevice(relay, request.headers.get(BENCH_ID_HEADER, ""))
            return _CommandClient(relay)
        return _Idle()

    return factory


async def serve(mode: str, port: int, transport: str = "aiofastnet") -> None:
    server = await ws_create_server(
        listener_factory(mode),
        "127.0.0.1",
        port,
        enable_auto_ping=False,
        enable_auto_pong=True,
        max_frame_size=262_144,
        read_buffer_init_size=2048,
        websocket_handshake_timeout=10,
        backlog=4096,
        use_aiofastnet=transport == "aiofastnet",
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    modes = ("fanout", "ingest", "connections", "commands")
    if len(args) not in (2, 3) or args[0] not in modes or args[2:] not in ([], ["aiofastnet"], ["uvloop"]):
        print("usage: python -m benchmarks.bare MODE PORT [aiofastnet|uvloop]", file=sys.stderr)
        return 2
    raise_nofile()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args[0], int(args[1]), *args[2:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
