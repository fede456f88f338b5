"""Token checks shared by REST and every transport: verify, refreshing keys once on an unknown kid."""

from __future__ import annotations

from fleetwire.auth.principal import Principal, TokenVerifier, UnknownKeyError


class Authenticator:
    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    def verify_now(self, token: str) -> Principal:
        """`verify` without I/O: AuthError, or UnknownKeyError when only a refresh of the
        key set could tell (then `verify`)."""
        return self._verifier.verify(token)

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token; AuthError otherwise (never logs the token)."""
        try:
            return self.verify_now(token)
        except UnknownKeyError:
            # A rotated key: fetch the JWKS again (rate-limited inside the verifier).
            await self._verifier.refresh_keys()
            return self._verifier.verify(token)
