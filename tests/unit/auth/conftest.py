"""Fixtures: real keys generated with cryptography, a settable clock, a local JWKS server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.unit.auth.helpers import Clock, JwksServer, serve_jwks


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="session")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    with serve_jwks() as server:
        yield server


@pytest.fixture
def attacker_server() -> Iterator[JwksServer]:
    """A second server standing for a key URL chosen by an attacker; it must never be asked."""
    with serve_jwks() as server:
        yield server
