"""load_or_create_secret: the generated HMAC secret in the data directory."""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path

import pytest

from fleetwire.auth.secret import load_or_create_secret


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_creates_a_256_bit_secret_at_mode_0600_in_a_new_directory(tmp_path: Path) -> None:
    """A missing data dir is created (0700) and the secret file is written at mode 0600."""
    data_dir = tmp_path / "a" / "data"
    secret = load_or_create_secret(data_dir)
    path = data_dir / "jwt_secret"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret)
    assert path.read_text() == secret + "\n"
    assert _mode(path) == 0o600
    assert _mode(data_dir) == 0o700
    assert sorted(p.name for p in data_dir.iterdir()) == ["jwt_secret"]


def test_mode_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    """The file is created at 0600 whatever the umask."""
    old = os.umask(0)
    try:
        load_or_create_secret(tmp_path)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "jwt_secret") == 0o600


def test_secret_is_reused_across_calls(tmp_path: Path) -> None:
    """A second call (a restart) returns the same secret and leaves the file untouched."""
    first = load_or_create_secret(tmp_path)
    before = (tmp_path / "jwt_secret").stat()
    second = load_or_create_secret(tmp_path)
    after = (tmp_path / "jwt_secret").stat()
    assert second == first
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_two_data_dirs_get_different_secrets(tmp_path: Path) -> None:
    """Each data directory gets its own random secret."""
    assert load_or_create_secret(tmp_path / "one") != load_or_create_secret(tmp_path / "two")


def test_existing_secret_with_loose_permissions_is_tightened(tmp_path: Path) -> None:
    """A world-readable existing secret is kept and its mode tightened to 0600."""
    path = tmp_path / "jwt_secret"
    path.write_text("operator-provided-secret-" + "y" * 20 + "\n")
    path.chmod(0o644)
    assert load_or_create_secret(tmp_path) == "operator-provided-secret-" + "y" * 20
    assert _mode(path) == 0o600


def test_short_existing_secret_is_refused_not_replaced(tmp_path: Path) -> None:
    """A file holding fewer than 32 characters raises ValueError and is left as it was."""
    path = tmp_path / "jwt_secret"
    path.write_text("short\n")
    path.chmod(0o600)
    with pytest.raises(ValueError, match="shorter than 32 characters"):
        load_or_create_secret(tmp_path)
    assert path.read_text() == "short\n"


def test_empty_existing_secret_is_refused(tmp_path: Path) -> None:
    """An empty secret file raises ValueError rather than being regenerated."""
    path = tmp_path / "jwt_secret"
    path.write_text("")
    path.chmod(0o600)
    with pytest.raises(ValueError, match="shorter than 32 characters"):
        load_or_create_secret(tmp_path)
    assert path.read_text() == ""


def test_a_directory_in_place_of_the_secret_is_refused(tmp_path: Path) -> None:
    """``jwt_secret`` being a directory raises ValueError."""
    (tmp_path / "jwt_secret").mkdir(mode=0o700)
    with pytest.raises(ValueError, match="is not a regular file"):
        load_or_create_secret(tmp_path)


def test_concurrent_first_starts_agree_on_one_secret(tmp_path: Path) -> None:
    """Eight simultaneous first calls all return the one secret that ends up in the file."""
    results: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(load_or_create_secret(tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = (tmp_path / "jwt_secret").read_text().strip()
    assert results == [stored] * 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jwt_secret"]
