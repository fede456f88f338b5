"""The command line's own logic: where `fleetwire bench` finds the benchmarks, local tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetwire.auth.jwt import build_verifier
from fleetwire.auth.principal import Role
from fleetwire.cli import _benchmarks_checkout
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
