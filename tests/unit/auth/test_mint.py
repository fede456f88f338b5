"""mint_token, JwtVerifier.from_settings / build_verifier and TokenMinter (the one mint path)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fleetwire.auth.jwt import JwtVerifier, build_verifier, mint_token
from fleetwire.auth.mint import MintingUnavailable, TokenMinter
from fleetwire.auth.principal import Principal, Role
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.settings import Settings
from tests.unit.auth.helpers import NOW, SECRET, Clock, jwk_of, private_pem, public_pem, refusal


def _decode(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "jwt_secret": None,
        "jwt_algorithms": "HS256",
        "jwt_public_key": None,
        "jwt_jwks_url": None,
        "jwt_audience": None,
        "jwt_issuer": None,
        "jwt_leeway_s": 0.0,
        "jwks_cache_s": 300.0,
    }
    values.update(overrides)
    return Settings(**values)


# ---------------------------------------------------------------- mint_token


def test_mint_token_exact_header_claims_and_expiry() -> None:
    """The minted token has header {alg, typ} and claims sub, role, iat, exp, devices, aud, iss."""
    token, expires_at_ms = mint_token(
        secret=SECRET,
        sub="ops-1",
        role=Role.OPERATOR,
        ttl_s=3600,
        devices=["site-a.*"],
        audience="fleetwire",
        issuer="fw",
        now=NOW + 0.75,
    )
    head, payload, _ = token.split(".")
    assert _decode(head) == {"alg": "HS256", "typ": "JWT"}
    assert _decode(payload) == {
        "sub": "ops-1",
        "role": "operator",
        "iat": NOW,
        "exp": NOW + 3600,
        "devices": ["site-a.*"],
        "aud": "fleetwire",
        "iss": "fw",
    }
    assert expires_at_ms == (NOW + 3600) * 1000


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_minted_hmac_token_verifies(alg: str, clock: Clock) -> None:
    """A token minted with HS256/384/512 verifies to the same Principal."""
    token, expires_at_ms = mint_token(secret=SECRET, algorithm=alg, sub="v", role="viewer", ttl_s=60, now=NOW)
    verifier = JwtVerifier(algorithms=[alg], secret=SECRET, clock=clock)
    assert verifier.verify(token) == Principal("v", Role.VIEWER, expires_at_ms, None)
    assert expires_at_ms == (NOW + 60) * 1000


@pytest.mark.parametrize(
    ("key_name", "alg"), [("rsa_key", "RS256"), ("ec_key", "ES256"), ("ed_key", "EdDSA")]
)
def test_minted_asymmetric_token_verifies(
    key_name: str, alg: str, clock: Clock, request: pytest.FixtureRequest
) -> None:
    """With a PEM private key, RS256/ES256/EdDSA tokens are minted and verify against the public key."""
    key = request.getfixturevalue(key_name)
    token, _ = mint_token(
        secret=private_pem(key), algorithm=alg, sub="d1", role="device", ttl_s=60, now=NOW, kid="k"
    )
    verifier = JwtVerifier(algorithms=[alg], public_key_pem=public_pem(key), clock=clock)
    assert verifier.verify(token) == Principal("d1", Role.DEVICE, (NOW + 60) * 1000, None)
    assert _decode(token.split(".")[0]) == {"alg": alg, "typ": "JWT", "kid": "k"}


def test_device_token_leaves_devices_out() -> None:
    """Minting a device token with devices drops the claim (verification would ignore it)."""
    token, _ = mint_token(secret=SECRET, sub="d1", role="device", ttl_s=60, devices=["x"], now=NOW)
    assert _decode(token.split(".")[1]) == {"sub": "d1", "role": "device", "iat": NOW, "exp": NOW + 60}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithm": "none"}, "unsupported JWT algorithm 'none'"),
        ({"algorithm": "HS1"}, "unsupported JWT algorithm 'HS1'"),
        ({"role": "root"}, "'root' is not a valid Role"),
        ({"sub": ""}, "sub must be a non-empty string"),
        ({"ttl_s": 0}, "ttl_s must be at least 1 second"),
        ({"ttl_s": float("inf")}, "ttl_s must be at least 1 second"),
        ({"devices": "site-*"}, "devices must be a list of strings"),
        ({"devices": [1]}, "devices must be a list of strings"),
        ({"secret": ""}, "the signing key is not usable for HS256"),
        ({"algorithm": "RS256"}, "the signing key is not usable for RS256"),
    ],
)
def test_mint_token_refuses_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    """Bad arguments raise ValueError with a precise message."""
    args: dict[str, Any] = {"secret": SECRET, "sub": "a", "role": "admin", "ttl_s": 60, "now": NOW, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        mint_token(**args)
    assert str(info.value) == message


def test_mint_refuses_a_public_key_or_pem_as_hmac_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    """Signing RS256 with a public key, or HS256 with a PEM, raises ValueError."""
    with pytest.raises(ValueError, match="RS256 needs a PEM private key to sign"):
        mint_token(secret=public_pem(rsa_key), algorithm="RS256", sub="a", role="admin", ttl_s=60)
    with pytest.raises(ValueError, match="not usable for HS256"):
        mint_token(secret=private_pem(rsa_key), algorithm="HS256", sub="a", role="admin", ttl_s=60)


def test_short_hmac_secret_mints_without_warnings(clock: Clock) -> None:
    """A short secret (allowed, logged) mints and verifies without raising warnings."""
    token, _ = mint_token(secret="short", sub="a", role="admin", ttl_s=60, now=NOW)
    assert JwtVerifier(algorithms=["HS256"], secret="short", clock=clock).verify(token).sub == "a"


# ---------------------------------------------------------------- settings


def test_from_settings_generates_and_reuses_the_data_dir_secret(tmp_path: Path, clock: Clock) -> None:
    """Without FLEETWIRE_JWT_SECRET, the verifier uses the secret generated in the data dir."""
    settings = _settings(tmp_path)
    verifier = JwtVerifier.from_settings(settings, clock=clock)
    secret = (tmp_path / "data" / "jwt_secret").read_text().strip()
    token, _ = mint_token(secret=secret, sub="a", role="admin", ttl_s=60, now=NOW)
    assert verifier.verify(token).sub == "a"
    assert build_verifier(settings, clock=clock).verify(token).sub == "a"


def test_from_settings_prefers_the_configured_secret(tmp_path: Path, clock: Clock) -> None:
    """FLEETWIRE_JWT_SECRET is used as is and no secret file is created."""
    verifier = JwtVerifier.from_settings(_settings(tmp_path, jwt_secret=SECRET), clock=clock)
    token, _ = mint_token(secret=SECRET, sub="a", role="admin", ttl_s=60, now=NOW)
    assert verifier.verify(token).sub == "a"
    assert not (tmp_path / "data").exists()


def test_from_settings_explicit_secret_wins(tmp_path: Path, clock: Clock) -> None:
    """A secret passed to from_settings is used over the settings and the file."""
    verifier = JwtVerifier.from_settings(_settings(tmp_path, jwt_secret="x" * 40), SECRET, clock=clock)
    token, _ = mint_token(secret=SECRET, sub="a", role="admin", ttl_s=60, now=NOW)
    assert verifier.verify(token).sub == "a"


def test_from_settings_public_key_as_path_or_text(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, clock: Clock
) -> None:
    """FLEETWIRE_JWT_PUBLIC_KEY may be PEM text or a PEM file path; RS/ES-only needs no secret file."""
    pem_path = tmp_path / "key.pem"
    pem_path.write_text(public_pem(ec_key))
    token, _ = mint_token(
        secret=private_pem(ec_key), algorithm="ES256", sub="a", role="admin", ttl_s=60, now=NOW
    )
    for value in (str(pem_path), public_pem(ec_key)):
        verifier = JwtVerifier.from_settings(
            _settings(tmp_path, jwt_algorithms="ES256", jwt_public_key=value), clock=clock
        )
        assert verifier.verify(token).sub == "a"
    assert not (tmp_path / "data").exists()


def test_from_settings_jwks_audience_issuer_leeway(
    tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey, clock: Clock
) -> None:
    """JWKS URL, audience, issuer and leeway from the settings all apply."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk_of(ed_key, "ed")]}))
    settings = _settings(
        tmp_path,
        jwt_algorithms="EdDSA",
        jwt_jwks_url=jwks.as_uri(),
        jwt_audience="fw",
        jwt_issuer="idp",
        jwt_leeway_s=5,
    )
    verifier = build_verifier(settings, clock=clock)
    token, _ = mint_token(
        secret=private_pem(ed_key),
        algorithm="EdDSA",
        sub="a",
        role="viewer",
        ttl_s=60,
        audience="fw",
        issuer="idp",
        now=NOW,
        kid="ed",
    )
    clock.t = NOW + 64
    assert verifier.verify(token).sub == "a"
    clock.t = NOW + 65
    assert refusal(verifier, token) == "token expired"
    wrong_aud, _ = mint_token(
        secret=private_pem(ed_key),
        algorithm="EdDSA",
        sub="a",
        role="viewer",
        ttl_s=60,
        audience="other",
        issuer="idp",
        now=NOW,
        kid="ed",
    )
    clock.t = NOW
    assert refusal(verifier, wrong_aud) == "audience mismatch"


