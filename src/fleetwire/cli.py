"""The `fleetwire` command: serve, token, open, device, job, simulate, bench."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import fleetwire
from fleetwire.local import local_token, server_url
from fleetwire.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import logging

    from fleetwire.app import build_node_server, create_app, secret_source, startup_lines

    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Alembic's INFO lines (plugins, "Context impl") are not news to someone starting a server.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # SECURITY.md: private
    log = logging.getLogger("fleetwire")

    def started(port: int) -> None:
        tune_serving_process(settings.gc_threshold)
        for line in startup_lines(settings, port, secret_source(settings)):
            log.info("%s", line)

    server = build_node_server(create_app(settings), on_started=started)
    server.run()
    return 0


def tune_serving_process(gc_threshold: int) -> None:
    """The interpreter's policy for a serving process (docs/architecture.md, "Garbage
    collection in a serving process").

    The cycle collector: everything alive once the node is up (modules, routes, the registry
    cache) is frozen out of its reach, and young collections run every `gc_threshold`
    allocations instead of 700. Measured on batch ingest: the collector was 40 % of the
    server's CPU (perf), almost all of it full collections re-walking those startup objects;
    freezing them and the larger threshold took 60,000 to 98,000 points/s
    (benchmarks/results.md). Garbage without cycles is freed by reference counting either way;
    cyclic garbage waits for at most `gc_threshold` more allocations.

    The GIL switch interval: a storage thread whose fsync returned waits for the event loop to
    let go of the GIL, for up to this interval when the loop is busy; 0.5 ms instead of
    Python's 5 ms bounds that wait on the command path (commands at 1,000/s: no refusal and a
    19 ms worst case against 16 refusals and 40 ms, benchmarks/results.md).
    """
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()
    if gc_threshold:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(gc_threshold, older, oldest)


_SWITCH_INTERVAL_S = 0.0005


def _token(args: argparse.Namespace) -> int:
    devices = [d for d in args.devices.split(",") if d] if args.devices else None
    print(local_token(Settings(), args.sub, args.role, args.ttl, devices))
    return 0


def _open(args: argparse.Namespace) -> int:
    """The dashboard signed in: a fresh token in the URL's fragment, which a browser never
    sends to a server (so it reaches no access log); the URL is printed when no browser opens."""
    import httpx

    settings = Settings()
    url = server_url(settings, args.url)
    httpx.get(f"{url}/healthz", timeout=5).raise_for_status()  # no server: one clear line (main)
    token = local_token(settings, args.sub, args.role, args.ttl)
    page = f"{url}/#token={token}"
    if not args.no_browser and _has_display():
        import webbrowser

        if webbrowser.open(page):
            print(f"opened the dashboard at {url}/ as {args.sub} ({args.role}, {args.ttl:g} s)")
            return 0
    print(f"open this URL in a browser (it signs you in as {args.sub}, {args.role}, for {args.ttl:g} s):")
    print(page)
    return 0


def _has_display() -> bool:
    """A graphical session: without one, `webbrowser` would start a text browser in this
    terminal (lynx, w3m) instead of returning."""
    import os

    if sys.platform != "linux":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _device(args: argparse.Namespace) -> int:
    """Talks to a running server over REST, with a short-lived admin token from the local secret."""
    import httpx

    settings = Settings()
    url = server_url(settings, args.url)
    token = args.token or local_token(settings, "fleetwire-cli", "admin", 300)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=10) as client:
        if args.action == "add":
            body: dict[str, Any] = {"id": args.id}
            if args.name:
                body["name"] = args.name
            if args.type:
                body["type"] = args.type
            if args.tags:
                body["tags"] = [t for t in args.tags.split(",") if t]
            response = client.post("/devices", json=body)
        elif args.action == "list":
            response = client.get("/devices", params={"limit": args.limit})
        elif args.action == "show":
            response = client.get(f"/devices/{args.id}")
        else:
            response = client.delete(f"/devices/{args.id}")
    if response.content:
        print(json.dumps(response.json(), indent=2))
    if response.is_error:
        return 1
    return 0


def _job(args: argparse.Namespace) -> int:
    """Fleet jobs of a running server over REST (contract §7), with a short-lived operator
    token from the local secret unless --token is given."""
    import httpx

    settings = Settings()
    url = server_url(settings, args.url)
    token = args.token or local_token(settings, "fleetwire-cli", "operator", 300)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=30) as client:
        if args.action == "create":
            try:
                params = json.loads(args.params)
            except json.JSONDecodeError as exc:
                print(f"fleetwire job: --params is not JSON: {exc}", file=sys.stderr)
                return 2
            target: dict[str, Any] = {}
            if args.devices:
                target["devices"] = [d for d in args.devices.split(",") if d]
            if args.tags:
                target["tags"] = [t for t in args.tags.split(",") if t]
            body: dict[str, Any] = {
                "command": {"name": args.name, "params": params, "timeout_s": args.timeout},
                "target": target,
                "queue": args.queue,
                "deadline_s": args.deadline,
            }
            rollout = {
                k: v
                for k, v in (("max_concurrent", args.max_concurrent), ("max_per_minute", args.max_per_minute))
                if v
            }
            if rollout:
                body["rollout"] = rollout
            if args.abort_pct is not None:
                body["abort"] = {"failure_pct": args.abort_pct, "min_executed": args.abort_after}
            response = client.post("/jobs", json=body)
        elif args.action == "list":
            response = client.get("/jobs", params={"limit": args.limit})
        elif args.action == "show":
            response = client.get(f"/jobs/{args.id}")
        else:
            response = client.post(f"/jobs/{args.id}/cancel")
    if response.content:
        print(json.dumps(response.json(), indent=2))
    return 1 if response.is_error else 0


def _simulate(args: argparse.Namespace) -> int:
    from fleetwire.simulate import run

    return asyncio.run(run(args))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number above 0")
    return value


def _batch(text: str) -> int:
    value = _positive_int(text)
    if value > 1000:
        raise argparse.ArgumentTypeError("at most 1000 records per message (contract §2.2)")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _benchmarks_checkout(cwd: Path, package_dir: Path) -> Path | None:
    """The source checkout holding the `benchmarks` package, or None.

    The benchmarks are not in the wheel (they need py-spy, a dev dependency), so they are
    looked for where a developer runs them: ``cwd`` and its parents up to the first one with a
    pyproject.toml, then the checkout of ``package_dir`` (fleetwire's own directory, for an
    editable install run from elsewhere: src/fleetwire -> the checkout two levels up).
    """
    candidates: list[Path] = []
    for directory in (cwd, *cwd.parents):
        candidates.append(directory)
        if (directory / "pyproject.toml").is_file():
            break
    candidates.append(package_dir.parent.parent)
    for directory in candidates:
        if (directory / "benchmarks" / "__init__.py").is_file():
            return directory
    return None


def _bench(args: argparse.Namespace) -> int:
    checkout = _benchmarks_checkout(Path.cwd().resolve(), Path(fleetwire.__file__).resolve().parent)
    if checkout is None:
        raise SystemExit(
            "fleetwire bench runs from a source checkout: the benchmarks/ package is not installed "
            "with fleetwire; run it inside a clone of the repository (`uv run fleetwire bench …`)"
        )
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    # Imported by name: the benchmarks package is not part of fleetwire, so nothing in the
    # package (nor mypy's view of it) may depend on it statically.
    bench_main: Callable[[list[str]], int] = importlib.import_module("benchmarks.run").main
    return bench_main(["--help", *args.rest] if args.bench_help else args.rest)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line (what is wrong, where to look), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 1 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be at least 1 second")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fleetwire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the server (configuration from FLEETWIRE_* variables)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(run=_serve)

    token = sub.add_parser("token", help="mint a token with the local secret")
    token.add_argument("--sub", required=True)
    token.add_argument("--role", required=True, choices=["device", "viewer", "operator", "admin"])
    token.add_argument("--ttl", type=_positive_seconds, default=3600.0, help="seconds (default 3600)")
    token.add_argument("--devices", default=None, help="comma-separated device id globs")
    token.set_defaults(run=_token)

    open_ = sub.add_parser("open", help="open the dashboard of a running server, signed in")
    open_.add_argument("--sub", default="dashboard", help="the token's subject (default dashboard)")
    open_.add_argument("--role", default="admin", choices=["viewer", "operator", "admin"])
    open_.add_argument(
        "--ttl", type=_positive_seconds, default=3600.0, help="seconds (default 3600; keep it short)"
    )
    open_.add_argument("--url", help="server base URL (default http://FLEETWIRE_HOST:FLEETWIRE_PORT)")
    open_.add_argument("--no-browser", action="store_true", help="print the URL instead of opening it")
    open_.set_defaults(run=_open)

    device = sub.add_parser("device", help="manage the registry of a running server")
    device.add_argument("action", choices=["add", "list", "show", "rm"])
    device.add_argument("id", nargs="?")
    device.add_argument("--name")
    device.add_argument("--type")
    device.add_argument("--tags", help="comma-separated")
    device.add_argument("--limit", type=int, default=100)
    device.add_argument("--url", help="server base URL (default http://FLEETWIRE_HOST:FLEETWIRE_PORT)")
    device.add_argument("--token", help="an admin token (default: minted from the local secret)")
    device.set_defaults(run=_device)

    job = sub.add_parser("job", help="fleet jobs of a running server: one command to many devices")
    job.add_argument("action", choices=["create", "show", "list", "cancel"])
    job.add_argument("id", nargs="?", help="the job id (show, cancel)")
    job.add_argument("--name", help="the command name (create)")
    job.add_argument("--params", default="{}", help="the command params as JSON (default {})")
    job.add_argument("--timeout", type=int, default=30, help="command timeout_s (default 30)")
    job.add_argument("--devices", help="comma-separated device ids or globs")
    job.add_argument("--tags", help="comma-separated tags every target device carries")
    job.add_argument("--queue", action="store_true", help="queue for offline devices until the deadline")
    job.add_argument("--deadline", type=int, default=3600, help="deadline_s (default 3600)")
    job.add_argument("--max-concurrent", type=int, default=None)
    job.add_argument("--max-per-minute", type=int, default=None)
    job.add_argument("--abort-pct", type=float, default=None, help="abort at this failure percentage")
    job.add_argument("--abort-after", type=int, default=1, help="... once this many have ended")
    job.add_argument("--limit", type=int, default=100)
    job.add_argument("--url", help="server base URL (default http://FLEETWIRE_HOST:FLEETWIRE_PORT)")
    job.add_argument("--token", help="an operator token (default: minted from the local secret)")
    job.set_defaults(run=_job)

    simulate = sub.add_parser(
        "simulate",
        help="a fleet of simulated devices (on the Python SDK) that send telemetry and answer commands",
        description="Simulated devices on the Python SDK, in turn a thermostat, a power meter, a tracker and "
        "a door; the door also reports its contact as its status (`open`/`closed`) whenever it changes. "
        "Commands answered: ping, reboot, set_rate, read; twin deltas are adopted and reported.",
    )
    simulate.add_argument("--devices", type=_positive_int, default=10)
    simulate.add_argument("--rate", type=_positive_float, default=1.0, help="messages per second per device")
    simulate.add_argument("--batch", type=_batch, default=1, help="records per message (1..1000)")
    simulate.add_argument("--jitter", action="store_true", help="randomise each interval by ±50 %%")
    simulate.add_argument(
        "--flaky", type=_probability, default=0.0, help="chance per device per second of a dropped connection"
    )
    simulate.add_argument("--register", action="store_true", help="create the devices first (admin token)")
    simulate.add_argument("--duration", type=float, default=0.0, help="seconds; 0 = until Ctrl-C")
    simulate.add_argument("--prefix", default="sim-")
    simulate.add_argument("--buffer", type=_positive_int, default=10_000, help="offline records per device")
    simulate.add_argument("--seed", type=int, default=None, help="random seed (repeatable telemetry)")
    simulate.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line")
    simulate.add_argument("--url", help="server base URL (default http://FLEETWIRE_HOST:FLEETWIRE_PORT)")
    simulate.set_defaults(run=_simulate)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark scenario: fanout, ingest, connections, commands, cluster "
        "(`fleetwire bench --help`, benchmarks/README.md)",
        add_help=False,  # --help goes to the bench's own parser
    )
    bench.add_argument("-h", "--help", action="store_true", dest="bench_help")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; an ordinary mistake is one line on stderr saying what is wrong and
    what to do (exit 2 for usage and configuration, 1 for a server that is not there)."""
    import httpx
    import pydantic

    try:
        args = build_parser().parse_args(argv)
        if args.command == "device" and args.action != "list" and not args.id:
            print("fleetwire device: an id is required (fleetwire device show ID)", file=sys.stderr)
            return 2
        if args.command == "job" and args.action in ("show", "cancel") and not args.id:
            print("fleetwire job: a job id is required (fleetwire job show ID)", file=sys.stderr)
            return 2
        if args.command == "job" and args.action == "create" and not args.name:
            print("fleetwire job create: --name is required", file=sys.stderr)
            return 2
        result: int = args.run(args)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"FLEETWIRE_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        print(f"fleetwire: bad configuration: {problems}", file=sys.stderr)
        return 2
    except (httpx.ConnectError, httpx.TimeoutException) as exc:
        where = exc.request.url.copy_with(path="/", query=None) if exc.request else "the server"
        print(
            f"fleetwire: no fleetwire server answers at {where} ({type(exc).__name__}); start one with "
            "`uv run --no-dev fleetwire serve`, or pass --url",
            file=sys.stderr,
        )
        return 1
    except httpx.HTTPStatusError as exc:
        print(f"fleetwire: {exc.request.url} answered {exc.response.status_code}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. a bad --devices glob or --sub for a token
        print(f"fleetwire: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
