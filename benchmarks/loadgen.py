"""The load generator: one uvloop + picows client process (pinned to its own core by the runner).

    python -m benchmarks.loadgen SPEC.json RESULT.json

SPEC (written by `benchmarks.run`) names the scenario, the server(s) (WebSocket base URLs
and pids, for their CPU and RSS), the JWT secret and the sizes. The same code drives fleetwire
and the bare picows servers of `benchmarks.bare`. Progress goes to stderr, the result to
RESULT.json. Every measured window reports the CPU use of this process, of the server
process(es) and of each core (from /proc), so a reader sees who saturated.

Hot paths (one callback per received frame) do as little as possible: count, and only in the
fixed-rate phases read the payload for the latency marker.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, cast

import orjson
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from benchmarks.common import BENCH_ID_HEADER, Progress, latency_ms
from benchmarks.sysinfo import CpuWindow, proc_cpu_s, proc_rss_kb, raise_nofile

_TEXT = WSMsgType.TEXT
_CLOSE = WSMsgType.CLOSE
_N_MARK = re.compile(rb'"bench_n":(\d+)')
_NO_PUMP = 1 << 62
# name -> command-line fragment of processes whose CPU is reported too (spec["services"]).
SERVICES: dict[str, str] = {}
# uvloop's own transports, not aiofastnet's (picows' default when installed): measured, the
# generator's connect path is ~45 % faster with them (10k handshakes) and fan-out is the same.
USE_AIOFASTNET = False
now_ns = time.perf_counter_ns

Spec = dict[str, Any]
Result = dict[str, Any]


def mint(secret: str, sub: str, role: str, ttl_s: float = 6 * 3600) -> str:
    from fleetwire.auth.mint import TokenMinter

    # The server under test runs with FLEETWIRE_JWT_SECRET=secret and the default HS256.
    return TokenMinter(secret=secret, algorithms=["HS256"]).mint(sub=sub, role=role, ttl_s=ttl_s).token


# --------------------------------------------------------------------------------------------
# Connections


class Client(WSListener):
    """A connection in two modes: setup (text frames queue up for `recv`) and run (a subclass
    handles frames itself once `inbox` is set to None)."""

    def __init__(self) -> None:
        super().__init__()
        self.tr: WSTransport = cast(WSTransport, None)
        self.inbox: asyncio.Queue[bytes] | None = asyncio.Queue()
        self.close_code: int | None = None
        self.disconnected = False
        self._next_request = 0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.tr = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is _TEXT:
            if self.inbox is not None:
                self.inbox.put_nowait(frame.get_payload_as_bytes())
            else:
                self.on_text(frame)
        elif frame.msg_type is _CLOSE:
            self.on_close_frame(transport, frame)

    def on_text(self, frame: WSFrame) -> None:
        pass

    def on_close_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.close_code = frame.get_close_code().value if frame.payload_size >= 2 else 1005
        transport.send_close(WSCloseCode.OK)
        transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True

    def send(self, payload: bytes) -> None:
        self.tr.send(_TEXT, payload)

    async def recv(self, wait_s: float = 30.0) -> dict[str, Any]:
        assert self.inbox is not None
        message: dict[str, Any] = orjson.loads(await asyncio.wait_for(self.inbox.get(), wait_s))
        return message

    async def request(self, message: dict[str, Any], wait_s: float = 30.0) -> dict[str, Any]:
        self._next_request += 1
        request_id = f"setup-{self._next_request}"
        self.send(orjson.dumps({**message, "id": request_id}))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            reply = await self.recv(max(deadline - loop.time(), 0.001))
            if reply.get("id") == request_id and reply.get("type") in ("ack", "error"):
                return reply

    def run_mode(self) -> None:
        self.inbox = None

    def close(self) -> None:
        if not self.disconnected:
            self.tr.disconnect(graceful=False)


L = Any  # a Client subclass instance


async def open_ws(
    url: str, token: str, bench_id: str, factory: Callable[[], Client], *, read_buffer: int = 16384
) -> Any:
    """Connect, authenticate (Bearer) and wait for the server's first message (welcome)."""
    _, listener = await ws_connect(
        factory,
        url,
        extra_headers={"Authorization": f"Bearer {token}", BENCH_ID_HEADER: bench_id},
        websocket_handshake_timeout=30,
        enable_auto_pong=True,
        read_buffer_init_size=read_buffer,
        max_frame_size=16 * 1024 * 1024,
        use_aiofastnet=USE_AIOFASTNET,
    )
    client = cast(Client, listener)
    welcome = await client.recv(30.0)
    if welcome.get("type") != "welcome":
        client.close()
        raise RuntimeError(f"expected welcome, got {welcome}")
    return client