def test_from_settings_refuses_none(tmp_path: Path) -> None:
    """FLEETWIRE_JWT_ALGORITHMS containing none is refused at start-up."""
    with pytest.raises(ValueError, match="'none' JWT algorithm is never accepted"):
        build_verifier(_settings(tmp_path, jwt_algorithms="HS256,none", jwt_secret=SECRET))


# ---------------------------------------------------------------- TokenMinter, the one mint path


def test_minter_mints_tokens_the_verifier_accepts(tmp_path: Path, clock: Clock) -> None:
    """TokenMinter uses the first allowed HS* algorithm, the audience/issuer and the clock."""
    settings = _settings(
        tmp_path, jwt_secret=SECRET, jwt_algorithms="HS384,HS256", jwt_audience="fw", jwt_issuer="me"
    )
    minter = TokenMinter.from_settings(settings, clock=clock)
    assert minter.can_mint is True
    token, expires_at_ms = minter.mint(sub="a", role="viewer", ttl_s=120, devices=["d*"])
    assert _decode(token.split(".")[0]) == {"alg": "HS384", "typ": "JWT"}
    assert _decode(token.split(".")[1]) == {
        "sub": "a",
        "role": "viewer",
        "iat": NOW,
        "exp": NOW + 120,
        "devices": ["d*"],
        "aud": "fw",
        "iss": "me",
    }
    verifier = build_verifier(settings, clock=clock)
    assert verifier.verify(token) == Principal("a", Role.VIEWER, (NOW + 120) * 1000, ("d*",))
    assert expires_at_ms == (NOW + 120) * 1000


