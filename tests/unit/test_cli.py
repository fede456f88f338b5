"""The command line's own logic: where `fleetwire bench` finds the benchmarks, local tokens."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetwire.auth.jwt import build_verifier
from fleetwire.auth.principal import Role
from fleetwire.cli import _benchmarks_checkout, main, tune_serving_process
from fleetwire.local import local_token, server_url
from fleetwire.settings import Settings
from tests.unit.auth.helpers import SECRET


def _checkout(root: Path) -> Path:
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text("")
    (root / "src" / "fleetwire").mkdir(parents=True)
    return root


def test_benchmarks_found_from_the_checkout_or_below(tmp_path: Path) -> None:
    """From the checkout root or any directory under it, the checkout is the answer."""
    root = _checkout(tmp_path / "repo")
    elsewhere = tmp_path / "site-packages" / "fleetwire"
    elsewhere.mkdir(parents=True)
    (root / "docs" / "deep").mkdir(parents=True)
    for cwd in (root, root / "benchmarks", root / "docs" / "deep"):
        assert _benchmarks_checkout(cwd, elsewhere) == root


def test_benchmarks_search_stops_at_the_project_root(tmp_path: Path) -> None:
    """Another project nested in a checkout (its own pyproject.toml) does not see the outer
    benchmarks; an editable install's checkout is the fallback; else None."""
    outer = _checkout(tmp_path / "repo")
    inner = outer / "vendor" / "other"
    inner.mkdir(parents=True)
    (inner / "pyproject.toml").write_text("")
    installed = tmp_path / "site-packages" / "fleetwire"
    installed.mkdir(parents=True)
    assert _benchmarks_checkout(inner, installed) is None
    assert _benchmarks_checkout(inner, outer / "src" / "fleetwire") == outer
    assert _benchmarks_checkout(tmp_path, installed) is None


def test_local_token_exits_when_the_server_signs_none(tmp_path: Path) -> None:
    """With no HS* algorithm allowed there is no local secret: a clear exit, no secret file."""
    settings = Settings(data_dir=tmp_path / "data", jwt_algorithms="RS256", jwt_secret=None)
    with pytest.raises(SystemExit, match="this server verifies external tokens"):
        local_token(settings, "a", "admin", 60)
    assert not (tmp_path / "data").exists()


def test_local_token_and_server_url(tmp_path: Path) -> None:
    """A local token verifies on the server these settings describe; the URL defaults to
    http://FLEETWIRE_HOST:FLEETWIRE_PORT."""
    settings = Settings(data_dir=tmp_path / "data", jwt_secret=SECRET, host="127.0.0.9", port=9001)
    principal = build_verifier(settings).verify(local_token(settings, "a", "viewer", 60, ["d*"]))
    assert (principal.sub, principal.role, principal.device_patterns) == ("a", Role.VIEWER, ("d*",))
    assert server_url(settings) == "http://127.0.0.9:9001"
    assert server_url(settings, "http://other:1") == "http://other:1"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # nothing listens on it once the probe is closed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["token", "--sub", "a", "--role", "admin", "--ttl", "-60"], "argument --ttl: -60 must be at least 1 second"),
        (["token", "--sub", "a", "--role", "admin", "--ttl", "soon"], "argument --ttl: 'soon' is not a number"),
        (["token", "--sub", "a", "--role", "root"], "argument --role: invalid choice: 'root'"),
        (["open", "--ttl", "0"], "argument --ttl: 0 must be at least 1 second"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse's errors, and a bad --ttl (a ValueError before), are one line: what is wrong
    and where to read more; exit code 2; nothing on stdout."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert message in err
    assert err.rstrip().endswith("--help`)")


def test_no_server_on_the_port_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`device add` and `open` with nothing listening: one line naming the URL and how to
    start a server, exit 1, no traceback."""
    url = f"http://127.0.0.1:{_free_port()}"
    for argv in (["device", "add", "x", "--url", url, "--token", "t"], ["open", "--url", url, "--no-browser"]):
        assert main(argv) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err == (
            f"fleetwire: no fleetwire server answers at {url}/ (ConnectError); start one with "
            "`uv run --no-dev fleetwire serve`, or pass --url\n"
        )


def test_bad_configuration_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed FLEETWIRE_* variable names the variable and the problem; exit 2."""
    monkeypatch.setenv("FLEETWIRE_PORT", "eighty")
    assert main(["token", "--sub", "a", "--role", "viewer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleetwire: bad configuration: FLEETWIRE_PORT: Input should be a valid integer")
    assert err.count("\n") == 1


def test_device_without_an_id_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["device", "show"]) == 2
    assert capsys.readouterr().err == "fleetwire device: an id is required (fleetwire device show ID)\n"


@pytest.fixture
def restored_gc() -> Iterator[None]:
    before, interval = gc.get_threshold(), sys.getswitchinterval()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("restored_gc")
def test_serving_process_freezes_startup_objects_and_sets_the_young_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    tune_serving_process(12_345)
    assert gc.get_threshold() == (12_345, 10, 10)
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restored_gc")
def test_threshold_zero_keeps_pythons_own() -> None:
    gc.set_threshold(700, 10, 10)
    tune_serving_process(0)
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() > 0
