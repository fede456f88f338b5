"""What the command-line tools (`cli`, `simulate`) share: the local server's URL and tokens
minted with its secret. Its own module so that `simulate` need not import `cli`."""

from __future__ import annotations

from fleetwire.auth.mint import TokenMinter
from fleetwire.settings import Settings


def server_url(settings: Settings, url: str | None = None) -> str:
    """``url``, else the server these settings describe (http://FLEETWIRE_HOST:FLEETWIRE_PORT)."""
    return url or f"http://{settings.host}:{settings.port}"


def local_minter(settings: Settings) -> TokenMinter:
    """The minter of the server configured by ``settings``; exits when it signs no tokens."""
    minter = TokenMinter.from_settings(settings)
    if not minter.can_mint:
        raise SystemExit("this server verifies external tokens (no HS* algorithm): mint tokens elsewhere")
    return minter


def local_token(
    settings: Settings, sub: str, role: str, ttl_s: float, devices: list[str] | None = None
) -> str:
    """A token from the local secret (see `local_minter`)."""
    return local_minter(settings).mint(sub=sub, role=role, ttl_s=ttl_s, devices=devices).token