def test_minter_uses_the_data_dir_secret_the_verifier_uses(tmp_path: Path, clock: Clock) -> None:
    """Without FLEETWIRE_JWT_SECRET both sides use the generated secret; an explicit one wins."""
    settings = _settings(tmp_path)
    token = TokenMinter.from_settings(settings, clock=clock).mint(sub="a", role="admin", ttl_s=60).token
    assert build_verifier(settings, clock=clock).verify(token).sub == "a"
    other = TokenMinter.from_settings(settings, SECRET, clock=clock).mint(sub="a", role="admin", ttl_s=60)
    assert JwtVerifier(algorithms=["HS256"], secret=SECRET, clock=clock).verify(other.token).sub == "a"


def test_minter_without_local_secret_refuses(tmp_path: Path, clock: Clock) -> None:
    """A server of external tokens only (no HS*) cannot mint: conflict, and no secret file."""
    minter = TokenMinter.from_settings(_settings(tmp_path, jwt_algorithms="RS256"), clock=clock)
    assert minter.can_mint is False
    with pytest.raises(MintingUnavailable) as info:
        minter.mint(sub="a", role="admin", ttl_s=60)
    assert (info.value.code, info.value.message) == (
        ErrorCode.CONFLICT,
        "this server verifies external tokens and signs none",
    )
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("requester", "message"),
    [
        (Principal("v", Role.VIEWER, NOW * 1000), "this needs the admin role"),
        (Principal("o", Role.OPERATOR, NOW * 1000), "this needs the admin role"),
        (Principal("d1", Role.DEVICE, NOW * 1000), "this needs the admin role"),
        (
            Principal("a", Role.ADMIN, NOW * 1000, ("d*",)),
            "an admin restricted by a `devices` claim cannot mint tokens",
        ),
    ],
)
def test_minter_refuses_a_requester_who_may_not_mint(
    requester: Principal, message: str, tmp_path: Path, clock: Clock
) -> None:
    """Only an unrestricted admin has tokens minted on its behalf; that is checked before the
    secret, so the refusal is forbidden even on a server that signs none."""
    for algorithms in ("HS256", "RS256"):
        minter = TokenMinter.from_settings(
            _settings(tmp_path, jwt_secret=SECRET, jwt_algorithms=algorithms), clock=clock
        )
        with pytest.raises(FleetwireError) as info:
            minter.mint(sub="x", role="admin", ttl_s=60, requested_by=requester)
        assert (info.value.code, info.value.message) == (ErrorCode.FORBIDDEN, message)
    admin = Principal("root", Role.ADMIN, NOW * 1000)
    minted = TokenMinter(secret=SECRET, algorithms=["HS256"], clock=clock).mint(
        sub="x", role="admin", ttl_s=60, requested_by=admin
    )
    assert minted.expires_at_ms == (NOW + 60) * 1000
