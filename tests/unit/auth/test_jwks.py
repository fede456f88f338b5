"""JWKS sources (file:// and a real local http:// server), caching, refresh and its rate limit."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fleetwire.auth.jwt import JwksSource, JwtVerifier
from fleetwire.auth.principal import Principal, Role
from tests.unit.auth.helpers import NOW, Clock, JwksServer, claims, jwk_of, refusal, sign, unknown_key


def _write(path: Path, *keys: dict[str, object]) -> None:
    path.write_text(json.dumps({"keys": list(keys)}))


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    return tmp_path / "jwks.json"


# ---------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/jwks", "file://host/etc/jwks.json", "file:relative.json", "https://", "jwks.json"],
)
def test_bad_jwks_urls_are_refused(url: str) -> None:
    """Only https://, http:// with a host, and file:/// absolute paths are accepted."""
    with pytest.raises(ValueError, match="JWKS URL"):
        JwksSource(url)


def test_missing_jwks_file_is_a_configuration_error(tmp_path: Path) -> None:
    """A file:// JWKS that cannot be read at construction raises ValueError."""
    with pytest.raises(ValueError, match="cannot load the JWKS"):
        JwtVerifier(algorithms=["RS256"], jwks=JwksSource((tmp_path / "none.json").as_uri()))


def test_jwks_file_that_is_not_a_jwks_is_a_configuration_error(jwks_file: Path) -> None:
    """A file:// JWKS without a `keys` list raises ValueError."""
    jwks_file.write_text('{"n": "x"}')
    with pytest.raises(ValueError, match="no 'keys' list"):
        JwtVerifier(algorithms=["RS256"], jwks=JwksSource(jwks_file.as_uri()))


def test_unusable_jwks_entries_are_skipped(
    jwks_file: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, clock: Clock
) -> None:
    """Broken, unsupported or non-signing entries are skipped; the good key still verifies."""
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    _write(
        jwks_file,
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        {"kty": "XYZ", "kid": "odd"},
        {"kty": "EC", "kid": "k256", "crv": "secp256k1", "x": "AA", "y": "AA"},
        jwk_of(small, "small"),
        jwk_of(ec_key, "none-alg", alg="none"),
        jwk_of(ec_key, "ops", key_ops=["encrypt"]),
        "not an object",  # type: ignore[arg-type]
        jwk_of(rsa_key, "good"),
    )
    verifier = JwtVerifier(algorithms=["RS256", "ES256"], jwks=JwksSource(jwks_file.as_uri()), clock=clock)
    assert verifier.verify(sign("RS256", rsa_key, claims(), kid="good")).sub == "alice"
    for kid in ("broken", "odd", "k256", "none-alg", "ops"):
        assert unknown_key(verifier, sign("ES256", ec_key, claims(), kid=kid)) == "unknown key id"
    assert unknown_key(verifier, sign("RS256", small, claims(), kid="small")) == "unknown key id"


# ---------------------------------------------------------------- file rotation and rate limit


