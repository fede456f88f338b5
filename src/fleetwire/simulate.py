"""`fleetwire simulate`: a fleet of simulated devices built on the SDK (`fleetwire.client`).

Each device runs a `DeviceClient`: it sends realistic telemetry from one of a few sensor
shapes, reports a status where the shape has one (a door: `open`/`closed`, sent when it
changes, as a contact sensor raises an alarm state), answers commands, optionally drops its
connection at random (`--flaky`), and reconnects by the SDK's policy. A progress line shows
connected devices, records/s, acks, errors and reconnects; a summary follows at the end.

The progress line is a plain carriage-return line on stderr (a full line every few seconds
when stderr is not a terminal), not `rich`: five numbers do not justify a new runtime
dependency in every server install, and a plain line survives any terminal or log file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

from fleetwire.client import (
    BufferFull,
    ClientClosed,
    ClientOptions,
    Closed,
    Command,
    CommandError,
    ConnectionEvent,
    ConnectionLost,
    DeviceClient,
    MemoryBuffer,
    NotConnected,
    RequestError,
    State,
)
from fleetwire.client.connection import CLOSED_BY_APPLICATION
from fleetwire.local import local_minter, server_url
from fleetwire.settings import Settings

DEVICE_TOKEN_TTL_S = 3600.0  # refreshed in-band by the SDK on token_expiring
DRAIN_S = 10.0  # at the end, how long the devices get to flush what they still hold


# -- sensor shapes ------------------------------------------------------------------------


class Sensor:
    """One simulated device's readings; `read(t)` is called with seconds since the start."""

    kind = "sensor"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def read(self, t: float) -> dict[str, Any]:
        raise NotImplementedError

    def status(self) -> str | None:
        """The device's status string (contract §2.2 `status`) after the last reading, or
        None for a shape without one; the fleet reports it whenever it changes."""
        return None


class Thermostat(Sensor):
    """Temperature as a bounded random walk, humidity following a slow daily-like wave."""

    kind = "thermostat"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.temp = rng.uniform(18, 24)
        self.phase = rng.uniform(0, 2 * math.pi)

    def read(self, t: float) -> dict[str, Any]:
        self.temp = min(30.0, max(12.0, self.temp + self.rng.gauss(0, 0.05)))
        humidity = 45 + 10 * math.sin(t / 600 + self.phase) + self.rng.gauss(0, 0.5)
        return {"temp_c": round(self.temp, 2), "humidity_pct": round(humidity, 1)}


class PowerMeter(Sensor):
    """Power with noise and occasional load steps; energy as its integral (never decreasing)."""

    kind = "meter"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.base_w = rng.uniform(200, 2000)
        self.energy_kwh = rng.uniform(0, 5000)
        self.last_t = 0.0

    def read(self, t: float) -> dict[str, Any]:
        if self.rng.random() < 0.01:
            self.base_w = max(50.0, self.base_w * self.rng.uniform(0.5, 1.5))
        power = max(0.0, self.base_w + self.rng.gauss(0, self.base_w * 0.02))
        self.energy_kwh += power * max(t - self.last_t, 0.0) / 3_600_000
        self.last_t = t
        return {"power_w": round(power, 1), "energy_kwh": round(self.energy_kwh, 4)}


class Tracker(Sensor):
    """A vehicle: position drifting on a heading, speed, a battery that drains."""

    kind = "tracker"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.lat, self.lon = rng.uniform(48.0, 53.0), rng.uniform(2.0, 14.0)
        self.heading = rng.uniform(0, 2 * math.pi)
        self.battery = rng.uniform(60, 100)

    def read(self, t: float) -> dict[str, Any]:
        self.heading += self.rng.gauss(0, 0.1)
        speed = max(0.0, 40 + self.rng.gauss(0, 8))
        self.lat += math.cos(self.heading) * speed * 1e-6
        self.lon += math.sin(self.heading) * speed * 1e-6
        self.battery = max(0.0, self.battery - 0.001)
        return {
            "lat": round(self.lat, 6),
            "lon": round(self.lon, 6),
            "speed_kmh": round(speed, 1),
            "battery_pct": round(self.battery, 2),
        }


class DoorSensor(Sensor):
    """A contact: open/closed toggling now and then, a battery, a firmware string."""

    kind = "door"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.open = False
        self.battery = rng.uniform(80, 100)

    def read(self, t: float) -> dict[str, Any]:
        if self.rng.random() < 0.05:
            self.open = not self.open
        self.battery = max(0.0, self.battery - 0.0005)
        return {"open": self.open, "battery_pct": round(self.battery, 2), "firmware": "1.4.2"}

    def status(self) -> str:
        return "open" if self.open else "closed"


SENSORS: list[Callable[[random.Random], Sensor]] = [Thermostat, PowerMeter, Tracker, DoorSensor]


