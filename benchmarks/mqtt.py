"""`fleetwire bench mqtt`: MQTT ingest and command round trips beside the WebSocket ones
(issue 16), against one real `fleetwire serve` (SQLite, MQTT listener on) on core 0, the load
generator (`python -m benchmarks.mqtt load SPEC RESULT`) on core 1.

- ingest: `devices` connections per transport, each keeping `window` single-record telemetry
  messages in flight — MQTT 3.1.1 QoS 1 PUBLISH to `devices/{id}/telemetry` (acked by PUBACK,
  sent only after the durable commit), WebSocket `telemetry` (acked by `ack`, same rule).
  Points/s = acks in the measured window; server µs per point = the server process's CPU
  time in that window / the acks.
- commands: `devices` devices per transport that answer every command at once (MQTT: PUBACK
  then a QoS 1 result publish; WebSocket: `command_result`), one `/ws/client` operator keeping
  `window` commands in flight; a round trip = `command` sent -> the issuer's `command_result`.

The same server process serves both transports, one after the other, so the ratio is the
figure to read: this machine is shared (2 cores, other engineers' jobs), absolute figures move.
"""

from __future__ import annotations

import asyncio
import functools
import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import latency_ms
from benchmarks.sysinfo import proc_cpu_s, raise_nofile

# -- load generator (child process) --------------------------------------------------------------


class MqttDevice(asyncio.Protocol):
    """A 3.1.1 device on raw bytes: PUBLISH QoS 1 with a window; PUBACKs counted by their
    4 bytes (nothing else is sent to it in the ingest phase)."""

    def __init__(self, device_id: str, token: str, window: int, answer_commands: bool = False) -> None:
        from fleetwire.transport.mqtt import codec

        self.codec = codec
        self.device_id = device_id
        self.token = token
        self.window = window
        self.answer = answer_commands
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acked = 0
        self.sending = False
        self.next_id = 0
        self.transport: asyncio.Transport | None = None
        topic = f"devices/{device_id}/telemetry".encode()
        payload = b'{"data":{"t":21.5}}'
        self._head = (
            b"\x32"
            + codec.encode_varint(2 + len(topic) + 2 + len(payload))
            + struct.pack("!H", len(topic))
            + topic
        )
        self._payload = payload
        self._buffer = b""
        self.decoder = codec.StreamDecoder(1 << 20)
        self.decoder.version = 4

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        connect = self.codec.Connect(self.device_id, 4, True, 600, "bench", self.token.encode())
        self.transport.write(self.codec.encode(connect, 4))  # type: ignore[union-attr]

    def _publish(self) -> None:
        self.next_id = self.next_id % 65535 + 1
        assert self.transport is not None
        self.transport.write(self._head + struct.pack("!H", self.next_id) + self._payload)

    def start(self) -> None:
        self.sending = True
        for _ in range(self.window):
            self._publish()

    def data_received(self, data: bytes) -> None:
        if not self.connected.done():
            self.connected.set_result(None)  # CONNACK (4 bytes); checked below in run
            data = data[4:]
        if self.answer:
            self._commands(data)
            return
        data = self._buffer + data
        count, rest = divmod(len(data), 4)
        self._buffer = data[len(data) - rest :] if rest else b""
        self.acked += count
        if self.sending:
            for _ in range(count):
                self._publish()

    def _commands(self, data: bytes) -> None:
        codec = self.codec
        assert self.transport is not None
        for packet in self.decoder.feed(data):
            if isinstance(packet, codec.Publish) and packet.packet_id is not None:
                command_id = orjson.loads(packet.payload)["command_id"]
                self.next_id = self.next_id % 65535 + 1
                result = codec.Publish(
                    f"devices/{self.device_id}/commands/{command_id}/result", b'{"ok":true}', 1, self.next_id
                )
                self.transport.write(
                    codec.encode(codec.PubAck(packet.packet_id), 4) + codec.encode(result, 4)
                )

    def subscribe(self) -> None:
        assert self.transport is not None
        packet = self.codec.Subscribe(1, ((f"devices/{self.device_id}/commands", 1),))
        self.transport.write(self.codec.encode(packet, 4))


async def _mqtt_devices(spec: dict[str, Any], *, answer: bool) -> list[MqttDevice]:
    loop = asyncio.get_running_loop()
    devices = []
    for device_id, token in spec["devices"]:
        _, device = await loop.create_connection(
            functools.partial(MqttDevice, device_id, token, spec["window"], answer),
            "127.0.0.1",
            spec["mqtt_port"],
        )
        await asyncio.wait_for(device.connected, 30)
        devices.append(device)
    return devices


async def _ws_devices(spec: dict[str, Any], factory: Any) -> list[Any]:
    from benchmarks.loadgen import open_ws

    return [
        await open_ws(f"ws://127.0.0.1:{spec['port']}/ws/device", token, "bench", factory)
        for _, token in spec["devices"]
    ]