async def open_many(
    count: int,
    concurrency: int,
    opener: Callable[[int], Awaitable[Any]],
    progress: Progress,
    label: str,
) -> tuple[list[Any], list[str]]:
    """Open `count` connections with at most `concurrency` handshakes in flight."""
    results: list[Any] = [None] * count
    errors: list[str] = []
    next_index = 0
    done = 0

    async def worker() -> None:
        nonlocal next_index, done
        while next_index < count:
            index = next_index
            next_index += 1
            try:
                results[index] = await opener(index)
            except Exception as exc:  # counted and reported
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
            done += 1

    loop = asyncio.get_running_loop()
    start = loop.time()
    workers = [loop.create_task(worker()) for _ in range(min(concurrency, count))]
    waiting = asyncio.gather(*workers)
    while not waiting.done():
        progress.phase(
            label, 0, lambda: f"{done}/{count} connected, {len(errors)} failed", loop.time(), start
        )
        await asyncio.wait([waiting], timeout=0.25)
    await waiting
    progress.phase(label, 0, lambda: f"{done}/{count} connected, {len(errors)} failed", loop.time(), start)
    return [r for r in results if r is not None], errors


def close_all(clients: Sequence[Any]) -> None:
    for client in clients:
        client.close()


def closes(clients: Sequence[Any]) -> dict[str, int]:
    """Close codes the server sent (e.g. 4008 slow_consumer), counted."""
    counts: dict[str, int] = {}
    for client in clients:
        if client.close_code is not None:
            key = str(client.close_code)
            counts[key] = counts.get(key, 0) + 1
        elif client.disconnected:
            counts["dropped"] = counts.get("dropped", 0) + 1
    return counts


# --------------------------------------------------------------------------------------------
# Timing helpers