# -- the fleet ------------------------------------------------------------------------------


@dataclass
class Totals:
    sent: int = 0  # records handed to the SDK
    errors: int = 0  # refused records, a full outbox, failed commands
    commands: int = 0
    deltas: int = 0  # twin deltas applied (and reported)
    stopped: list[str] = field(default_factory=list)  # devices whose client closed for good


@dataclass
class SimDevice:
    device_id: str
    client: DeviceClient
    sensor: Sensor
    rate: float  # messages per second
    stopped_by_server: str | None = None
    reported_status: str | None = None  # what the server last acked (kept across reconnects)


class Fleet:
    def __init__(self, args: argparse.Namespace, ws_url: str, token_for: Callable[[str], str]) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.totals = Totals()
        self.started = time.monotonic()
        self.devices: list[SimDevice] = []
        for index in range(args.devices):
            device_id = f"{args.prefix}{index}"
            client = DeviceClient(
                ws_url,
                _provider(token_for, device_id),
                buffer=MemoryBuffer(max_records=args.buffer),
                options=ClientOptions(),
            )
            sim = SimDevice(
                device_id, client, SENSORS[index % len(SENSORS)](random.Random(self.rng.random())), args.rate
            )
            self._wire(sim)
            self.devices.append(sim)

    def _wire(self, sim: SimDevice) -> None:
        client = sim.client
        totals = self.totals

        @client.command("ping")
        def ping(command: Command) -> dict[str, Any]:
            totals.commands += 1
            return {"pong": True, "at_ms": int(time.time() * 1000)}

        @client.command("reboot")
        def reboot(command: Command) -> dict[str, Any]:
            totals.commands += 1
            client.drop()  # the device "restarts": its connection goes away and comes back
            return {"rebooting": True}

        @client.command("set_rate")
        def set_rate(command: Command) -> dict[str, Any]:
            totals.commands += 1
            rate = command.params.get("rate")
            if not isinstance(rate, int | float) or not 0 < rate <= 1000:
                raise CommandError("invalid_params", "rate must be a number in (0, 1000]")
            sim.rate = float(rate)
            return {"rate": sim.rate}

        @client.command("read")
        def read(command: Command) -> dict[str, Any]:
            totals.commands += 1
            return sim.sensor.read(time.monotonic() - self.started)

        @client.on_delta
        def adopt(delta: dict[str, Any], version: int) -> dict[str, Any] | None:
            """Apply what is desired and report it: `interval_s` sets the message rate, any
            other key is taken as is (a real device would switch its LED, its mode…)."""
            if not delta:
                return None  # converged
            totals.deltas += 1
            interval = delta.get("interval_s")
            if (
                isinstance(interval, int | float)
                and not isinstance(interval, bool)
                and 0.001 <= interval <= 3600
            ):
                sim.rate = 1.0 / interval
            return delta

        def on_state(event: ConnectionEvent) -> None:
            if isinstance(event, Closed) and event.reason != CLOSED_BY_APPLICATION:
                sim.stopped_by_server = f"{event.code or event.status} {event.reason}"
                totals.stopped.append(sim.device_id)

        client.on_state(on_state)

    async def run_device(self, sim: SimDevice, stop: asyncio.Event) -> None:
        await sim.client.start()
        rng = random.Random(self.rng.random())
        while not stop.is_set() and sim.client.state is not State.CLOSED:
            interval = 1.0 / sim.rate
            if self.args.jitter:
                interval *= rng.uniform(0.5, 1.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                break
            now_ms = int(time.time() * 1000)
            for i in range(self.args.batch):
                # A batch's records are taken a millisecond apart, as a sensor sampling fast.
                data = sim.sensor.read(time.monotonic() - self.started)
                try:
                    future = sim.client.enqueue(data, ts=now_ms - (self.args.batch - 1 - i))
                except BufferFull:
                    self.totals.errors += 1
                    continue
                except ClientClosed:
                    return
                self.totals.sent += 1
                future.add_done_callback(self._record_done)
            await self._report_status(sim)

    async def _report_status(self, sim: SimDevice) -> None:
        """Send the sensor's status when it differs from the last one the server acked; while
        offline it is left for the next reading (the server keeps the status over reconnects)."""
        status = sim.sensor.status()
        if status is None or status == sim.reported_status:
            return
        try:
            await sim.client.set_status(status)
        except RequestError:
            self.totals.errors += 1
            return
        except (NotConnected, ConnectionLost, ClientClosed, TimeoutError):
            return  # not acked: the next reading tries again
        sim.reported_status = status

    def _record_done(self, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, RequestError | BufferFull):
            self.totals.errors += 1

    async def flaky(self, stop: asyncio.Event) -> None:
        """Each second, each connected device drops its connection with probability P."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            for sim in self.devices:
                if sim.client.connected and self.rng.random() < self.args.flaky:
                    sim.client.drop()

    # -- numbers -------------------------------------------------------------------------

    def connected(self) -> int:
        return sum(1 for sim in self.devices if sim.client.connected)

    def acked(self) -> int:
        return sum(sim.client.acked for sim in self.devices)

    def reconnects(self) -> int:
        return sum(sim.client.reconnects for sim in self.devices)

    def buffered(self) -> int:
        return sum(len(sim.client.buffer) for sim in self.devices)


def _provider(token_for: Callable[[str], str], device_id: str) -> Callable[[], Any]:
    async def provide() -> str:
        return token_for(device_id)

    return provide


async def _progress(fleet: Fleet, stop: asyncio.Event, out: TextIO) -> None:
    tty = out.isatty()
    every = 0.5 if tty else 5.0
    last_acked, last_t = 0, time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        now, acked = time.monotonic(), fleet.acked()
        rate = (acked - last_acked) / max(now - last_t, 1e-9)
        last_acked, last_t = acked, now
        line = (
            f"connected {fleet.connected()}/{len(fleet.devices)}  {rate:,.0f} records/s  "
            f"acked {acked:,}  errors {fleet.totals.errors}  reconnects {fleet.reconnects()}  "
            f"commands {fleet.totals.commands}"
        )
        out.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
        out.flush()
    if tty:
        out.write("\n")


async def register(base: str, admin_token: str, fleet: Fleet) -> str | None:
    """Create the fleet's devices (an existing id is fine); returns an error text or None."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=f"{base}/api/v1", timeout=10, headers=headers) as http:
        for sim in fleet.devices:
            body = {"id": sim.device_id, "type": sim.sensor.kind, "tags": ["simulated", sim.sensor.kind]}
            try:
                response = await http.post("/devices", json=body)
            except httpx.HTTPError as exc:
                return f"cannot reach {base}: {type(exc).__name__}"
            if response.status_code not in (201, 409):
                return f"registering {sim.device_id}: HTTP {response.status_code} {response.text[:200]}"
    return None


async def run(
    args: argparse.Namespace,
    settings: Settings | None = None,
    stop: asyncio.Event | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the fleet until `--duration` passes, `stop` is set or Ctrl-C; print the summary."""
    settings = settings or Settings()
    out = out or sys.stdout
    progress_out = sys.stderr if out is sys.stdout else out
    base = server_url(settings, args.url)
    minter = local_minter(settings)

    def token_for(device_id: str) -> str:
        return minter.mint(sub=device_id, role="device", ttl_s=DEVICE_TOKEN_TTL_S).token

    fleet = Fleet(args, base.replace("http", "ws", 1), token_for)
    if args.register:
        admin = minter.mint(sub="fleetwire-simulate", role="admin", ttl_s=300).token
        if (problem := await register(base, admin, fleet)) is not None:
            print(f"fleetwire simulate: {problem}", file=sys.stderr)
            return 1
    fleet.started = time.monotonic()  # the run, not the registration
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if args.duration:
        loop.call_later(args.duration, stop.set)
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on the main thread
        loop.add_signal_handler(signal.SIGINT, stop.set)
    tasks = [asyncio.ensure_future(fleet.run_device(sim, stop)) for sim in fleet.devices]
    if args.flaky > 0:
        tasks.append(asyncio.ensure_future(fleet.flaky(stop)))
    reporter = asyncio.ensure_future(_progress(fleet, stop, progress_out)) if args.progress else None
    try:
        await stop.wait()
        await asyncio.gather(*tasks)
        # Give what the outboxes still hold a bounded time to be acked.
        live = [sim.client for sim in fleet.devices if sim.client.state is not State.CLOSED]
        await asyncio.gather(*(client.flush(DRAIN_S) for client in live))
    finally:
        for task in tasks:
            task.cancel()
        if reporter is not None:
            await reporter
        await asyncio.gather(*(sim.client.close() for sim in fleet.devices), return_exceptions=True)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    elapsed = time.monotonic() - fleet.started
    acked = fleet.acked()
    print(
        f"{len(fleet.devices)} devices, {elapsed:.1f} s: {fleet.totals.sent} records sent, {acked} acked "
        f"({acked / max(elapsed, 1e-9):,.0f}/s), {fleet.buffered()} unacked, {fleet.totals.errors} errors, "
        f"{fleet.reconnects()} reconnects, {fleet.totals.commands} commands answered, "
        f"{fleet.totals.deltas} twin deltas applied",
        file=out,
    )
    for sim in fleet.devices:
        if sim.stopped_by_server:
            print(f"  {sim.device_id} stopped: {sim.stopped_by_server}", file=out)
    return 1 if fleet.totals.stopped or fleet.totals.errors else 0