def _ws_ingest_client() -> Any:
    from benchmarks.loadgen import Client

    class WsIngest(Client):
        window = 8
        acked = 0
        sending = False

        def start(self) -> None:
            self.run_mode()
            self.sending = True
            for _ in range(self.window):
                self.send(b'{"type":"telemetry","data":{"t":21.5}}')

        def on_text(self, frame: Any) -> None:
            self.acked += 1
            if self.sending:
                self.send(b'{"type":"telemetry","data":{"t":21.5}}')

    return WsIngest


def _ws_answering_device() -> Any:
    from benchmarks.loadgen import Client

    class WsAnswering(Client):
        def on_text(self, frame: Any) -> None:
            message = orjson.loads(frame.get_payload_as_bytes())
            if message.get("type") == "command":
                self.send(
                    orjson.dumps({"type": "command_result", "command_id": message["command_id"], "ok": True})
                )

    return WsAnswering


async def _measure(spec: dict[str, Any], counters: list[Any], start: Any) -> dict[str, Any]:
    """Warm up, then count acks and the server's CPU over `duration` seconds."""
    for item in counters:
        start(item)
    await asyncio.sleep(spec["warmup"])
    acked0 = sum(c.acked for c in counters)
    cpu0, t0 = proc_cpu_s(spec["server_pid"]), time.monotonic()
    await asyncio.sleep(spec["duration"])
    acked = sum(c.acked for c in counters) - acked0
    cpu, elapsed = proc_cpu_s(spec["server_pid"]) - cpu0, time.monotonic() - t0
    for item in counters:
        item.sending = False
    await asyncio.sleep(0.5)  # the last windows drain
    return {
        "points_per_s": round(acked / elapsed),
        "server_us_per_point": round(cpu * 1e6 / acked, 2) if acked else None,
        "server_cpu_pct": round(100 * cpu / elapsed),
    }


async def _ingest(spec: dict[str, Any]) -> dict[str, Any]:
    mqtt = await _mqtt_devices(spec, answer=False)
    result = {"mqtt": await _measure(spec, mqtt, lambda d: d.start())}
    for device in mqtt:
        assert device.transport is not None
        device.transport.close()
    await asyncio.sleep(0.5)
    factory = _ws_ingest_client()
    factory.window = spec["window"]
    ws = await _ws_devices(spec, factory)
    result["websocket"] = await _measure(spec, ws, lambda c: c.start())
    for client in ws:
        client.close()
    return result


async def _round_trips(spec: dict[str, Any], device_ids: list[str]) -> dict[str, Any]:
    """One operator keeps `window` commands in flight, spread over the devices."""
    from benchmarks.loadgen import Client, open_ws

    loop = asyncio.get_running_loop()
    operator = await open_ws(f"ws://127.0.0.1:{spec['port']}/ws/client", spec["operator"], "bench", Client)
    sent_at: dict[str, int] = {}  # request id -> ns
    by_command: dict[str, str] = {}  # command id -> request id
    early: dict[str, int] = {}  # results that came before their ack
    samples: list[int] = []
    state = {"n": 0, "measuring": False, "sending": True, "done": 0}

    def issue() -> None:
        state["n"] += 1
        request_id = str(state["n"])
        device_id = device_ids[state["n"] % len(device_ids)]
        sent_at[request_id] = time.perf_counter_ns()
        operator.send(
            orjson.dumps({"type": "command", "id": request_id, "device_id": device_id, "name": "b"})
        )

    def finish(request_id: str, at: int) -> None:
        started = sent_at.pop(request_id)
        if state["measuring"]:
            samples.append(at - started)
            state["done"] += 1
        if state["sending"]:
            issue()

    def on_text(frame: Any) -> None:
        now = time.perf_counter_ns()
        message = orjson.loads(frame.get_payload_as_bytes())
        kind = message.get("type")
        if kind == "ack":
            command_id = message["command_id"]
            if command_id in early:
                finish(message["id"], early.pop(command_id))
            else:
                by_command[command_id] = message["id"]
        elif kind == "command_result":
            request_id = by_command.pop(message["command_id"], None)
            if request_id is None:
                early[message["command_id"]] = now
            else:
                finish(request_id, now)
        elif kind == "error":
            sent_at.pop(message["id"], None)
            if state["sending"]:
                loop.call_later(0.01, issue)

    operator.run_mode()
    operator.on_text = on_text
    for _ in range(spec["window"]):
        issue()
    await asyncio.sleep(spec["warmup"])
    state["measuring"] = True
    cpu0, t0 = proc_cpu_s(spec["server_pid"]), time.monotonic()
    await asyncio.sleep(spec["duration"])
    state["measuring"] = False
    cpu, elapsed = proc_cpu_s(spec["server_pid"]) - cpu0, time.monotonic() - t0
    state["sending"] = False
    await asyncio.sleep(1.0)
    operator.close()
    done = state["done"]
    return {
        "round_trips_per_s": round(done / elapsed),
        "server_us_per_round_trip": round(cpu * 1e6 / done, 1) if done else None,
        "latency_ms": latency_ms(samples),
    }


