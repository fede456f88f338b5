"""Authenticator: verify a token, refreshing the keys once on an unknown key id."""

from __future__ import annotations

import pytest

from fleetwire.auth.principal import AuthError
from fleetwire.services.auth import Authenticator
from tests.unit.services.fakes import ADMIN, FakeVerifier

pytestmark = pytest.mark.anyio


async def test_verify_returns_the_principal() -> None:
    """A valid token gives its principal without any key refresh."""
    verifier = FakeVerifier()
    verifier.tokens["t1"] = ADMIN
    assert await Authenticator(verifier).verify("t1") == ADMIN
    assert verifier.refreshes == 0


async def test_unknown_key_refreshes_once_and_retries() -> None:
    """A token signed by a rotated key: the keys are refreshed once and the token verified
    again."""
    verifier = FakeVerifier()
    verifier.tokens["t1"] = ADMIN
    verifier.rotated.add("t1")
    assert await Authenticator(verifier).verify("t1") == ADMIN
    assert verifier.refreshes == 1


async def test_a_refused_token_raises_auth_error() -> None:
    """A refused token raises AuthError; no refresh is tried."""
    verifier = FakeVerifier()
    with pytest.raises(AuthError, match="bad signature"):
        await Authenticator(verifier).verify("forged")
    assert verifier.refreshes == 0
