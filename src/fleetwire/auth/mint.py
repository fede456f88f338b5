"""The one mint path (contract §3): tokens signed with this server's local HMAC secret.

The CLI (`fleetwire token`, `device`), the simulator, the REST route `POST /tokens` and the
benchmarks all mint through `TokenMinter`, so that every token fleetwire issues carries the
claims its own verification expects: the first allowed HS* algorithm, the configured audience
and issuer, ``iat``/``exp`` from the minter's clock. The signing itself is
`fleetwire.auth.jwt.mint_token` (jwt.py stays the one module importing the JWT library);
nothing else calls it outside the tests, which use it to forge arbitrary tokens.

Rules:
- Minting needs the local secret: a server that only verifies external tokens (no HS*
  algorithm allowed) refuses with `MintingUnavailable` (``conflict``).
- A minting request on behalf of a caller (``requested_by``, the REST route) needs an admin
  whose token carries no ``devices`` claim (``forbidden``): a token could carry a wider claim
  than its minter's. Local callers (``requested_by=None``) hold the secret anyway.
- Claims and argument checks are `mint_token`'s: ``sub``, ``role``, ``iat`` = floor(now),
  ``exp`` = floor(now + ttl_s), ``devices`` (left out of device tokens), ``aud``, ``iss``;
  ValueError for an empty ``sub``, ``ttl_s`` < 1, an unknown role. No upper bound on
  ``ttl_s`` here: the REST schema caps what a remote caller may ask for (366 days).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from fleetwire.auth.jwt import HMAC_ALGORITHMS, mint_token
from fleetwire.auth.principal import Principal, Role
from fleetwire.auth.secret import signing_secret
from fleetwire.domain.errors import ErrorCode, FleetwireError

if TYPE_CHECKING:
    from fleetwire.settings import Settings


class MintedToken(NamedTuple):
    token: str
    expires_at_ms: int


class MintingUnavailable(FleetwireError):
    """This server holds no signing secret: its tokens come from an identity provider."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.CONFLICT, "this server verifies external tokens and signs none")


def check_may_mint(principal: Principal) -> None:
    """Raise ``forbidden`` unless ``principal`` may have tokens minted on its behalf."""
    if not principal.at_least(Role.ADMIN):
        raise FleetwireError(ErrorCode.FORBIDDEN, f"this needs the {Role.ADMIN.value} role")
    if principal.device_patterns is not None:
        # A token could carry a wider claim than its minter's: only unrestricted admins mint.
        raise FleetwireError(
            ErrorCode.FORBIDDEN, "an admin restricted by a `devices` claim cannot mint tokens"
        )


class TokenMinter:
    """Mints the tokens this server's own `JwtVerifier` accepts (see the module docstring)."""

    def __init__(
        self,
        *,
        secret: str | None,
        algorithms: Sequence[str],
        audience: str | None = None,
        issuer: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # The verifier checks HS* tokens against this secret only when an HS* algorithm is
        # allowed; the first one is the one it would name first, as JwtVerifier does.
        hmac = [a for a in algorithms if a in HMAC_ALGORITHMS]
        self._secret = secret or None
        self._algorithm = hmac[0] if hmac and self._secret else None
        # An empty setting means "not configured", as for the verifier (`audience or None`).
        self._audience = audience or None
        self._issuer = issuer or None
        self._clock = clock

    @classmethod
    def from_settings(
        cls, settings: Settings, secret: str | None = None, *, clock: Callable[[], float] = time.time
    ) -> TokenMinter:
        """The server's minter: ``secret`` if given (the one the app chose), else
        `signing_secret(settings)` (which may create the data directory's secret file)."""
        return cls(
            secret=secret or signing_secret(settings),
            algorithms=settings.algorithms,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            clock=clock,
        )

    @property
    def can_mint(self) -> bool:
        """Whether a local signing secret and an allowed HS* algorithm are there."""
        return self._algorithm is not None

    def mint(
        self,
        *,
        sub: str,
        role: Role | str,
        ttl_s: float,
        devices: list[str] | None = None,
        requested_by: Principal | None = None,
    ) -> MintedToken:
        """Sign a token for ``sub``; ``requested_by`` is the remote caller asking for it, if any.

        Raises FleetwireError ``forbidden`` (caller not allowed; checked first, so a caller
        who may not mint gets 403 whatever the configuration), `MintingUnavailable` (no local
        secret), ValueError (bad argument, from `mint_token`).
        """
        if requested_by is not None:
            check_may_mint(requested_by)
        if self._algorithm is None or self._secret is None:
            raise MintingUnavailable()
        token, expires_at_ms = mint_token(
            secret=self._secret,
            algorithm=self._algorithm,
            sub=sub,
            role=role,
            ttl_s=ttl_s,
            devices=devices,
            audience=self._audience,
            issuer=self._issuer,
            now=self._clock(),
        )
        return MintedToken(token, expires_at_ms)