@pytest.mark.anyio
async def test_unknown_kid_then_refresh_picks_up_a_rotated_key(
    jwks_file: Path, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """An unknown kid raises UnknownKeyError; after the file gains the key, refresh_keys() lets it verify."""
    _write(jwks_file, jwk_of(rsa_key, "old"))
    verifier = JwtVerifier(algorithms=["RS256"], jwks=JwksSource(jwks_file.as_uri()), clock=clock)
    token = sign("RS256", rsa_key2, claims(), kid="new")
    assert unknown_key(verifier, token) == "unknown key id"
    _write(jwks_file, jwk_of(rsa_key, "old"), jwk_of(rsa_key2, "new"))
    clock.t = NOW + 10
    assert await verifier.refresh_keys() is True
    assert verifier.verify(token) == Principal("alice", Role.ADMIN, (NOW + 60) * 1000, None)
    assert verifier.verify(sign("RS256", rsa_key, claims(), kid="old")).sub == "alice"


@pytest.mark.anyio
async def test_refresh_is_rate_limited_to_once_per_ten_seconds(
    jwks_file: Path, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """Within 10 s of the last load, refresh_keys() returns False and does not reread the file."""
    _write(jwks_file, jwk_of(rsa_key, "old"))
    verifier = JwtVerifier(algorithms=["RS256"], jwks=JwksSource(jwks_file.as_uri()), clock=clock)
    _write(jwks_file, jwk_of(rsa_key2, "new"))
    token = sign("RS256", rsa_key2, claims(), kid="new")
    clock.t = NOW + 9.9  # the construction-time load counts as the last attempt
    assert await verifier.refresh_keys() is False
    assert unknown_key(verifier, token) == "unknown key id"
    clock.t = NOW + 10
    assert await verifier.refresh_keys() is True
    clock.t = NOW + 15
    assert await verifier.refresh_keys() is False
    assert verifier.verify(token).sub == "alice"


@pytest.mark.anyio
async def test_kid_spraying_causes_one_fetch(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """Fifty tokens with random unknown kids within 10 s trigger a single JWKS request."""
    jwks_server.document = {"keys": [jwk_of(rsa_key, "k1")]}
    verifier = JwtVerifier(algorithms=["RS256"], jwks=JwksSource(jwks_server.url), clock=clock)
    clock.t = NOW + 10
    results = []
    for i in range(50):
        token = sign("RS256", rsa_key, claims(), kid=f"spray-{i}")
        assert unknown_key(verifier, token) == "unknown key id"
        results.append(await verifier.refresh_keys())
        clock.t += 0.1
    assert results == [True] + [False] * 49
    assert len(jwks_server.requests) == 2  # construction + one refresh


@pytest.mark.anyio
async def test_concurrent_refreshes_share_one_fetch(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """Ten concurrent refresh_keys() calls make one request and all report True."""
    jwks_server.document = {"keys": [jwk_of(rsa_key, "k1")]}
    verifier = JwtVerifier(algorithms=["RS256"], jwks=JwksSource(jwks_server.url), clock=clock)
    clock.t = NOW + 10
    results = await asyncio.gather(*(verifier.refresh_keys() for _ in range(10)))
    assert results == [True] * 10
    assert len(jwks_server.requests) == 2


@pytest.mark.anyio
async def test_refresh_without_jwks_returns_false(rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
    """refresh_keys() is a no-op returning False when no JWKS is configured."""
    from tests.unit.auth.helpers import public_pem

    verifier = JwtVerifier(algorithms=["RS256"], public_key_pem=public_pem(rsa_key), clock=clock)
    assert await verifier.refresh_keys() is False


# ---------------------------------------------------------------- cache expiry


@pytest.mark.anyio
async def test_expired_cache_asks_for_a_refresh_then_serves(
    jwks_file: Path, ed_key: ed25519.Ed25519PrivateKey, clock: Clock
) -> None:
    """After jwks_cache_s a known kid raises UnknownKeyError("key set expired"); refreshed, it verifies."""
    _write(jwks_file, jwk_of(ed_key, "ed"))
    verifier = JwtVerifier(
        algorithms=["EdDSA"], jwks=JwksSource(jwks_file.as_uri()), jwks_cache_s=60, clock=clock
    )
    token = sign("EdDSA", ed_key, claims(exp=NOW + 600), kid="ed")
    clock.t = NOW + 59.9
    assert verifier.verify(token).sub == "alice"
    clock.t = NOW + 60
    assert unknown_key(verifier, token) == "key set expired"
    assert await verifier.refresh_keys() is True
    assert verifier.verify(token).sub == "alice"


@pytest.mark.anyio
async def test_rotated_out_key_is_refused_after_cache_expiry(
    jwks_file: Path, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """A key removed from the JWKS stops verifying once the cache expires and is reloaded."""
    _write(jwks_file, jwk_of(rsa_key, "old"))
    verifier = JwtVerifier(
        algorithms=["RS256"], jwks=JwksSource(jwks_file.as_uri()), jwks_cache_s=30, clock=clock
    )
    token = sign("RS256", rsa_key, claims(exp=NOW + 600), kid="old")
    _write(jwks_file, jwk_of(rsa_key2, "new"))
    clock.t = NOW + 20
    assert verifier.verify(token).sub == "alice"  # cached
    clock.t = NOW + 30
    assert unknown_key(verifier, token) == "key set expired"
    assert await verifier.refresh_keys() is True
    assert unknown_key(verifier, token) == "unknown key id"


@pytest.mark.anyio
async def test_failed_refresh_keeps_serving_the_cached_keys(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """If the JWKS server fails, refresh returns True and cached keys serve until the next attempt."""
    jwks_server.document = {"keys": [jwk_of(rsa_key, "k1")]}
    verifier = JwtVerifier(
        algorithms=["RS256"], jwks=JwksSource(jwks_server.url), jwks_cache_s=30, clock=clock
    )
    token = sign("RS256", rsa_key, claims(exp=NOW + 600), kid="k1")
    jwks_server.status = 500
    clock.t = NOW + 30
    assert unknown_key(verifier, token) == "key set expired"
    assert await verifier.refresh_keys() is True
    assert verifier.verify(token).sub == "alice"
    clock.t = NOW + 39.9
    assert verifier.verify(token).sub == "alice"
    clock.t = NOW + 40
    assert unknown_key(verifier, token) == "key set expired"
    assert len(jwks_server.requests) == 2


# ---------------------------------------------------------------- http(s) source


def test_http_jwks_is_loaded_at_construction(
    jwks_server: JwksServer, ec_key: ec.EllipticCurvePrivateKey, clock: Clock
) -> None:
    """An http:// JWKS is fetched once at construction, and tokens then verify without I/O."""
    jwks_server.document = {"keys": [jwk_of(ec_key, "ec-1", alg="ES256", use="sig")]}
    verifier = JwtVerifier(algorithms=["ES256"], jwks=JwksSource(jwks_server.url), clock=clock)
    for _ in range(3):
        assert verifier.verify(sign("ES256", ec_key, claims(), kid="ec-1")).sub == "alice"
    assert jwks_server.requests == ["/.well-known/jwks.json"]


@pytest.mark.anyio
async def test_http_jwks_rotation_via_refresh(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """A kid added on the server verifies after UnknownKeyError and an awaited refresh."""
    jwks_server.document = {"keys": [jwk_of(rsa_key, "a")]}
    verifier = JwtVerifier(algorithms=["RS256"], jwks=JwksSource(jwks_server.url), clock=clock)
    token = sign("RS256", rsa_key2, claims(), kid="b")
    assert unknown_key(verifier, token) == "unknown key id"
    jwks_server.document = {"keys": [jwk_of(rsa_key, "a"), jwk_of(rsa_key2, "b")]}
    clock.t = NOW + 10
    assert await verifier.refresh_keys() is True
    assert verifier.verify(token).sub == "alice"
    assert len(jwks_server.requests) == 2


@pytest.mark.anyio
async def test_unreachable_http_jwks_at_start_is_retried_on_refresh(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """A failing http JWKS at construction does not raise; the first allowed refresh loads it."""
    jwks_server.status = 503
    jwks_server.document = {"keys": [jwk_of(rsa_key, "k")]}
    verifier = JwtVerifier(algorithms=["RS256"], jwks=JwksSource(jwks_server.url), clock=clock)
    token = sign("RS256", rsa_key, claims(), kid="k")
    assert unknown_key(verifier, token) == "unknown key id"
    jwks_server.status = 200
    clock.t = NOW + 10
    assert await verifier.refresh_keys() is True
    assert verifier.verify(token).sub == "alice"


@pytest.mark.anyio
async def test_redirects_are_not_followed(
    jwks_server: JwksServer, attacker_server: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """A 302 from the JWKS server is a failed load; the redirect target is never asked."""
    jwks_server.status = 302
    jwks_server.headers = {"Location": attacker_server.url}
    attacker_server.document = {"keys": [jwk_of(rsa_key, "k")]}
    verifier = JwtVerifier(algorithms=["RS256"], jwks=JwksSource(jwks_server.url), clock=clock)
    clock.t = NOW + 10
    assert await verifier.refresh_keys() is True
    assert unknown_key(verifier, sign("RS256", rsa_key, claims(), kid="k")) == "unknown key id"
    assert attacker_server.requests == []


@pytest.mark.anyio
async def test_oversized_jwks_document_is_refused(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """A JWKS response larger than the limit is not used."""
    jwks_server.document = {"keys": [jwk_of(rsa_key, "k")], "pad": "x" * 5000}
    verifier = JwtVerifier(
        algorithms=["RS256"], jwks=JwksSource(jwks_server.url, max_bytes=4096), clock=clock
    )
    assert unknown_key(verifier, sign("RS256", rsa_key, claims(), kid="k")) == "unknown key id"
    clock.t = NOW + 10
    assert await verifier.refresh_keys() is True
    assert unknown_key(verifier, sign("RS256", rsa_key, claims(), kid="k")) == "unknown key id"


def test_jwks_and_pem_together(
    jwks_file: Path, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """With both, a kid is looked up in the JWKS only; a token without kid may use the PEM key."""
    from tests.unit.auth.helpers import public_pem

    _write(jwks_file, jwk_of(rsa_key2, "jw"))
    verifier = JwtVerifier(
        algorithms=["RS256"],
        public_key_pem=public_pem(rsa_key),
        jwks=JwksSource(jwks_file.as_uri()),
        clock=clock,
    )
    assert verifier.verify(sign("RS256", rsa_key, claims())).sub == "alice"
    assert verifier.verify(sign("RS256", rsa_key2, claims(), kid="jw")).sub == "alice"
    assert unknown_key(verifier, sign("RS256", rsa_key, claims(), kid="pem")) == "unknown key id"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refusal(verifier, sign("RS256", other, claims())) == "signature invalid"
