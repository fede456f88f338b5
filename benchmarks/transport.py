"""The transport alone: server CPU per message through the real one-port server.

    uv run python benchmarks/transport.py                  # fleetwire's server, then bare picows
    uv run python benchmarks/transport.py --targets fleetwire --runs 9 --messages 400000
    uv run python benchmarks/transport.py --sansio         # websockets' sans-I/O Protocol, in-process

A server process (uvicorn + the picows adapter + a trivial Handler, or picows' own
`ws_create_server` with the same listener logic: the "bare" baseline) and a picows client in
this process. Scenarios, each `--runs` times, median reported:
- ingest: `--conns` connections each send their share of `--messages` 70-byte text messages;
  the handler counts them (one reply at the end);
- echo:   the same, every message sent back;
- fanout: the server sends `--messages / 10` pre-framed events (`text_frame`, `send_frame`) to
  each of the `--conns` connections;
- handshake: `--handshakes` connections opened, `--conns` at a time, and held until all are
  open (then closed): server CPU per opening handshake of the transport alone, no
  authentication and no session (`fleetwire bench connections` has those).
"Server CPU" is user + system time of the server process (/proc/PID/stat, 10 ms ticks: keep
`--messages` large) over the scenario, divided by the messages delivered. Needs Linux.
`--sansio` instead times websockets' `ServerProtocol` (after a real opening handshake) parsing
the same masked frames from memory and framing outgoing ones: no sockets, no handler.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

import uvloop

PAYLOAD = b'{"type":"telemetry","id":1,"data":{"temperature":21.5,"humidity":40}}'
EVENT = b'{"event":"telemetry","device":"d-1","ts":1700000000000,"data":{"t":21.5}}'

# The server programs run in their own process (argv[1] = fan-out rounds). Both accept
# /echo and /ingest; "fanout" starts the fan-out; "end" asks for the count so far.
FLEETWIRE_SERVER = """
import asyncio, sys, uvloop
from fastapi import FastAPI
try:
    from fleetwire.transport.base import text_frame
    from fleetwire.transport.server import build_server
except ImportError:  # the layout before fleetwire.transport/
    from fleetwire.transport.base import text_frame
    from fleetwire.transport.server import build_server

ROUNDS = int(sys.argv[1])
sockets = []

class H:
    def __init__(self, path): self.echo = path == "/echo"; self.n = 0
    def on_open(self, s): self.s = s; sockets.append(s)
    def on_message(self, payload, is_text):
        if payload == b"fanout":
            asyncio.get_running_loop().create_task(fan())
            return
        self.n += 1
        if payload == b"end":
            self.s.send(b"count:%d" % self.n)
        elif self.echo:
            self.s.send(payload)
    def on_pong(self): pass
    def on_closed(self, code):
        if self.s in sockets: sockets.remove(self.s)

async def fan():
    frame = text_frame(EVENT)
    for _ in range(ROUNDS):
        for s in list(sockets):
            s.send_frame(frame)
        await asyncio.sleep(0)
    end = text_frame(b"end")
    for s in list(sockets):
        s.send_frame(end)

class App:  # a WebSocketApp that decides at once (decide_now), as fleetwire's Handshake does
    def decide_now(self, request): return H(request.path)
    async def __call__(self, request): return H(request.path)

app = App()

async def main():
    server = build_server(FastAPI(), app, port=0, log_level="warning", access_log=False,
                          on_started=lambda port: print(port, flush=True))
    await server.serve()

uvloop.run(main())
"""

BARE_SERVER = """
import asyncio, sys, uvloop
from picows import WSListener, WSMsgType, ws_create_server

ROUNDS = int(sys.argv[1])
transports = []

def text_frame(payload):
    size = len(payload)
    if size < 126: return bytes((0x81, size)) + payload
    return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload

class L(WSListener):
    def __init__(self, path): self.echo = path == "/echo"; self.n = 0
    def on_ws_connected(self, tr): self.tr = tr; transports.append(tr)
    def on_ws_frame(self, tr, frame):
        if frame.msg_type is not WSMsgType.TEXT:
            if frame.msg_type is WSMsgType.CLOSE:
                tr.send_close(); tr.disconnect()
            return
        payload = frame.get_payload_as_bytes()
        if payload == b"fanout":
            asyncio.get_running_loop().create_task(fan())
            return
        self.n += 1
        if payload == b"end":
            tr.send(WSMsgType.TEXT, b"count:%d" % self.n)
        elif self.echo:
            tr.send(WSMsgType.TEXT, payload)
    def on_ws_disconnected(self, tr):
        if tr in transports: transports.remove(tr)

async def fan():
    frame = text_frame(EVENT)
    for _ in range(ROUNDS):
        for tr in list(transports):
            tr.underlying_transport.write(frame)
        await asyncio.sleep(0)
    end = text_frame(b"end")
    for tr in list(transports):
        tr.underlying_transport.write(end)

async def main():
    server = await ws_create_server(lambda request: L(request.path), "127.0.0.1", 0,
                                    enable_auto_pong=True, max_frame_size=262144)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