async def run_for(
    progress: Progress,
    name: str,
    seconds: float,
    status: Callable[[], str],
    on_tick: Callable[[], None] | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + seconds
    while True:
        now = loop.time()
        progress.phase(name, seconds, status, now, start)
        if now >= end:
            return
        if on_tick is not None:
            on_tick()
        await asyncio.sleep(min(0.25, end - now))


async def paced(
    rate: float,
    seconds: float,
    send: Callable[[int], None],
    first: int,
    progress: Progress,
    name: str,
    status: Callable[[], str],
) -> int:
    """Call send(k) for k = first, first+1, … at `rate` per second for `seconds`; returns the next k.
    A late timer catches up (the rate holds); each send reads the clock itself."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    k = first
    last_progress = 0.0
    while True:
        now = loop.time()
        elapsed = now - start
        if elapsed >= seconds:
            break
        due = first + int(elapsed * rate) + 1
        while k < due:
            send(k)
            k += 1
        if now - last_progress >= 0.25:
            progress.phase(name, seconds, status, now, start)
            last_progress = now
        # At least 1 ms: libuv timers have millisecond resolution, a shorter sleep would spin.
        await asyncio.sleep(max(0.001, start + (k - first) / rate - loop.time()))
    progress.phase(name, seconds, status, loop.time(), start)
    return k


async def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll `condition` every 50 ms for at most `seconds` (counters, not events, change here)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def rate_status(counter: Callable[[], int], unit: str) -> Callable[[], str]:
    """A live rate for the progress line, over the last second or so."""
    state: dict[str, float] = {"t": time.monotonic(), "n": counter(), "rate": 0.0}

    def status() -> str:
        now, n = time.monotonic(), counter()
        dt = now - state["t"]
        if dt >= 1.0:
            state.update(t=now, n=n, rate=(n - state["n"]) / dt)
        return f"{state['rate']:,.0f} {unit}/s"

    return status


def pyspy_binary() -> str:
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy") or "py-spy"


class Profiler:
    """`py-spy record --format raw` on the first server pid during one measured window.

    spec["profile"] = {"dir": ..., "prefix": ..., "seconds": ..., "phases": [...]}; the output is
    DIR/PREFIX-PHASE.raw (collapsed stacks, one line per stack with its sample count)."""

    def __init__(self, spec: Spec, phase: str) -> None:
        profile = spec.get("profile") or {}
        self.enabled = phase in profile.get("phases", ()) and bool(spec["server_pids"])
        name = f"{profile.get('prefix', 'profile')}-{phase.replace(' ', '-')}.raw"
        self.path = str(Path(profile.get("dir", ".")) / name)
        self.seconds = float(profile.get("seconds", 10))
        # Without it, a thread waiting for the GIL after a syscall counts as busy where it
        # waits (uvicorn's getsockname looked like 20 % of a handshake: results.md).
        self.gil = ["--gil"] if profile.get("gil") else []
        self.pid = int(spec["server_pids"][0]) if spec["server_pids"] else 0
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, window_s: float) -> None:
        if not self.enabled:
            return
        seconds = max(1, int(min(self.seconds, window_s)))
        self.process = await asyncio.create_subprocess_exec(
            pyspy_binary(), "record", "--pid", str(self.pid), "--duration", str(seconds), "--rate", "100",
            "--format", "raw", "--threads", "--nonblocking", "--output", self.path, *self.gil,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    async def wait(self) -> str | None:
        if self.process is None:
            return None
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
        return self.path


def server_cpu_per_op_us(cpu: dict[str, Any], ops: int, part: str = "server_cpu_pct") -> float:
    """Server CPU µs per operation; `part="server_loop_cpu_pct"`: its event-loop thread only."""
    if ops <= 0:
        return float("nan")
    busy_s = sum(cpu[part].values()) / 100.0 * cpu["wall_s"]
    return round(float(busy_s) / ops * 1e6, 2)


def server_pids(spec: Spec) -> dict[str, int]:
    pids = spec["server_pids"]
    return {f"server{i}" if len(pids) > 1 else "server": int(pid) for i, pid in enumerate(pids)}


# --------------------------------------------------------------------------------------------
# fanout (and cluster): one device, many subscribers


class FanoutState:
    def __init__(self, subscribers: int, window: int, make: Callable[[int], bytes]) -> None:
        self.subs = subscribers
        self.window = window
        self.make = make
        self.pub: WSTransport = cast(WSTransport, None)
        self.sent = 0
        self.received = 0
        self.credit = 0  # messages written off by the stall watchdog (lost deliveries)
        self.pump_at = _NO_PUMP
        self.latency = False
        self.send_ns: dict[int, int] = {}
        self.errors = 0
        self.last_error = b""

    def pump(self) -> None:
        subs, window, pub, make = self.subs, self.window, self.pub, self.make
        while self.sent - self.received // subs - self.credit < window:
            pub.send(_TEXT, make(self.sent))
            self.sent += 1
        self.pump_at = (self.sent - window + 1 + self.credit) * subs

    def send_timed(self, n: int) -> None:
        self.send_ns[n] = now_ns()
        self.pub.send(_TEXT, self.make(n))
        self.sent += 1


class Group:
    """The subscribers of one server (cluster: node A or node B)."""

    def __init__(self, name: str) -> None:
        self.name = name
        # The receive time and the payload of each frame of the fixed-rate phase, read after
        # it ends. Two lists, not a list of pairs: ints and bytes are not tracked by the
        # garbage collector, 200,000 tuples were (and made it run during the phase).
        self.received_ns: list[int] = []
        self.payloads: list[bytes] = []


class Publisher(Client):
    def __init__(self, st: FanoutState) -> None:
        super().__init__()
        self.st = st

    def on_text(self, frame: WSFrame) -> None:
        payload = frame.get_payload_as_bytes()
        if payload.startswith(b'{"type":"error"'):
            self.st.errors += 1
            self.st.last_error = payload[:300]


class Subscriber(Client):
    def __init__(self, st: FanoutState, group: Group) -> None:
        super().__init__()
        self.st = st
        self.group = group
        self.received = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # The hot path of the whole generator: one call per delivery.
        if self.inbox is not None or frame.msg_type is not _TEXT:
            Client.on_ws_frame(self, transport, frame)
            return
        self.received += 1
        st = self.st
        st.received += 1
        if st.latency:
            # The clock and the bytes only: finding the message number (a regex, an int, a
            # lookup) waits until the phase is over. It cost 0.4 µs per frame here, and the
            # 1,000 frames of one message are read one after the other, so the last one's
            # latency carried 0.4 ms of the generator's own work.
            group = self.group
            group.received_ns.append(now_ns())
            group.payloads.append(frame.get_payload_as_bytes())
        elif st.received >= st.pump_at:
            st.pump()


class Samples:
    """The latency samples of the fixed-rate phase, found in the arrivals of each group."""

    def __init__(self, groups: Sequence[Group], send_ns: dict[int, int]) -> None:
        self.per_group: dict[str, list[int]] = {}
        self.first: dict[int, int] = {}  # message number -> its first delivery's latency
        self.last: dict[int, int] = {}
        self.frames = self.bytes = 0
        for group in groups:
            samples = self.per_group[group.name] = []
            for received_at, payload in zip(group.received_ns, group.payloads, strict=True):
                match = _N_MARK.search(payload)
                sent_at = None if match is None else send_ns.get(n := int(match.group(1)))
                if sent_at is None:
                    continue
                latency = received_at - sent_at
                samples.append(latency)
                self.first[n] = min(self.first.get(n, latency), latency)
                self.last[n] = max(self.last.get(n, latency), latency)
                self.frames += 1
                self.bytes += len(payload)

    def all(self) -> list[int]:
        return [s for samples in self.per_group.values() for s in samples]


def group_counts(subs: Sequence[Subscriber], groups: Sequence[Group]) -> list[int]:
    counts = {g.name: 0 for g in groups}
    for sub in subs:
        counts[sub.group.name] += sub.received
    return [counts[g.name] for g in groups]


def fanout_message(kind: str, event_bytes: int) -> Callable[[int], bytes]:
    """The device's telemetry message for message number n, sized so that what a subscriber
    receives is about `event_bytes`: fleetwire's `device.telemetry` event (envelope, seq, two
    timestamps and the values), or, for the bare server, the device message itself."""
    values: dict[str, Any] = {"bench_n": 100000, "temp": 21.5, "pad": ""}
    stamp = "2026-11-25T20:00:00.000Z"
    probe: dict[str, Any]
    if kind == "bare":
        probe = {"type": "telemetry", "data": values}
    else:
        probe = {
            "type": "event",
            "event": "device.telemetry",
            "device_id": "bench-pub",
            "seq": 100000,
            "at": stamp,
            "data": {"ts": stamp, "values": values},
        }
    pad = max(0, event_bytes - len(orjson.dumps(probe)))
    head = b'{"type":"telemetry","data":{"bench_n":'
    tail = b',"temp":21.5,"pad":"' + b"x" * pad + b'"}}'

    def make(n: int) -> bytes:
        return head + str(n).encode() + tail

    return make


async def run_fanout(spec: Spec, progress: Progress) -> Result:
    p = spec["params"]
    urls: list[str] = spec["urls"]
    subscribers = int(p["subscribers"])
    secret = spec["secret"]
    st = FanoutState(subscribers, int(p["window"]), fanout_message(spec["kind"], int(p["event_bytes"])))
    groups = [Group(name) for name in spec.get("url_names") or [f"server{i}" for i in range(len(urls))]]

    publisher = cast(
        Publisher,
        await open_ws(f"{urls[0]}/ws/device", mint(secret, "bench-pub", "device"), "bench-pub",
                      lambda: Publisher(st)),
    )  # fmt: skip
    st.pub = publisher.tr
    viewer = mint(secret, "bench-viewer", "viewer")

    async def subscriber(i: int) -> Any:
        group = groups[i % len(urls)]
        client = await open_ws(
            f"{urls[i % len(urls)]}/ws/client", viewer, f"sub-{i}", lambda: Subscriber(st, group)
        )
        reply = await client.request({"type": "subscribe", "devices": ["bench-pub"], "events": ["telemetry"]})
        if reply.get("type") != "ack":
            client.close()
            raise RuntimeError(f"subscribe refused: {reply}")
        return client

    subs, errors = await open_many(subscribers, 100, subscriber, progress, "subscribe")
    progress.end()
    if errors:
        raise RuntimeError(f"{len(errors)} subscribers failed, first: {errors[0]}")
    for client in subs:
        client.run_mode()
    publisher.run_mode()
    gc.collect()
    gc.freeze()
    await asyncio.sleep(0.5)
    pids = server_pids(spec)
    result: Result = {"subscribers": subscribers, "window": st.window, "groups": [g.name for g in groups]}

    # -- saturation: keep `window` messages in flight (counted in deliveries) ------------------
    status = rate_status(lambda: st.received, "deliveries")
    stall = {"received": -1, "since": time.monotonic()}

    def watchdog() -> None:
        if st.received != stall["received"]:
            stall.update(received=st.received, since=time.monotonic())
        elif time.monotonic() - stall["since"] > 2.0 and st.pump_at != _NO_PUMP:
            st.credit += 1  # a delivery went missing: write one message off and go on
            stall["since"] = time.monotonic()
            st.pump()

    st.pump()
    await run_for(progress, "sat. warm-up", spec["warmup"], status, watchdog)
    profiler = Profiler(spec, "saturation")
    window = CpuWindow(pids, SERVICES).start()
    received0, groups0, credit0 = st.received, group_counts(subs, groups), st.credit
    await profiler.start(spec["duration"])
    await run_for(progress, "saturation", spec["duration"], status, watchdog)
    cpu = window.stop()
    delivered = st.received - received0
    groups1 = group_counts(subs, groups)
    st.pump_at = _NO_PUMP
    await profiler.wait()
    result["saturation"] = {
        "deliveries_per_s": round(delivered / cpu["wall_s"]),
        "messages_per_s": round(delivered / cpu["wall_s"] / subscribers, 1),
        "per_group_deliveries_per_s": {
            g.name: round((g1 - g0) / cpu["wall_s"])
            for g, g0, g1 in zip(groups, groups0, groups1, strict=True)
        },
        "server_us_per_delivery": server_cpu_per_op_us(cpu, delivered),
        "written_off_messages": st.credit - credit0,
        "cpu": cpu,
    }
    # drain what is in flight
    await wait_until(lambda: st.received >= (st.sent - st.credit) * subscribers, 15)
    await asyncio.sleep(0.3)

    # -- latency at a fixed delivery rate -------------------------------------------------------
    rate = float(p["rate"])
    msg_rate = rate / subscribers
    st.latency = True
    status = rate_status(lambda: st.received, "deliveries")

    def send_untimed(n: int) -> None:
        st.pub.send(_TEXT, st.make(n))
        st.sent += 1

    start = st.sent
    k = await paced(msg_rate, min(spec["warmup"], 2.0), send_untimed, start, progress, "lat. warm-up", status)
    # The measured messages follow the warm-up's at the same pace, without a pause: after an
    # idle spell longer than TCP's retransmission timeout (200 ms) every connection ACKs its
    # next 16 segments at once (quick-ack mode), an extra packet per write on the server's
    # core, and the first 16 messages' writes took 10-13 ms instead of 7 (measured). The
    # warm-up's frames are told apart after the phase: they have no send time.
    window = CpuWindow(pids, SERVICES).start()
    received0 = st.received
    first = k
    k = await paced(msg_rate, spec["duration"], st.send_timed, k, progress, "latency", status)
    measured_messages = k - first
    cpu = window.stop()
    expected = measured_messages * subscribers
    every_frame = (k - start) * subscribers
    await wait_until(lambda: sum(len(g.received_ns) for g in groups) >= every_frame, 10)
    st.latency = False
    progress.end()
    found = Samples(groups, st.send_ns)
    all_samples = found.all()
    result["latency"] = {
        "target_deliveries_per_s": rate,
        "messages_per_s": round(msg_rate, 2),
        "achieved_deliveries_per_s": round((st.received - received0) / cpu["wall_s"]),
        "latency_ms": latency_ms(all_samples),
        "per_group_latency_ms": {name: latency_ms(s) for name, s in found.per_group.items()},
        # Per message: its first delivery (what the server adds before its first write) and
        # its last (the first plus the time its 1,000 writes and reads take).
        "per_message_ms": {
            "first": latency_ms(list(found.first.values())),
            "last": latency_ms(list(found.last.values())),
        },
        "lost_deliveries": expected - len(all_samples),
        "server_us_per_delivery": server_cpu_per_op_us(cpu, expected),
        "cpu": cpu,
    }
    result["frame_bytes"] = round(found.bytes / found.frames, 1) if found.frames else None
    result["publisher_errors"] = st.errors
    if st.errors:
        result["publisher_last_error"] = st.last_error.decode(errors="replace")
    result["server_closes"] = closes(subs)
    close_all([*subs, publisher])
    return result


# --------------------------------------------------------------------------------------------
# ingest: N devices, a window of requests in flight each


class IngestState:
    def __init__(self) -> None:
        self.running = False
        self.measuring = False
        self.prefix = b""
        self.suffix = b""
        self.batch = 1
        self.points = 0
        self.messages = 0
        self.acked_total = 0
        self.samples: list[int] = []
        self.errors = 0
        self.last_error = b""


_ACK_PREFIX = b'{"type":"ack","id":'
_ACK_ID_AT = len(_ACK_PREFIX)


def masked_text_frame(payload: bytes) -> bytes:
    """A client text frame with an all-zero masking key (RFC 6455 §5.3: the payload XOR 0 is the
    payload), so that several requests go out in ONE transport write."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, 0x80 | size))
    elif size < 65536:
        head = bytes((0x81, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class IngestDevice(Client):
    """A device with a window of requests in flight: each ack frees a slot; the requests owed
    are written together once picows has handed over every frame of the current read."""

    def __init__(self, st: IngestState) -> None:
        super().__init__()
        self.st = st
        self.request_id = 0
        self.owed = 0
        self.inflight: dict[int, int] = {}

    def flush(self) -> None:
        count, self.owed = self.owed, 0
        if count <= 0 or self.disconnected:
            return
        st = self.st
        prefix, suffix, inflight = st.prefix, st.suffix, self.inflight
        rid = self.request_id
        sent_at = now_ns()
        frames = []
        for _ in range(count):
            rid += 1
            inflight[rid] = sent_at
            frames.append(masked_text_frame(prefix + str(rid).encode() + suffix))
        self.request_id = rid
        self.tr.underlying_transport.write(b"".join(frames))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.inbox is not None or frame.msg_type is not _TEXT:
            Client.on_ws_frame(self, transport, frame)
            return
        payload = frame.get_payload_as_bytes()
        st = self.st
        st.acked_total += 1
        rid: Any = None
        ok = False
        if payload.startswith(_ACK_PREFIX):  # fast path: `{"type":"ack","id":N,"accepted":n}`
            end = payload.find(b",", _ACK_ID_AT)
            if end > 0 and payload[_ACK_ID_AT:end].isdigit():
                rid = int(payload[_ACK_ID_AT:end])
                ok = True
        if rid is None:
            message = orjson.loads(payload)
            rid = message.get("id")
            ok = message.get("type") == "ack"
            if not ok:
                st.errors += 1
                st.last_error = payload[:300]
        sent_at = self.inflight.pop(rid, None)
        if ok and st.measuring and sent_at is not None:
            st.points += st.batch
            st.messages += 1
            st.samples.append(now_ns() - sent_at)
        if st.running:
            self.owed += 1
            if frame.last_in_buffer:
                self.flush()


_RECORD = b'{"temp":21.5,"hum":40.25,"on":true,"count":7}'


async def run_ingest(spec: Spec, progress: Progress) -> Result:
    p = spec["params"]
    url = spec["urls"][0]
    secret = spec["secret"]
    ids = [f"bench-dev-{i}" for i in range(int(p["devices"]))]
    tokens = [mint(secret, device_id, "device") for device_id in ids]
    st = IngestState()

    devices, errors = await open_many(
        len(ids), 50,
        lambda i: open_ws(f"{url}/ws/device", tokens[i], ids[i], lambda: IngestDevice(st)),
        progress, "connect",
    )  # fmt: skip
    progress.end()
    if errors:
        raise RuntimeError(f"{len(errors)} devices failed to connect, first: {errors[0]}")
    for device in devices:
        device.run_mode()
    gc.collect()
    gc.freeze()
    pids = server_pids(spec)
    phases: list[dict[str, Any]] = []
    for name, batch, window_per_conn in p["phases"]:
        if batch == 1:
            st.prefix, st.suffix = b'{"type":"telemetry","id":', b',"data":' + _RECORD + b"}"
        else:
            records = b",".join([b'{"data":' + _RECORD + b"}"] * batch)
            st.prefix, st.suffix = b'{"type":"telemetry_batch","id":', b',"records":[' + records + b"]}"
        st.batch = batch
        st.points = st.messages = 0
        st.samples = []
        st.running = True
        for device in devices:
            device.owed = window_per_conn
            device.flush()
        status = rate_status(lambda: st.acked_total * st.batch, "points")

        def flush_stragglers() -> None:  # requests owed but not written (no last_in_buffer seen)
            for device in devices:
                if device.owed:
                    device.flush()

        await run_for(progress, f"{name} warm-up", spec["warmup"], status, flush_stragglers)
        profiler = Profiler(spec, name)
        window = CpuWindow(pids, SERVICES).start()
        st.measuring = True
        await profiler.start(spec["duration"])
        await run_for(progress, name, spec["duration"], status, flush_stragglers)
        st.measuring = False
        cpu = window.stop()
        st.running = False
        points, messages, samples = st.points, st.messages, st.samples
        await profiler.wait()
        await wait_until(lambda: not any(d.inflight for d in devices), 30)
        progress.end()
        phases.append(
            {
                "phase": name,
                "batch": batch,
                "window_per_connection": window_per_conn,
                "message_bytes": len(st.prefix) + 3 + len(st.suffix),
                "points_per_s": round(points / cpu["wall_s"]),
                "messages_per_s": round(messages / cpu["wall_s"]),
                "ack_latency_ms": latency_ms(samples),
                "server_us_per_point": server_cpu_per_op_us(cpu, points),
                "server_us_per_message": server_cpu_per_op_us(cpu, messages),
                "server_loop_us_per_point": server_cpu_per_op_us(cpu, points, "server_loop_cpu_pct"),
                "unanswered": sum(len(d.inflight) for d in devices),
                "cpu": cpu,
            }
        )
        await asyncio.sleep(0.5)
    result: Result = {
        "devices": len(devices),
        "phases": phases,
        "errors": st.errors,
        "server_closes": closes(devices),
    }
    if st.errors:
        result["last_error"] = st.last_error.decode(errors="replace")
    close_all(devices)
    return result


# --------------------------------------------------------------------------------------------
# connections: many idle authenticated device connections


async def run_connections(spec: Spec, progress: Progress) -> Result:
    p = spec["params"]
    url = spec["urls"][0]
    secret = spec["secret"]
    count = int(p["connections"])
    ids = [f"bench-c-{i}" for i in range(count)]
    progress.note(f"minting {count} device tokens")
    tokens = [mint(secret, device_id, "device") for device_id in ids]
    pids = server_pids(spec)
    pid = int(spec["server_pids"][0])
    gc.collect()
    await asyncio.sleep(1.0)
    rss_before = proc_rss_kb(pid)
    profiler = Profiler(spec, "handshakes")
    await profiler.start(spec["duration"])
    window = CpuWindow(pids, SERVICES).start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    conns, errors = await open_many(
        count, int(p["concurrency"]),
        lambda i: open_ws(f"{url}/ws/device", tokens[i], ids[i], Client, read_buffer=2048),
        progress, "handshakes",
    )  # fmt: skip
    elapsed = loop.time() - start
    cpu = window.stop()
    await profiler.wait()
    progress.end()
    for conn in conns:
        conn.run_mode()
    # Let the server finish the work a connection starts (presence, `device.connected` writes).
    settle_start = loop.time()
    while loop.time() - settle_start < 30:
        before = proc_cpu_s(pid)
        await asyncio.sleep(0.5)
        if (proc_cpu_s(pid) - before) / 0.5 < 0.05:
            break
        progress.phase("settle", 0, lambda: "waiting for the server to go idle", loop.time(), settle_start)
    progress.end()
    rss_after = proc_rss_kb(pid)
    idle = CpuWindow(pids, SERVICES).start()
    await run_for(progress, "idle", min(5.0, spec["duration"]), lambda: f"{len(conns)} open")
    idle_cpu = idle.stop()
    progress.end()
    alive = sum(1 for c in conns if not c.disconnected)
    server_cpu_s = sum(cpu["server_cpu_pct"].values()) / 100.0 * cpu["wall_s"]
    result: Result = {
        "connections": count,
        "connected": len(conns),
        "alive_after_idle": alive,
        "failed": len(errors),
        "first_errors": errors[:3],
        "concurrency": int(p["concurrency"]),
        "handshake_s": round(elapsed, 3),
        "handshakes_per_s": round(len(conns) / elapsed) if elapsed > 0 else None,
        "server_cpu_ms_per_handshake": round(server_cpu_s * 1000 / len(conns), 3) if conns else None,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "rss_per_connection_kb": round((rss_after - rss_before) / len(conns), 2) if conns else None,
        "cpu": cpu,
        "idle_cpu": idle_cpu,
        "server_closes": closes(conns),
    }
    close_all(conns)
    await asyncio.sleep(0.5)
    return result


# --------------------------------------------------------------------------------------------
# commands: client -> device -> result -> client at a steady rate


class CommandState:
    def __init__(self) -> None:
        self.send_ns: dict[int, int] = {}
        self.samples: list[int] = []
        self.ack_samples: list[int] = []
        self.refused_samples: list[int] = []  # error replies in the window: how fast a refusal came
        self.measure_from = 1 << 62
        self.measure_to = 1 << 62
        self.acks = 0
        self.results = 0
        self.failed = 0
        self.errors = 0
        self.last_error = b""


class CommandDevice(Client):
    def on_text(self, frame: WSFrame) -> None:
        payload = frame.get_payload_as_bytes()
        if not payload.startswith(b'{"type":"command"'):
            return  # acks of our results
        message = orjson.loads(payload)
        self.send(
            orjson.dumps(
                {
                    "type": "command_result",
                    "command_id": message["command_id"],
                    "ok": True,
                    "result": message.get("params") or {},
                }
            )
        )


class CommandClient(Client):
    def __init__(self, st: CommandState) -> None:
        super().__init__()
        self.st = st

    def on_text(self, frame: WSFrame) -> None:
        payload = frame.get_payload_as_bytes()
        message = orjson.loads(payload)
        kind = message.get("type")
        st = self.st
        if kind == "command_result":
            st.results += 1
            if message.get("state") != "succeeded":
                st.failed += 1
            n = (message.get("result") or {}).get("n")
            sent_at = st.send_ns.pop(n, None) if isinstance(n, int) else None
            if sent_at is not None and st.measure_from <= cast(int, n) < st.measure_to:
                st.samples.append(now_ns() - sent_at)
        elif kind == "ack":
            st.acks += 1
            request_id = message.get("id")
            sent_at = st.send_ns.get(request_id)
            if sent_at is not None and st.measure_from <= request_id < st.measure_to:
                st.ack_samples.append(now_ns() - sent_at)
        elif kind == "error":
            st.errors += 1
            st.last_error = payload[:300]
            request_id = message.get("id")
            sent_at = st.send_ns.pop(request_id, None)
            if sent_at is not None and st.measure_from <= request_id < st.measure_to:
                st.refused_samples.append(now_ns() - sent_at)


async def run_commands(spec: Spec, progress: Progress) -> Result:
    p = spec["params"]
    url = spec["urls"][0]
    secret = spec["secret"]
    device_ids = [f"bench-cmd-{i}" for i in range(int(p["devices"]))]
    st = CommandState()
    devices, errors = await open_many(
        len(device_ids), 50,
        lambda i: open_ws(f"{url}/ws/device", mint(secret, device_ids[i], "device"), device_ids[i],
                          CommandDevice),
        progress, "devices",
    )  # fmt: skip
    operator = mint(secret, "bench-operator", "operator")
    clients, client_errors = await open_many(
        int(p["clients"]), 50,
        lambda i: open_ws(f"{url}/ws/client", operator, f"client-{i}", lambda: CommandClient(st)),
        progress, "clients",
    )  # fmt: skip
    progress.end()
    if errors or client_errors:
        raise RuntimeError(f"connections failed: {(errors + client_errors)[0]}")
    for conn in [*devices, *clients]:
        conn.run_mode()
    gc.collect()
    gc.freeze()
    await asyncio.sleep(1.0)  # fleetwire records presence asynchronously after the welcome
    rate = float(p["rate"])
    params_pad = "x" * int(p.get("params_bytes", 0))

    def send(k: int) -> None:
        client = clients[k % len(clients)]
        body: dict[str, Any] = {"n": k}
        if params_pad:
            body["pad"] = params_pad
        payload = orjson.dumps(
            {
                "type": "command",
                "id": k,
                "device_id": device_ids[k % len(device_ids)],
                "name": "bench.echo",
                "params": body,
                "timeout_s": 30,
            }
        )
        st.send_ns[k] = now_ns()
        client.send(payload)

    status = rate_status(lambda: st.results, "round trips")
    k = await paced(rate, spec["warmup"], send, 0, progress, "warm-up", status)
    pids = server_pids(spec)
    profiler = Profiler(spec, "round trips")
    await profiler.start(spec["duration"])
    window = CpuWindow(pids, SERVICES).start()
    st.measure_from = k
    results0 = st.results
    st.measure_to = 1 << 62
    k = await paced(rate, spec["duration"], send, k, progress, "round trips", status)
    st.measure_to = k
    cpu = window.stop()
    completed_in_window = st.results - results0
    await profiler.wait()
    expected = st.measure_to - st.measure_from
    # Every command of the window answered: a result, or a refusal (bounded: 10 s).
    await wait_until(lambda: len(st.samples) + len(st.refused_samples) >= expected, 10)
    progress.end()
    result: Result = {
        "devices": len(devices),
        "clients": len(clients),
        "target_per_s": rate,
        "achieved_per_s": round(completed_in_window / cpu["wall_s"]),
        "round_trip_ms": latency_ms(st.samples),
        "ack_ms": latency_ms(st.ack_samples),
        "refused": len(st.refused_samples),
        "refused_ms": latency_ms(st.refused_samples),
        # Refused commands never get a result: not missing.
        "missing_results": expected - len(st.samples) - len(st.refused_samples),
        "failed_results": st.failed,
        "errors": st.errors,
        "server_us_per_round_trip": server_cpu_per_op_us(cpu, expected),
        "server_loop_us_per_round_trip": server_cpu_per_op_us(cpu, expected, "server_loop_cpu_pct"),
        "cpu": cpu,
        "server_closes": closes([*devices, *clients]),
    }
    if st.errors:
        result["last_error"] = st.last_error.decode(errors="replace")
    close_all([*devices, *clients])
    return result


RUNNERS: dict[str, Callable[[Spec, Progress], Coroutine[Any, Any, Result]]] = {
    "fanout": run_fanout,
    "cluster": run_fanout,
    "ingest": run_ingest,
    "connections": run_connections,
    "commands": run_commands,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m benchmarks.loadgen SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec: Spec = json.loads(Path(args[0]).read_text())
    SERVICES.update(spec.get("services") or {})
    raise_nofile()
    progress = Progress(f"  [{spec['label']}]", enabled=not spec.get("quiet", False))
    started = time.monotonic()
    try:
        result = uvloop.run(RUNNERS[spec["scenario"]](spec, progress))
    except Exception as exc:
        progress.end()
        Path(args[1]).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        print(f"load generator failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    result["loadgen_wall_s"] = round(time.monotonic() - started, 1)
    Path(args[1]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
