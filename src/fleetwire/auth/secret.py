"""The generated HMAC secret kept in the data directory (contract §4, ``FLEETWIRE_JWT_SECRET``)."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetwire.settings import Settings

log = logging.getLogger(__name__)

SECRET_FILE = "jwt_secret"
MIN_SECRET_CHARS = 32
_MAX_FILE_BYTES = 4096


def signing_secret(settings: Settings) -> str | None:
    """The HMAC secret this server signs and verifies with, if it uses one (contract §4).

    None when no HS* algorithm is allowed (the server verifies external tokens only); else
    ``FLEETWIRE_JWT_SECRET``, else the one generated and kept in the data directory.
    """
    if not any(a.startswith("HS") for a in settings.algorithms):
        return None
    return settings.jwt_secret or load_or_create_secret(settings.data_dir)


def load_or_create_secret(data_dir: Path) -> str:
    """Return the HMAC secret kept in ``data_dir/jwt_secret``, generating it on first use.

    - A new secret is 256 random bits (43 URL-safe base64 characters). It is written to a
      temporary file created with ``O_CREAT | O_EXCL`` at mode 0600, flushed, then hard-linked
      into place, so the file is never readable by others, never seen half-written, and two
      processes starting at once agree on one secret (the loser of the link reads the winner's).
    - ``data_dir`` is created (mode 0700) when missing; an existing directory is left as it is.
    - An existing file is reused across restarts. If its mode grants any access to group or
      others, the permissions are **tightened** to 0600 (with a warning in the log) rather than
      refused: the secret was never ours to discard, and refusing would only stop the server.
      When tightening is impossible (another owner, read-only filesystem), it raises
      ``PermissionError``.
    - A file that is not a regular file, is empty, or holds fewer than 32 characters raises
      ``ValueError``; it is never silently replaced (that would invalidate issued tokens).
      Symbolic links are followed.
    """
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    candidate = secrets.token_urlsafe(32)
    tmp = data_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, candidate.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_secret(path)  # another process won the race; use its secret
        log.info("generated a new JWT secret in %s", path)
        return candidate
    finally:
        tmp.unlink(missing_ok=True)


def _read_secret(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            try:
                os.fchmod(fd, 0o600)
            except OSError as exc:
                raise PermissionError(
                    f"{path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}) "
                    "and its permissions cannot be tightened to 0600"
                ) from exc
            log.warning("%s had mode %o; tightened to 0600", path, stat.S_IMODE(st.st_mode))
        data = os.read(fd, _MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_BYTES:
        raise ValueError(f"{path} is too large to be a JWT secret")
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text") from exc
    if len(value) < MIN_SECRET_CHARS:
        raise ValueError(f"{path} holds a secret shorter than {MIN_SECRET_CHARS} characters")
    return value