async def _commands(spec: dict[str, Any]) -> dict[str, Any]:
    ids = [device_id for device_id, _ in spec["devices"]]
    mqtt = await _mqtt_devices(spec, answer=True)
    for device in mqtt:
        device.subscribe()
    await asyncio.sleep(1.0)  # every SUBACK in
    result = {"mqtt": await _round_trips(spec, ids)}
    for device in mqtt:
        assert device.transport is not None
        device.transport.close()
    await asyncio.sleep(0.5)
    devices = await _ws_devices(spec, _ws_answering_device())
    for device in devices:
        device.run_mode()
    result["websocket"] = await _round_trips(spec, ids)
    for device in devices:
        device.close()
    return result


def load(spec_path: str, result_path: str) -> None:
    import uvloop

    raise_nofile()
    spec = json.loads(Path(spec_path).read_text())
    runner = _ingest if spec["mode"] == "ingest" else _commands
    try:
        result = uvloop.run(runner(spec))
    except Exception as exc:  # reported to the orchestrator, which prints it
        result = {"error": f"{type(exc).__name__}: {exc}"}
    Path(result_path).write_text(json.dumps(result))


# -- orchestration (fleetwire bench mqtt) ----------------------------------------------------------


def run(opts: Any) -> int:
    """Start the server, register the devices, run both phases, print the table."""
    import secrets

    from benchmarks import run as bench
    from fleetwire.auth.mint import TokenMinter

    quick = opts.args.quick
    devices = 10 if quick else 50
    duration = opts.duration
    warmup = opts.warmup
    secret = secrets.token_urlsafe(32)
    minter = TokenMinter(secret=secret, algorithms=["HS256"])
    mqtt_port = bench.free_port()
    server = bench.start_fleetwire(
        opts, secret, "fleetwire", extra_env={"FLEETWIRE_MQTT_PORT": str(mqtt_port)}
    )
    results: dict[str, Any] = {}
    try:
        ids = [f"bench-m-{i}" for i in range(devices)]
        bench.register(server, secret, ids)
        spec_devices = [(i, minter.mint(sub=i, role="device", ttl_s=3600).token) for i in ids]
        common = {
            "port": server.port,
            "mqtt_port": mqtt_port,
            "server_pid": server.pid,
            "devices": spec_devices,
            "duration": duration,
            "warmup": warmup,
            "operator": minter.mint(sub="bench-op", role="operator", ttl_s=3600).token,
        }
        for mode, window in (("ingest", 8), ("commands", 16)):
            spec = {**common, "mode": mode, "window": window}
            bench.log(f"[mqtt] {mode}: {devices} devices per transport, window {window}")
            results[mode] = bench.run_loadgen(opts, spec, f"mqtt-{mode}", module="benchmarks.mqtt")
    except bench.BenchError as exc:
        bench.log(f"bench failed: {exc}")
        return 1
    finally:
        server.stop()
    ingest, commands = results["ingest"], results["commands"]
    rows = []
    for transport in ("mqtt", "websocket"):
        i, c = ingest[transport], commands[transport]
        rows.append(
            [
                transport,
                bench._num(i["points_per_s"]),
                bench._num(i["server_us_per_point"], 2),
                f"{i['server_cpu_pct']}%",
                bench._num(c["round_trips_per_s"]),
                bench._num(c["server_us_per_round_trip"], 1),
                bench._num(c["latency_ms"]["p50"], 2),
                bench._num(c["latency_ms"]["p99"], 2),
            ]
        )
    headers = [
        "transport",
        "points/s",
        "srv µs/point",
        "srv CPU",
        "round trips/s",
        "srv µs/rt",
        "p50 ms",
        "p99 ms",
    ]
    print(
        f"fleetwire bench mqtt: {devices} devices per transport, single-record telemetry QoS 1 "
        f"(window 8 per device), commands with 16 in flight "
        f"(FLEETWIRE_MAX_ISSUING_COMMANDS); {duration:g} s measured after {warmup:g} s"
    )
    print(bench._table(headers, rows))
    ratio = bench._ratio(ingest["mqtt"]["server_us_per_point"], ingest["websocket"]["server_us_per_point"])
    print(f"MQTT / WebSocket server µs per point: {ratio}; the machine is shared: only ratios mean much")
    if opts.args.json is not None:
        opts.args.json.parent.mkdir(parents=True, exist_ok=True)
        opts.args.json.write_text(
            json.dumps({"scenario": "mqtt", "machine": bench.machine(), **results}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "load":
        load(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: python -m benchmarks.mqtt load SPEC RESULT (run `fleetwire bench mqtt`)")
