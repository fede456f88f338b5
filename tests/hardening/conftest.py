"""Fixtures for the hardening tests: the integration harness's in-process nodes, RSA keys."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

# The in-process node fixtures (`make_node`, `node`) of the integration suite, reused as is.
from tests.integration.conftest import make_node, node

__all__ = ["make_node", "node"]


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)
