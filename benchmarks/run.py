"""`fleetwire bench SCENARIO`: start the servers, drive them with the load generator, report.

For each target of a scenario (the bare picows server first, then fleetwire), in one run:
1. start the server as its own process pinned to core 0 (`taskset -c 0`): a real
   `fleetwire serve` (FLEETWIRE_* environment: a temp data dir, a random JWT secret, limits
   raised for the load) or `python -m benchmarks.bare MODE PORT`;
2. register the scenario's devices over REST (fleetwire only; an admin token minted from the
   same secret, many requests in flight);
3. run `python -m benchmarks.loadgen` pinned to core 1 (`taskset -c 1`); it measures and
   writes its result as JSON;
4. stop the server (SIGTERM, then SIGKILL after 15 s).
Then print a table (stdout) with fleetwire's ratio to the bare server, and write the JSON
report (`--json PATH`). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.profile import top
from benchmarks.sysinfo import core_times, raise_nofile

SCENARIOS = ("fanout", "ingest", "connections", "commands", "cluster", "mqtt")
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


class BenchError(RuntimeError):
    pass


def log(text: str) -> None:
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetwire bench",
        description="Benchmark fleetwire against a bare picows server (server on core 0, load "
        "generator on core 1). See benchmarks/README.md.",
    )
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per phase (10)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per phase (2)")
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run (2 s phases, smaller sizes), under a minute"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the JSON report here")
    parser.add_argument(
        "--targets", default="bare,fleetwire", help="comma-separated: bare, fleetwire (default both)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the targets N times, alternating; the table shows medians"
    )
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument("--subscribers", type=int, default=None, help="fanout/cluster (1000)")
    sizes.add_argument(
        "--rate",
        type=float,
        default=None,
        help="fanout/cluster: deliveries/s (20000); commands: per s (1000)",
    )
    sizes.add_argument("--window", type=int, default=32, help="fanout: messages in flight at saturation")
    sizes.add_argument("--event-bytes", type=int, default=200, help="fanout: bytes per delivered event")
    sizes.add_argument("--devices", type=int, default=None, help="ingest (200), commands (10)")
    sizes.add_argument("--batch", type=int, default=100, help="ingest: records per telemetry_batch")
    sizes.add_argument(
        "--single-window", type=int, default=8, help="ingest: single-record requests in flight per device"
    )
    sizes.add_argument(
        "--batch-window", type=int, default=2, help="ingest: batch requests in flight per device"
    )
    sizes.add_argument("--connections", type=int, default=None, help="connections (10000)")
    sizes.add_argument("--concurrency", type=int, default=100, help="connections: handshakes in flight")
    sizes.add_argument("--clients", type=int, default=10, help="commands: client connections")
    infra = parser.add_argument_group("infrastructure")
    infra.add_argument(
        "--db", choices=("sqlite", "postgres"), default="sqlite", help="ingest, fanout, commands"
    )
    infra.add_argument("--pg-url", default=PG_ADMIN_URL, help="PostgreSQL admin URL (a fresh db is made)")
    infra.add_argument("--redis-url", default=REDIS_URL, help="cluster: Redis URL with its db number")
    infra.add_argument(
        "--bare-transport",
        choices=("aiofastnet", "uvloop"),
        default="aiofastnet",
        help="the bare server's socket transports (fleetwire's port uses uvloop's)",
    )
    infra.add_argument("--server-cpu", default="0", help="taskset CPU list of the server(s)")
    infra.add_argument("--loadgen-cpu", default="1", help="taskset CPU list of the load generator")
    infra.add_argument(
        "--profile", type=Path, default=None, metavar="DIR", help="py-spy the fleetwire server"
    )
    infra.add_argument("--profile-seconds", type=float, default=10.0)
    infra.add_argument(
        "--profile-gil",
        action="store_true",
        help="sample only the thread holding the GIL (py-spy --gil): CPU, not GIL waits",
    )
    infra.add_argument("--keep", action="store_true", help="keep the temp dir (server logs, specs)")
    infra.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="FLEETWIRE_X=VALUE",
        help="a setting for every fleetwire server of the run (repeatable), after the bench's own",
    )
    return parser


@dataclass
class Options:
    scenario: str
    duration: float
    warmup: float
    targets: list[str]
    params: dict[str, Any]
    args: argparse.Namespace
    workdir: Path = field(default_factory=Path)


def options(args: argparse.Namespace) -> Options:
    quick = args.quick
    duration = args.duration if args.duration is not None else (2.0 if quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for target in targets:
        if target not in ("bare", "fleetwire"):
            raise SystemExit(f"unknown target {target!r} (bare, fleetwire)")
    scenario = args.scenario
    params: dict[str, Any] = {}
    if scenario in ("fanout", "cluster"):
        params = {
            "subscribers": args.subscribers or (500 if quick and scenario == "cluster" else 1000),
            "rate": args.rate or 20_000.0,
            "window": args.window,
            "event_bytes": args.event_bytes,
        }
    elif scenario == "ingest":
        params = {
            "devices": args.devices or 200,
            "phases": [["single", 1, args.single_window], ["batch", args.batch, args.batch_window]],
            "db": args.db,
        }
    elif scenario == "connections":
        params = {
            "connections": args.connections or (1000 if quick else 10_000),
            "concurrency": args.concurrency,
        }
    elif scenario == "commands":
        # Issue 12: at the target rate, and at three times it (the excess must be refused at
        # once, not queued until everything times out).
        rates = [args.rate] if args.rate else [1000.0, 3000.0]
        params = {"devices": args.devices or 10, "clients": args.clients, "rate": rates[0], "rates": rates}
    if scenario in ("fanout", "commands"):
        params["db"] = args.db
    return Options(scenario, duration, warmup, targets, params, args)


# --------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server subprocess pinned with taskset, its log in the work dir."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log_path: Path,
                 *, http: bool) -> None:  # fmt: skip
        self.name = name
        self.port = port
        self.http = http
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.http:
                    with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=1) as response:
                        if response.status == 200:
                            return
                else:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise BenchError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def pinned(cpu: str, *argv: str) -> list[str]:
    return ["taskset", "-c", cpu, *argv]


# The checkout holding the `benchmarks` package: the bare server and the load generator run as
# `python -m benchmarks.…`, which must import from here whatever directory the run started in.
CHECKOUT = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWIRE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), env.get("PYTHONPATH")) if p)
    return env


def server_env(pairs: list[str]) -> dict[str, str]:
    """`--server-env` values: FLEETWIRE_ settings only (anything else is a typo)."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("FLEETWIRE_"):
            raise SystemExit(f"--server-env wants FLEETWIRE_NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def start_bare(opts: Options, mode: str) -> ServerProcess:
    port = free_port()
    argv = pinned(
        opts.args.server_cpu,
        sys.executable,
        "-m",
        "benchmarks.bare",
        mode,
        str(port),
        opts.args.bare_transport,
    )
    server = ServerProcess(
        "bare picows", argv, clean_env(), port, opts.workdir / f"bare-{mode}.log", http=False
    )
    server.wait_ready()
    return server


def start_fleetwire(
    opts: Options,
    secret: str,
    name: str,
    *,
    database_url: str | None = None,
    broker_url: str | None = None,
    node_id: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> ServerProcess:
    port = free_port()
    data_dir = opts.workdir / f"data-{name}"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = clean_env()
    env.update(
        {
            "FLEETWIRE_HOST": "127.0.0.1",
            "FLEETWIRE_PORT": str(port),
            "FLEETWIRE_DATA_DIR": str(data_dir),
            "FLEETWIRE_JWT_SECRET": secret,
            # Limits raised for the load: one connection sends far above 200 msgs/s here.
            "FLEETWIRE_RATE_LIMIT": "10000000/s",
            "FLEETWIRE_RATE_LIMIT_CLOSE_AFTER": "1000000",
            "FLEETWIRE_SEND_QUEUE": "100000",
            "FLEETWIRE_MAX_CONNECTIONS": "200000",
            "FLEETWIRE_LOG_LEVEL": "warning",
        }
    )
    if database_url:
        env["FLEETWIRE_DATABASE_URL"] = database_url
    if broker_url:
        env["FLEETWIRE_BROKER_URL"] = broker_url
    if node_id:
        env["FLEETWIRE_NODE_ID"] = node_id
    env.update(extra_env or {})
    env.update(server_env(opts.args.server_env))
    argv = pinned(opts.args.server_cpu, sys.executable, "-m", "fleetwire", "serve")
    server = ServerProcess(name, argv, env, port, opts.workdir / f"{name}.log", http=True)
    server.wait_ready()
    return server


def run_loadgen(
    opts: Options, spec: dict[str, Any], label: str, module: str = "benchmarks.loadgen"
) -> dict[str, Any]:
    tag = label.replace(" ", "-").replace("/", "-")
    spec_path = opts.workdir / f"spec-{tag}.json"
    result_path = opts.workdir / f"result-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    background = background_load()
    busy = ", ".join(f"{core} {pct:.0f}%" for core, pct in sorted(background.items()))
    if any(pct > 15 for pct in background.values()):
        log(f"  warning: the machine is busy before the run ({busy}); figures will be noisy")
    argv = pinned(
        opts.args.loadgen_cpu,
        sys.executable,
        "-m",
        module,
        *(["load"] if module != "benchmarks.loadgen" else []),
        str(spec_path),
        str(result_path),
    )
    proc = subprocess.run(argv, env=clean_env(), check=False, timeout=1800)
    try:
        result: dict[str, Any] = json.loads(result_path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"load generator for {label} exited with {proc.returncode} and no result") from exc
    if "error" in result:
        raise BenchError(f"load generator for {label}: {result['error']}")
    result["background_core_busy_pct"] = background
    return result


def background_load(seconds: float = 1.0) -> dict[str, float]:
    """Busy % per core while nothing of ours runs (the servers are idle): other people's load."""
    before = core_times()
    time.sleep(seconds)
    after = core_times()
    return {
        core: round(100.0 * (busy - before[core][0]) / max(total - before[core][1], 1), 1)
        for core, (busy, total, _, _) in after.items()
        if core in before
    }


def base_spec(
    opts: Options, label: str, kind: str, servers: Sequence[ServerProcess], secret: str
) -> dict[str, Any]:
    return {
        "scenario": opts.scenario,
        "label": label,
        "kind": kind,
        "urls": [s.ws_url for s in servers],
        "server_pids": [s.pid for s in servers],
        "secret": secret,
        "duration": opts.duration,
        "warmup": opts.warmup,
        "params": opts.params,
    }


def profile_spec(opts: Options, prefix: str, phases: list[str]) -> dict[str, Any] | None:
    if opts.args.profile is None:
        return None
    directory = opts.args.profile.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "dir": str(directory),
        "prefix": prefix,
        "seconds": opts.args.profile_seconds,
        "phases": phases,
        "gil": opts.args.profile_gil,
    }


# --------------------------------------------------------------------------------------------
# Device registration, databases, Redis


async def _register(http_url: str, secret: str, ids: Sequence[str], concurrency: int = 32) -> None:
    import httpx

    from fleetwire.auth.mint import TokenMinter

    minter = TokenMinter(secret=secret, algorithms=["HS256"])
    token = minter.mint(sub="bench-admin", role="admin", ttl_s=3600).token
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done = 0
    started = time.monotonic()
    pending = iter(ids)

    async with httpx.AsyncClient(
        base_url=f"{http_url}/api/v1", headers={"Authorization": f"Bearer {token}"}, limits=limits, timeout=60
    ) as client:

        async def worker() -> None:
            nonlocal done
            for device_id in pending:
                response = await client.post("/devices", json={"id": device_id})
                if response.status_code not in (201, 409):
                    raise BenchError(f"registering {device_id}: {response.status_code} {response.text[:200]}")
                done += 1

        async def report() -> None:
            while True:
                await asyncio.sleep(0.5)
                _progress_line(f"  registering devices: {done}/{len(ids)}")

        reporter = asyncio.get_running_loop().create_task(report())
        try:
            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(ids)))))
        finally:
            reporter.cancel()
    _progress_line(f"  registered {len(ids)} devices in {time.monotonic() - started:.1f}s", end=True)