uvloop.run(main())
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def scenario(port: int, pid: int, kind: str, conns: int, messages: int) -> tuple[float, float]:
    """(server CPU µs per message, messages per second) for one run."""
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    loop = asyncio.get_running_loop()
    done: list[asyncio.Future[None]] = []

    class Client(WSListener):
        def __init__(self) -> None:
            self.finished: asyncio.Future[None] = loop.create_future()
            done.append(self.finished)

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type is WSMsgType.TEXT:
                payload = frame.get_payload_as_bytes()
                if (payload.startswith(b"count:") or payload == b"end") and not self.finished.done():
                    self.finished.set_result(None)

    path = "/echo" if kind == "echo" else "/ingest"
    if kind == "handshake":
        return await handshakes(port, pid, conns, messages)
    clients = [await ws_connect(Client, f"ws://127.0.0.1:{port}{path}") for _ in range(conns)]
    start_cpu, start = cpu_seconds(pid), time.perf_counter()
    if kind == "fanout":
        clients[0][0].send(WSMsgType.TEXT, b"fanout")
    else:
        for transport, _ in clients:
            for _ in range(messages):
                transport.send(WSMsgType.TEXT, PAYLOAD)
            transport.send(WSMsgType.TEXT, b"end")
    await asyncio.wait_for(asyncio.gather(*done), 300)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - start_cpu
    for transport, _ in clients:
        transport.send_close()
        transport.disconnect()
    total = messages * conns
    return cpu / total * 1e6, total / elapsed


async def handshakes(port: int, pid: int, in_flight: int, count: int) -> tuple[float, float]:
    """(server CPU µs per handshake, handshakes per second): `count` connections opened,
    `in_flight` at a time, all held until the last is open."""
    from picows import WSListener, ws_connect

    gate = asyncio.Semaphore(in_flight)
    opened: list[Any] = []

    async def one() -> None:
        async with gate:
            transport, _ = await ws_connect(WSListener, f"ws://127.0.0.1:{port}/ingest")
            opened.append(transport)

    start_cpu, start = cpu_seconds(pid), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 300)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - start_cpu
    for transport in opened:
        transport.disconnect()
    await asyncio.sleep(0.5)  # let the server close them before the next run (not measured)
    return cpu / count * 1e6, count / elapsed


async def run_target(name: str, program: str, args: argparse.Namespace) -> None:
    rounds = args.messages // 10
    code = f"EVENT = {EVENT!r}\n" + program
    env = dict(os.environ)
    if args.src:  # another checkout's fleetwire, e.g. `git archive <rev> src | tar -x -C /tmp/old`
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.src, env.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(rounds), stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 60))
        plans = {
            "ingest": args.messages // args.conns,
            "echo": args.messages // args.conns,
            "fanout": rounds,
            "handshake": args.handshakes,
        }
        for kind, per_conn in plans.items():
            if kind not in args.scenarios:
                continue
            runs = [await scenario(port, proc.pid, kind, args.conns, per_conn) for _ in range(args.runs)]
            cpu = sorted(run[0] for run in runs)
            rate = statistics.median(run[1] for run in runs)
            print(
                f"{args.label or name:9s} {kind:6s} {args.conns} conns x {per_conn} msgs: "
                f"server CPU {statistics.median(cpu):.2f} µs/msg (runs {cpu[0]:.2f}-{cpu[-1]:.2f}), "
                f"{rate:,.0f} msg/s",
                flush=True,
            )
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


def sansio(messages: int) -> None:
    from importlib.metadata import version

    from websockets.http11 import Request
    from websockets.protocol import State
    from websockets.server import ServerProtocol

    key = os.urandom(4)
    masked = bytes([0x81, 0x80 | len(PAYLOAD)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(PAYLOAD))
    chunk = masked * 100
    for label in ("receive", "send"):
        best = float("inf")
        for _ in range(5):
            protocol = ServerProtocol(max_size=262144)
            protocol.receive_data(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            (request,) = protocol.events_received()
            assert isinstance(request, Request)  # the first event of a server is the request
            protocol.send_response(protocol.accept(request))
            protocol.data_to_send()
            assert protocol.state is State.OPEN
            received = 0
            started = time.process_time()
            if label == "receive":
                for _ in range(messages // 100):
                    protocol.receive_data(chunk)
                    received += len(protocol.events_received())
                assert received == messages // 100 * 100
            else:
                for _ in range(messages):
                    protocol.send_text(PAYLOAD)
                    protocol.data_to_send()
            best = min(best, (time.process_time() - started) / messages * 1e6)
        print(f"websockets {version('websockets')} ServerProtocol {label}: {best:.2f} µs/frame (best of 5)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--handshakes", type=int, default=3000, help="connections per handshake run")
    parser.add_argument("--targets", nargs="+", default=["fleetwire", "bare"], choices=["fleetwire", "bare"])
    parser.add_argument("--sansio", action="store_true", help="time websockets' sans-I/O Protocol only")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["ingest", "echo", "fanout"],
        choices=["ingest", "echo", "fanout", "handshake"],
    )
    parser.add_argument("--label", help="name printed for the target")
    parser.add_argument("--src", help="import fleetwire from this directory (before/after comparisons)")
    args = parser.parse_args()
    if args.sansio:
        sansio(args.messages)
        return
    programs: dict[str, Any] = {"fleetwire": FLEETWIRE_SERVER, "bare": BARE_SERVER}
    for target in args.targets:
        await run_target(target, programs[target], args)


if __name__ == "__main__":
    uvloop.run(main())
