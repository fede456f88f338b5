"""JwtVerifier accepts well-formed tokens of every supported family and maps claims exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fleetwire.auth.jwt import JwksSource, JwtVerifier
from fleetwire.auth.principal import Principal, Role
from tests.unit.auth.helpers import NOW, SECRET, Clock, claims, jwk_of, public_pem, sign


def _hs_verifier(clock: Clock, algorithms: list[str], **kwargs: Any) -> JwtVerifier:
    return JwtVerifier(algorithms=algorithms, secret=SECRET, clock=clock, **kwargs)


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_tokens_are_accepted(alg: str, clock: Clock) -> None:
    """HS256/384/512 tokens signed with the shared secret yield the exact Principal."""
    verifier = _hs_verifier(clock, [alg])
    token = sign(alg, SECRET.encode(), claims())
    assert verifier.verify(token) == Principal(
        sub="alice", role=Role.ADMIN, expires_at_ms=(NOW + 60) * 1000, device_patterns=None
    )


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key", "ed_key"])
def test_asymmetric_tokens_are_accepted_with_a_pem_key(
    key_name: str, clock: Clock, request: pytest.FixtureRequest
) -> None:
    """RS256, ES256 and EdDSA tokens verify against the configured PEM public key."""
    key = request.getfixturevalue(key_name)
    alg = {"rsa_key": "RS256", "ec_key": "ES256", "ed_key": "EdDSA"}[key_name]
    verifier = JwtVerifier(
        algorithms=["RS256", "ES256", "EdDSA"], public_key_pem=public_pem(key), clock=clock
    )
    token = sign(alg, key, claims(role="viewer", sub="bob"))
    assert verifier.verify(token) == Principal("bob", Role.VIEWER, (NOW + 60) * 1000, None)


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key", "ed_key"])
def test_asymmetric_tokens_are_accepted_with_a_jwks_file(
    key_name: str, clock: Clock, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """RS256, ES256 and EdDSA tokens verify against the JWKS key named by their kid."""
    keys = {"rsa_key": "RS256", "ec_key": "ES256", "ed_key": "EdDSA"}
    jwks = {"keys": [jwk_of(request.getfixturevalue(name), kid=name) for name in keys]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    verifier = JwtVerifier(
        algorithms=["RS256", "ES256", "EdDSA"], jwks=JwksSource(path.as_uri()), clock=clock
    )
    token = sign(keys[key_name], request.getfixturevalue(key_name), claims(), kid=key_name)
    assert verifier.verify(token) == Principal("alice", Role.ADMIN, (NOW + 60) * 1000, None)


def test_token_without_kid_is_tried_against_the_fitting_jwks_keys(
    rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey, clock: Clock, tmp_path: Path
) -> None:
    """Without a kid, every JWKS key of the right type is tried; the second one matches."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_of(rsa_key2, "a"), jwk_of(rsa_key, "b")]}))
    verifier = JwtVerifier(algorithms=["RS256"], jwks=JwksSource(path.as_uri()), clock=clock)
    assert verifier.verify(sign("RS256", rsa_key, claims())).sub == "alice"


def test_kid_is_ignored_when_only_a_pem_key_is_configured(
    ec_key: ec.EllipticCurvePrivateKey, clock: Clock
) -> None:
    """Without a JWKS, a token's kid does not matter: the PEM key verifies it."""
    verifier = JwtVerifier(algorithms=["ES256"], public_key_pem=public_pem(ec_key), clock=clock)
    assert verifier.verify(sign("ES256", ec_key, claims(), kid="anything")).role is Role.ADMIN


def test_pem_with_escaped_newlines_is_accepted(ed_key: ed25519.Ed25519PrivateKey, clock: Clock) -> None:
    """A PEM given on one line with literal backslash-n sequences (as in env files) is accepted."""
    one_line = public_pem(ed_key).replace("\n", "\\n")
    verifier = JwtVerifier(algorithms=["EdDSA"], public_key_pem=one_line, clock=clock)
    assert verifier.verify(sign("EdDSA", ed_key, claims())).sub == "alice"


def test_devices_claim_becomes_a_tuple_of_patterns(clock: Clock) -> None:
    """A `devices` list on a client token becomes Principal.device_patterns in order."""
    verifier = _hs_verifier(clock, ["HS256"])
    token = sign("HS256", SECRET.encode(), claims(role="operator", devices=["site-a.*", "d1"]))
    assert verifier.verify(token) == Principal("alice", Role.OPERATOR, (NOW + 60) * 1000, ("site-a.*", "d1"))


def test_empty_devices_claim_means_no_device(clock: Clock) -> None:
    """`devices: []` yields an empty tuple (sees nothing), not None (sees all)."""
    verifier = _hs_verifier(clock, ["HS256"])
    principal = verifier.verify(sign("HS256", SECRET.encode(), claims(role="viewer", devices=[])))
    assert principal.device_patterns == ()
    assert principal.may_see("d1") is False


@pytest.mark.parametrize("devices", [["x"], "not-a-list", [1, 2]])
def test_device_token_ignores_devices_claim(devices: Any, clock: Clock) -> None:
    """A device-role token ignores `devices`, even a malformed one: patterns stay None."""
    verifier = _hs_verifier(clock, ["HS256"])
    token = sign("HS256", SECRET.encode(), claims(sub="dev-1", role="device", devices=devices))
    assert verifier.verify(token) == Principal("dev-1", Role.DEVICE, (NOW + 60) * 1000, None)


def test_fractional_exp_gives_millisecond_expiry(clock: Clock) -> None:
    """expires_at_ms is exp * 1000, fractional seconds included."""
    verifier = _hs_verifier(clock, ["HS256"])
    token = sign("HS256", SECRET.encode(), claims(exp=NOW + 1.5))
    assert verifier.verify(token).expires_at_ms == NOW * 1000 + 1500


def test_audience_and_issuer_are_accepted_when_they_match(clock: Clock) -> None:
    """A configured audience matches a string aud or a list containing it; iss must be equal."""
    verifier = _hs_verifier(clock, ["HS256"], audience="fleetwire", issuer="https://idp")
    for aud in ("fleetwire", ["other", "fleetwire"]):
        token = sign("HS256", SECRET.encode(), claims(aud=aud, iss="https://idp"))
        assert verifier.verify(token).sub == "alice"


def test_aud_and_iss_are_ignored_when_not_configured(clock: Clock) -> None:
    """Without a configured audience/issuer, the token's aud and iss are not checked."""
    verifier = _hs_verifier(clock, ["HS256"])
    token = sign("HS256", SECRET.encode(), claims(aud="someone-else", iss="elsewhere"))
    assert verifier.verify(token).sub == "alice"


def test_unknown_header_parameters_are_harmless(clock: Clock) -> None:
    """Header fields like typ=at+jwt or x5t do not affect verification."""
    verifier = _hs_verifier(clock, ["HS256"])
    token = sign("HS256", SECRET.encode(), claims(), typ="at+jwt", x5t="abc")
    assert verifier.verify(token).sub == "alice"


def test_every_role_is_accepted(clock: Clock) -> None:
    """The four roles map to the Role enum."""
    verifier = _hs_verifier(clock, ["HS256"])
    for role in Role:
        assert verifier.verify(sign("HS256", SECRET.encode(), claims(role=role.value))).role is role