_last_plain_line = [0.0]


def _progress_line(text: str, end: bool = False) -> None:
    """A progress line on stderr: rewritten in place on a terminal, every 5 s otherwise."""
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text + ("\n" if end else ""))
    elif end or time.monotonic() - _last_plain_line[0] >= 5.0:
        sys.stderr.write(text + "\n")
        _last_plain_line[0] = time.monotonic()
    sys.stderr.flush()


def register(server: ServerProcess, secret: str, ids: Sequence[str]) -> None:
    asyncio.run(_register(server.http_url, secret, ids))


async def _pg_admin(admin_url: str, sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close(timeout=10)


@contextlib.contextmanager
def fresh_postgres(admin_url: str) -> Iterator[str]:
    """A new, empty database on the PostgreSQL server of `admin_url`, dropped afterwards."""
    name = f"fleetwire_bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_admin(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(_pg_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def clear_redis(url: str) -> int:
    """Delete this cluster's keys (`fleetwire:{db}:*`) only; other data in the db is left alone."""
    import redis

    from fleetwire.broker.redis import key_prefix

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{key_prefix(url)}:*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


@contextlib.contextmanager
def database(opts: Options, db: str) -> Iterator[str | None]:
    if db == "postgres":
        with fresh_postgres(opts.args.pg_url) as url:
            yield url
    else:
        yield None  # SQLite in the server's data dir


# --------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Run:
    label: str
    kind: str
    result: dict[str, Any]


def _db_services(db_url: str | None) -> dict[str, str]:
    """The PostgreSQL backends serving our fresh database name it in their process title."""
    return {"postgres": db_url.rsplit("/", 1)[1]} if db_url else {}


def _redis_service(url: str) -> dict[str, str]:
    """Our Redis server's process title (other redis-server processes may run on other ports)."""
    netloc = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    return {"redis": f"redis-server {netloc}"}


def _bare_run(opts: Options, mode: str, profile_phases: list[str], rep: int) -> Run:
    log(f"[{opts.scenario}] bare picows server ({mode}){_rep_note(opts, rep)}")
    server = start_bare(opts, mode)
    try:
        spec = base_spec(opts, "bare", "bare", [server], secrets.token_urlsafe(32))
        if rep == 0:
            spec["profile"] = profile_spec(opts, f"{opts.scenario}-bare", profile_phases)
        return Run("bare picows", "bare", run_loadgen(opts, spec, f"bare-{rep}"))
    finally:
        server.stop()


def _rep_note(opts: Options, rep: int) -> str:
    return f", run {rep + 1}/{opts.args.repeat}" if opts.args.repeat > 1 else ""


def _target_runs(opts: Options, mode: str, device_ids: list[str], profile_phases: list[str]) -> list[Run]:
    runs: list[Run] = []
    for rep in range(opts.args.repeat):  # targets alternate, so noise hits both alike
        for target in opts.targets:
            if target == "bare":
                runs.append(_bare_run(opts, mode, profile_phases, rep))
                continue
            secret = secrets.token_urlsafe(32)
            db = opts.params.get("db", "sqlite")
            label = f"fleetwire ({db})"
            log(f"[{opts.scenario}] {label}{_rep_note(opts, rep)}")
            with database(opts, db) as db_url:
                server = start_fleetwire(opts, secret, "fleetwire", database_url=db_url)
                try:
                    register(server, secret, device_ids)
                    spec = base_spec(opts, "fleetwire", "fleetwire", [server], secret)
                    spec["services"] = _db_services(db_url)
                    if rep == 0:
                        spec["profile"] = profile_spec(opts, f"{opts.scenario}-{db}", profile_phases)
                    runs.append(Run(label, "fleetwire", run_loadgen(opts, spec, f"fleetwire-{rep}")))
                except BaseException:
                    log(f"server log tail:\n{server.log_tail()}")
                    raise
                finally:
                    server.stop()
    return runs


def scenario_fanout(opts: Options) -> list[Run]:
    return _target_runs(opts, "fanout", ["bench-pub"], ["saturation"])


def scenario_ingest(opts: Options) -> list[Run]:
    ids = [f"bench-dev-{i}" for i in range(opts.params["devices"])]
    return _target_runs(opts, "ingest", ids, ["single", "batch"])


def scenario_connections(opts: Options) -> list[Run]:
    ids = [f"bench-c-{i}" for i in range(opts.params["connections"])]
    return _target_runs(opts, "connections", ids, ["handshakes"])


def scenario_commands(opts: Options) -> list[Run]:
    """Every target at each offered rate, a fresh server per run; labels name the rate."""
    ids = [f"bench-cmd-{i}" for i in range(opts.params["devices"])]
    runs: list[Run] = []
    for rate in opts.params["rates"]:
        opts.params["rate"] = rate
        for run in _target_runs(opts, "commands", ids, ["round trips"]):
            runs.append(Run(f"{run.label} @{rate:.0f}/s", run.kind, run.result))
    return runs


def scenario_cluster(opts: Options) -> list[Run]:
    """bare (one server), one fleetwire node, two fleetwire nodes: all on PostgreSQL + Redis,
    every fleetwire node pinned to the server core, the device on node A."""
    runs: list[Run] = []
    redis_url = opts.args.redis_url
    for rep in range(opts.args.repeat):
        if "bare" in opts.targets:
            runs.append(_bare_run(opts, "fanout", ["saturation"], rep))
        if "fleetwire" not in opts.targets:
            continue
        for nodes in (1, 2):
            secret = secrets.token_urlsafe(32)
            label = "fleetwire 1 node" if nodes == 1 else "fleetwire 2 nodes"
            log(f"[cluster] {label} (PostgreSQL + {redis_url}){_rep_note(opts, rep)}")
            clear_redis(redis_url)
            servers: list[ServerProcess] = []
            with fresh_postgres(opts.args.pg_url) as db_url:
                try:
                    for index in range(nodes):
                        name = f"node-{'ab'[index]}-{nodes}"
                        servers.append(
                            start_fleetwire(
                                opts, secret, name, database_url=db_url, broker_url=redis_url, node_id=name
                            )
                        )
                    register(servers[0], secret, ["bench-pub"])
                    spec = base_spec(opts, label, "fleetwire", servers, secret)
                    spec["url_names"] = ["node A", "node B"][:nodes]
                    spec["services"] = {**_db_services(db_url), **_redis_service(redis_url)}
                    if rep == 0:
                        spec["profile"] = profile_spec(opts, f"cluster-{nodes}node", ["saturation"])
                    runs.append(Run(label, "fleetwire", run_loadgen(opts, spec, f"{label}-{rep}")))
                except BaseException:
                    for server in servers:
                        log(f"{server.name} log tail:\n{server.log_tail()}")
                    raise
                finally:
                    for server in servers:
                        server.stop()
                    clear_redis(redis_url)
    return runs


SCENARIO_RUNNERS = {
    "fanout": scenario_fanout,
    "ingest": scenario_ingest,
    "connections": scenario_connections,
    "commands": scenario_commands,
    "cluster": scenario_cluster,
}


# --------------------------------------------------------------------------------------------
# Report


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:  # NaN
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


_SERVICE_SHORT = {"postgres": "pg", "redis": "redis"}
_STEAL_NOTED_PCT = 0.3  # per core, over a run: from here on the run's tail is noted as the host's


def _cpu(cpu: dict[str, Any]) -> tuple[str, str, str]:
    """(server CPU, load generator CPU, per-core busy and the CPU of PostgreSQL/Redis if measured)."""
    server = sum(cpu["server_cpu_pct"].values())
    cores = cpu.get("core_busy_pct") or {}
    text = "/".join(f"{v:.0f}" for _, v in sorted(cores.items()))
    irq = cpu.get("core_irq_pct") or {}
    if irq:
        text += " (si " + "/".join(f"{v:.0f}" for _, v in sorted(irq.items())) + ")"
    services = cpu.get("service_cpu_pct") or {}
    if services:
        text += " " + " ".join(f"{_SERVICE_SHORT.get(k, k)} {v:.0f}%" for k, v in services.items())
    return f"{server:.0f}%", f"{cpu['loadgen_cpu_pct']:.0f}%", text


def _max_steal(result: Any) -> float:
    """The highest per-core steal of any phase of a run's result (0 if none was measured)."""
    if isinstance(result, dict):
        own = max((result.get("core_steal_pct") or {}).values(), default=0.0)
        return max([own, *(_max_steal(v) for v in result.values())])
    if isinstance(result, list):
        return max((_max_steal(v) for v in result), default=0.0)
    return 0.0


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _ratio(a: Any, b: Any) -> float | None:
    try:
        if a is None or b is None or float(b) == 0:
            return None
        return round(float(a) / float(b), 3)
    except (TypeError, ValueError):
        return None


def _pair(runs: list[Run]) -> tuple[Run | None, list[Run]]:
    bare = next((r for r in runs if r.kind == "bare"), None)
    return bare, [r for r in runs if r.kind != "bare"]


def report_fanout(opts: Options, runs: list[Run]) -> tuple[str, dict[str, Any]]:
    p = opts.params
    rows = []
    for run in runs:
        sat, lat = run.result["saturation"], run.result["latency"]
        s_cpu, g_cpu, cores = _cpu(sat["cpu"])
        ls_cpu, _, _ = _cpu(lat["cpu"])
        rows.append(
            [
                run.label,
                _num(sat["deliveries_per_s"]),
                _num(sat["server_us_per_delivery"], 2),
                s_cpu,
                g_cpu,
                cores,
                _num(lat["latency_ms"]["p50"], 2),
                _num(lat["latency_ms"]["p99"], 2),
                _num(lat["latency_ms"]["max"], 1),
                _num(lat["lost_deliveries"]),
                ls_cpu,
                _num(run.result.get("frame_bytes")),
            ]
        )
    headers = ["target", "deliveries/s", "srv µs/dlv", "srv CPU", "gen CPU", "cores 0/1 %",
               f"p50 ms@{p['rate']:.0f}/s", "p99 ms", "max ms", "lost", "srv CPU", "bytes/dlv"]  # fmt: skip
    text = [
        f"{opts.scenario}: {p['subscribers']} subscribers of one device (events: telemetry), "
        f"~{p['event_bytes']}-byte events; saturation with {p['window']} messages in flight; "
        f"latency device send -> client receive at {p['rate']:.0f} deliveries/s; "
        f"{opts.duration:.0f} s measured after {opts.warmup:.0f} s warm-up",
        _table(headers, rows),
    ]
    ratios: dict[str, Any] = {}
    bare, others = _pair(runs)
    for run in others:
        if bare is None:
            break
        throughput = _ratio(
            run.result["saturation"]["deliveries_per_s"], bare.result["saturation"]["deliveries_per_s"]
        )
        p99 = _ratio(run.result["latency"]["latency_ms"]["p99"], bare.result["latency"]["latency_ms"]["p99"])
        ratios[run.label] = {"deliveries_per_s": throughput, "p99_latency": p99}
        text.append(f"{run.label} / bare: deliveries/s x{throughput}, p99 latency x{p99}")
    if opts.scenario == "cluster":
        for run in runs:
            groups = run.result["latency"]["per_group_latency_ms"]
            sat_groups = run.result["saturation"]["per_group_deliveries_per_s"]
            if len(groups) > 1:
                parts = [
                    f"{name}: {sat_groups[name]:,}/s, p50 {g['p50']} ms p99 {g['p99']} ms"
                    for name, g in groups.items()
                ]
                text.append(f"{run.label} per node: " + "; ".join(parts))
        single = next((r for r in runs if r.label == "fleetwire 1 node"), None)
        double = next((r for r in runs if r.label == "fleetwire 2 nodes"), None)
        if single and double:
            cross = {
                "deliveries_per_s": _ratio(double.result["saturation"]["deliveries_per_s"],
                                           single.result["saturation"]["deliveries_per_s"]),
                "p50_latency": _ratio(double.result["latency"]["latency_ms"]["p50"],
                                      single.result["latency"]["latency_ms"]["p50"]),
                "p99_latency": _ratio(double.result["latency"]["latency_ms"]["p99"],
                                      single.result["latency"]["latency_ms"]["p99"]),
            }  # fmt: skip
            ratios["2 nodes / 1 node"] = cross
            text.append(
                f"2 nodes / 1 node: deliveries/s x{cross['deliveries_per_s']}, "
                f"p50 x{cross['p50_latency']}, p99 x{cross['p99_latency']}"
            )
    return "\n".join(text), ratios


def report_ingest(opts: Options, runs: list[Run]) -> tuple[str, dict[str, Any]]:
    rows = []
    for run in runs:
        for phase in run.result["phases"]:
            s_cpu, g_cpu, cores = _cpu(phase["cpu"])
            lat = phase["ack_latency_ms"]
            rows.append(
                [
                    run.label,
                    f"{phase['phase']} x{phase['batch']}",
                    _num(phase["points_per_s"]),
                    _num(phase["messages_per_s"]),
                    _num(lat["p50"], 2),
                    _num(lat["p99"], 2),
                    _num(phase["server_us_per_point"], 2),
                    s_cpu,
                    g_cpu,
                    cores,
                    str(phase["window_per_connection"]),
                ]
            )
    headers = ["target", "phase", "points/s", "msgs/s", "ack p50 ms", "ack p99 ms", "srv µs/pt", "srv CPU",
               "gen CPU", "cores 0/1 %", "window"]  # fmt: skip
    text = [
        f"ingest: {opts.params['devices']} devices, acks after durable storage ({opts.params['db']}); "
        f"{opts.duration:.0f} s per phase after {opts.warmup:.0f} s warm-up",
        _table(headers, rows),
    ]
    ratios: dict[str, Any] = {}
    bare, others = _pair(runs)
    for run in others:
        if bare is None:
            break
        mine = {ph["phase"]: ph for ph in run.result["phases"]}
        for phase in bare.result["phases"]:
            r = _ratio(mine[phase["phase"]]["points_per_s"], phase["points_per_s"])
            ratios[f"{run.label} {phase['phase']}"] = {"points_per_s": r}
            text.append(f"{run.label} / bare, {phase['phase']}: points/s x{r}")
    errors = [
        f"{r.label}: {r.result['errors']} errors ({r.result.get('last_error', '')})"
        for r in runs
        if r.result["errors"]
    ]
    text.extend(errors)
    return "\n".join(text), ratios


def report_connections(opts: Options, runs: list[Run]) -> tuple[str, dict[str, Any]]:
    rows = []
    for run in runs:
        r = run.result
        s_cpu, g_cpu, cores = _cpu(r["cpu"])
        idle_cpu = sum(r["idle_cpu"]["server_cpu_pct"].values())
        rows.append(
            [
                run.label,
                f"{r['connected']}/{r['connections']}",
                _num(r["handshakes_per_s"]),
                _num(r["server_cpu_ms_per_handshake"], 3),
                _num(r["rss_per_connection_kb"], 1),
                f"{r['rss_before_kb'] / 1024:.0f}->{r['rss_after_kb'] / 1024:.0f}",
                s_cpu,
                g_cpu,
                cores,
                f"{idle_cpu:.1f}%",
            ]
        )
    headers = ["target", "connected", "handshakes/s", "srv ms/hs", "RSS KB/conn", "RSS MB", "srv CPU",
               "gen CPU", "cores 0/1 %", "idle srv CPU"]  # fmt: skip
    text = [
        f"connections: {opts.params['connections']} idle authenticated device connections, "
        f"{opts.params['concurrency']} handshakes in flight",
        _table(headers, rows),
    ]
    ratios: dict[str, Any] = {}
    bare, others = _pair(runs)
    for run in others:
        if bare is None:
            break
        hs = _ratio(run.result["handshakes_per_s"], bare.result["handshakes_per_s"])
        rss = _ratio(run.result["rss_per_connection_kb"], bare.result["rss_per_connection_kb"])
        ratios[run.label] = {"handshakes_per_s": hs, "rss_per_connection": rss}
        text.append(f"{run.label} / bare: handshakes/s x{hs}, RSS per connection x{rss}")
    for run in runs:
        if run.result["failed"]:
            text.append(f"{run.label}: {run.result['failed']} failed, e.g. {run.result['first_errors'][:1]}")
    return "\n".join(text), ratios


def report_commands(opts: Options, runs: list[Run]) -> tuple[str, dict[str, Any]]:
    rows = []
    for run in runs:
        r = run.result
        s_cpu, g_cpu, cores = _cpu(r["cpu"])
        rt = r["round_trip_ms"]
        rows.append(
            [
                run.label,
                _num(r["achieved_per_s"]),
                _num(rt["p50"], 2),
                _num(rt["p90"], 2),
                _num(rt["p99"], 2),
                _num(rt["max"], 1),
                _num(r["ack_ms"]["p50"], 2),
                _num(r.get("refused", 0)),
                _num(r.get("refused_ms", {}).get("p99"), 2),
                _num(r["missing_results"]),
                _num(r["server_us_per_round_trip"], 1),
                _num(r.get("server_loop_us_per_round_trip"), 1),
                s_cpu,
                g_cpu,
                cores,
            ]
        )
    headers = ["target", "round trips/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "ack p50", "refused",
               "refused p99 ms", "missing", "srv µs/rt", "loop µs/rt", "srv CPU", "gen CPU",
               "cores 0/1 %"]  # fmt: skip
    offered = " and ".join(f"{rate:.0f}/s" for rate in opts.params["rates"])
    text = [
        f"commands: client -> device -> result -> client, offered at {offered}, "
        f"{opts.params['clients']} clients, {opts.params['devices']} devices; {opts.duration:.0f} s measured;"
        " refused: error replies (rate_limited) in the window, and how fast they came;"
        " loop µs/rt: the server's event-loop thread (the rest of srv µs/rt is its other threads:"
        " SQLite's writer and reader)",
        _table(headers, rows),
    ]
    ratios: dict[str, Any] = {}
    for run in runs:
        if run.kind == "bare":
            continue
        rate = run.label.rsplit("@", 1)[-1]
        bare = next((r for r in runs if r.kind == "bare" and r.label.endswith(f"@{rate}")), None)
        if bare is None:
            continue
        p50 = _ratio(run.result["round_trip_ms"]["p50"], bare.result["round_trip_ms"]["p50"])
        p99 = _ratio(run.result["round_trip_ms"]["p99"], bare.result["round_trip_ms"]["p99"])
        cpu = _ratio(run.result["server_us_per_round_trip"], bare.result["server_us_per_round_trip"])
        ratios[run.label] = {"p50": p50, "p99": p99, "server_cpu_per_round_trip": cpu}
        text.append(f"{run.label} / bare: p50 x{p50}, p99 x{p99}, server CPU per round trip x{cpu}")
    for run in runs:
        if run.result["errors"]:
            text.append(f"{run.label}: {run.result['errors']} errors, last {run.result.get('last_error')}")
    return "\n".join(text), ratios


def _headline(scenario: str, result: dict[str, Any]) -> float:
    """The figure whose median picks the run shown for a target (ingest: per phase, below)."""
    value: Any
    if scenario in ("fanout", "cluster"):
        value = result["saturation"]["deliveries_per_s"]
    elif scenario == "connections":
        value = result["handshakes_per_s"]
    elif scenario == "commands":
        value = result["round_trip_ms"]["p99"]
    else:
        value = result["phases"][-1]["points_per_s"]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("inf")
    return number if number == number else float("inf")


def medians(scenario: str, runs: list[Run]) -> tuple[list[Run], list[str]]:
    """One run per target: the median by the headline figure (for ingest, each phase's median
    separately); and a line per target with the spread over its runs."""
    by_label: dict[str, list[Run]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    chosen: list[Run] = []
    spread: list[str] = []
    for label, group in by_label.items():
        if scenario == "ingest":
            phases = []
            for index, phase in enumerate(group[0].result["phases"]):
                ordered = sorted((r.result["phases"][index] for r in group), key=lambda p: p["points_per_s"])
                phases.append(ordered[(len(ordered) - 1) // 2])
                values = ", ".join(f"{p['points_per_s']:,}" for p in ordered)
                spread.append(f"{label} {phase['phase']} points/s over {len(group)} runs: {values}")
            result = {**group[0].result, "phases": phases}
        else:
            ordered_runs = sorted(group, key=lambda r: _headline(scenario, r.result))
            result = ordered_runs[(len(ordered_runs) - 1) // 2].result
            digits = 2 if scenario == "commands" else 0
            values = ", ".join(_num(_headline(scenario, r.result), digits) for r in ordered_runs)
            spread.append(f"{label} over {len(group)} runs: {values}")
            if scenario in ("fanout", "cluster"):  # the latency target is judged by its own median
                p99s = sorted(float(r.result["latency"]["latency_ms"]["p99"]) for r in group)
                listed = ", ".join(f"{v:.2f}" for v in p99s)
                middle = p99s[(len(p99s) - 1) // 2]
                spread.append(f"{label} latency p99 ms over {len(group)} runs: {listed}, median {middle:.2f}")
        chosen.append(Run(label, group[0].kind, result))
    return chosen, spread


REPORTERS = {
    "fanout": report_fanout,
    "cluster": report_fanout,
    "ingest": report_ingest,
    "connections": report_connections,
    "commands": report_commands,
}


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for package in ("picows", "uvloop", "uvicorn", "orjson", "fastapi"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def main(argv: Sequence[str] | None = None) -> int:
    given = list(argv) if argv is not None else sys.argv[1:]
    if given[:1] == ["jobs"]:  # one node, one job: its own runner (benchmarks/jobs.py)
        from benchmarks.jobs import main as jobs_main

        return jobs_main(given[1:])
    args = build_parser().parse_args(given)
    opts = options(args)
    raise_nofile()
    if (os.cpu_count() or 1) < 2:
        log("warning: fewer than 2 CPUs; server and load generator share a core")
    keep = args.keep
    workdir = Path(tempfile.mkdtemp(prefix=f"fleetwire-bench-{opts.scenario}-"))
    opts.workdir = workdir
    started = time.time()
    if opts.scenario == "mqtt":  # its own runner and table (benchmarks/mqtt.py)
        from benchmarks import mqtt

        try:
            return mqtt.run(opts)
        finally:
            if not keep:
                import shutil

                shutil.rmtree(workdir, ignore_errors=True)
    try:
        runs = SCENARIO_RUNNERS[opts.scenario](opts)
    except BenchError as exc:
        log(f"bench failed: {exc}")
        keep = True
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if keep:
            log(f"work dir kept: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    shown, spread = medians(opts.scenario, runs)
    text, ratios = REPORTERS[opts.scenario](opts, shown)
    print(text)
    if args.repeat > 1:
        print(f"medians of {args.repeat} runs per target (headline figure of each run, sorted):")
        for line in spread:
            print(f"  {line}")
    background = [
        f"{r.label} {'/'.join(f'{v:.0f}' for _, v in sorted(r.result['background_core_busy_pct'].items()))}%"
        for r in runs
    ]
    print("cores busy in the second before each run (other load on the machine): " + ", ".join(background))
    # Steal: time the hypervisor ran other guests on our cores. A run with some is not a
    # measurement of the server: its latency tail is the host's (measured: p99 4-5 ms at
    # 0.0-0.1 % steal, 12-35 ms at 0.3-7 % for the same code, issue 12).
    stolen = [f"{r.label} {steal:.1f}%" for r in runs if (steal := _max_steal(r.result)) >= _STEAL_NOTED_PCT]
    if stolen:
        print("STEAL (the hypervisor took the cores; latency tails are the host's): " + ", ".join(stolen))
    profiles: dict[str, str] = {}
    if args.profile is not None:
        for raw in sorted(args.profile.resolve().glob(f"{opts.scenario}-*.raw")):
            if raw.stat().st_mtime >= started:
                summary = top(raw)
                raw.with_suffix(".top.txt").write_text(summary + "\n")
                profiles[raw.name] = summary
                print()
                print(summary)
    if args.json is not None:
        report = {
            "scenario": opts.scenario,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "machine": machine(),
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "params": opts.params,
            "command": "fleetwire bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "repeat": args.repeat,
            "runs": [{"label": r.label, "kind": r.kind, **r.result} for r in runs],
            "shown": [{"label": r.label, "kind": r.kind, **r.result} for r in shown],
            "spread": spread,
            "ratios": ratios,
            "profiles": profiles,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        log(f"JSON report: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
