"""The Principal (contract §1) and the TokenVerifier seam that turns a JWT into one."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any, Protocol


class Role(StrEnum):
    DEVICE = "device"
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


_RANK = {Role.DEVICE: 0, Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}


class AuthError(Exception):
    """The token is not acceptable: HTTP 401 / error code ``unauthorized``."""


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    role: Role
    expires_at_ms: int
    # Device-id glob patterns from the `devices` claim; None means every device.
    device_patterns: tuple[str, ...] | None = None

    def at_least(self, role: Role) -> bool:
        """Role order for clients: viewer < operator < admin. A device ranks below all of them."""
        return _RANK[self.role] >= _RANK[role]

    def may_see(self, device_id: str) -> bool:
        if self.role is Role.DEVICE:
            return device_id == self.sub
        if self.device_patterns is None:
            return True
        return any(fnmatchcase(device_id, p) for p in self.device_patterns)


class TokenVerifier(Protocol):
    """Verifies a compact JWT and returns its Principal.

    Contract: raise AuthError for every token that must be refused (garbage, bad signature,
    algorithm outside the allow-list, missing or past ``exp``, future ``nbf``, audience or
    issuer mismatch, unknown role). ``verify`` never blocks on the network; ``refresh_keys``
    may (a JWKS fetch) and is awaited by callers after ``verify`` raised UnknownKeyError.
    """

    def verify(self, token: str) -> Principal: ...

    async def refresh_keys(self) -> bool: ...


class UnknownKeyError(AuthError):
    """The token names a `kid` that the cached key set lacks; refresh the keys and retry once."""


def claims_of(principal: Principal) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": principal.sub, "role": principal.role.value}
    if principal.device_patterns is not None:
        claims["devices"] = list(principal.device_patterns)
    return claims
