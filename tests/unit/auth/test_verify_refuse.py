"""JwtVerifier refuses every token the contract says it must, with a short exact message."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fleetwire.auth.jwt import JwksSource, JwtVerifier
from fleetwire.auth.principal import AuthError
from tests.unit.auth.helpers import (
    NOW,
    SECRET,
    Clock,
    JwksServer,
    PrivateKey,
    b64,
    claims,
    jwk_of,
    public_pem,
    refusal,
    segment,
    sign,
    unknown_key,
)

KEY = SECRET.encode()


@pytest.fixture
def hs(clock: Clock) -> JwtVerifier:
    return JwtVerifier(algorithms=["HS256"], secret=SECRET, clock=clock)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("algorithms", [["none"], ["HS256", "none"], ["None"], ["NONE"]])
def test_none_in_the_allow_list_is_refused_at_construction(algorithms: list[str]) -> None:
    """A configuration listing `none` (any case) raises ValueError."""
    with pytest.raises(ValueError, match="'none' JWT algorithm is never accepted"):
        JwtVerifier(algorithms=algorithms, secret=SECRET)


def test_unknown_algorithm_is_refused_at_construction() -> None:
    """An algorithm name the verifier does not implement raises ValueError."""
    with pytest.raises(ValueError, match="unsupported JWT algorithm 'HS1'"):
        JwtVerifier(algorithms=["HS1"], secret=SECRET)


def test_empty_allow_list_is_refused() -> None:
    """An empty allow-list raises ValueError."""
    with pytest.raises(ValueError, match="allow-list is empty"):
        JwtVerifier(algorithms=[], secret=SECRET)


def test_allow_list_given_as_a_string_is_refused() -> None:
    """`algorithms="HS256"` (a str, not a list) raises TypeError."""
    with pytest.raises(TypeError):
        JwtVerifier(algorithms="HS256", secret=SECRET)


def test_hmac_without_secret_is_refused() -> None:
    """HS256 allowed without a secret raises ValueError."""
    with pytest.raises(ValueError, match="HS256 is allowed but no JWT secret"):
        JwtVerifier(algorithms=["HS256"])


def test_asymmetric_without_key_is_refused() -> None:
    """RS256 allowed without a PEM key or JWKS raises ValueError."""
    with pytest.raises(ValueError, match="RS256 is allowed but neither a public key nor a JWKS"):
        JwtVerifier(algorithms=["RS256"])


def test_public_key_pem_as_hmac_secret_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """A secret that is a PEM public key raises ValueError (no key confusion by configuration)."""
    with pytest.raises(ValueError, match="looks like an asymmetric key"):
        JwtVerifier(algorithms=["HS256", "RS256"], secret=public_pem(rsa_key))


def test_pem_key_fitting_no_allowed_algorithm_is_refused(ec_key: ec.EllipticCurvePrivateKey) -> None:
    """An EC key when only RS256 is allowed raises ValueError."""
    with pytest.raises(ValueError, match="fits none of the allowed algorithms"):
        JwtVerifier(algorithms=["RS256"], public_key_pem=public_pem(ec_key))


def test_small_rsa_key_is_refused() -> None:
    """An RSA public key under 2048 bits raises ValueError."""
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="at least 2048 bits"):
        JwtVerifier(algorithms=["RS256"], public_key_pem=public_pem(small))


def test_garbage_public_key_is_refused() -> None:
    """A public key setting that is not PEM raises ValueError."""
    with pytest.raises(ValueError, match="not a PEM public key or certificate"):
        JwtVerifier(algorithms=["RS256"], public_key_pem="-----BEGIN PUBLIC KEY-----\nnope\n")


# ---------------------------------------------------------------- algorithm and key confusion


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_token_is_refused(alg: str, hs: JwtVerifier) -> None:
    """A handcrafted unsigned token (`alg: none`, empty signature) is refused."""
    token = f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(claims())}."
    assert refusal(hs, token) == "algorithm not allowed"


def test_alg_none_is_refused_even_when_signature_present(hs: JwtVerifier) -> None:
    """`alg: none` with an HMAC signature attached is still refused."""
    signing_input = f"{segment({'alg': 'none'})}.{segment(claims())}"
    sig = hmac.new(KEY, signing_input.encode(), hashlib.sha256).digest()
    assert refusal(hs, f"{signing_input}.{b64(sig)}") == "algorithm not allowed"


def test_missing_or_non_string_alg_is_refused(hs: JwtVerifier) -> None:
    """A header without alg, or with a non-string alg, is refused."""
    for header in ({"typ": "JWT"}, {"alg": ["HS256"]}, {"alg": None}):
        signing_input = f"{segment(header)}.{segment(claims())}"
        sig = hmac.new(KEY, signing_input.encode(), hashlib.sha256).digest()
        assert refusal(hs, f"{signing_input}.{b64(sig)}") == "algorithm not allowed"


def test_algorithm_outside_the_allow_list_is_refused(rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
    """An HS512 token when only HS256 is allowed, and RS256 when only HS256, are refused."""
    verifier = JwtVerifier(algorithms=["HS256"], secret=SECRET, clock=clock)
    assert refusal(verifier, sign("HS512", KEY, claims())) == "algorithm not allowed"
    assert refusal(verifier, sign("RS256", rsa_key, claims())) == "algorithm not allowed"


def test_hs256_signed_with_the_rsa_public_pem_is_refused(rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
    """With HS256 and RS256 allowed, an HS256 token whose HMAC key is the RSA public PEM fails."""
    pem = public_pem(rsa_key)
    verifier = JwtVerifier(algorithms=["HS256", "RS256"], secret=SECRET, public_key_pem=pem, clock=clock)
    assert verifier.verify(sign("RS256", rsa_key, claims())).sub == "alice"  # the PEM is in use
    assert refusal(verifier, sign("HS256", pem.encode(), claims())) == "signature invalid"


def test_hs256_signed_with_a_jwks_public_key_is_refused(
    rsa_key: rsa.RSAPrivateKey, clock: Clock, tmp_path: Path
) -> None:
    """An HS256 token naming a JWKS RSA key's kid, HMAC-signed with that JWK, fails."""
    jwk = jwk_of(rsa_key, "rsa-1", alg="RS256", use="sig")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    verifier = JwtVerifier(
        algorithms=["HS256", "RS256"], secret=SECRET, jwks=JwksSource(path.as_uri()), clock=clock
    )
    assert verifier.verify(sign("RS256", rsa_key, claims(), kid="rsa-1")).sub == "alice"
    for hmac_key in (json.dumps(jwk).encode(), jwk["n"].encode(), public_pem(rsa_key).encode()):
        assert refusal(verifier, sign("HS256", hmac_key, claims(), kid="rsa-1")) == "signature invalid"


def test_hs256_signed_with_a_jwks_oct_key_is_refused(
    rsa_key: rsa.RSAPrivateKey, clock: Clock, tmp_path: Path
) -> None:
    """An `oct` key published in the JWKS is never used: HS tokens need the configured secret."""
    oct_key = {"kty": "oct", "kid": "sym", "k": b64(b"k" * 32)}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [oct_key, jwk_of(rsa_key, "rsa-1")]}))
    verifier = JwtVerifier(
        algorithms=["HS256", "RS256"], secret=SECRET, jwks=JwksSource(path.as_uri()), clock=clock
    )
    assert refusal(verifier, sign("HS256", b"k" * 32, claims(), kid="sym")) == "signature invalid"


def test_jwk_alg_must_match_the_token_alg(rsa_key: rsa.RSAPrivateKey, clock: Clock, tmp_path: Path) -> None:
    """A JWKS key declared `alg: RS256` does not verify an RS512 token with its kid."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_of(rsa_key, "k", alg="RS256")]}))
    verifier = JwtVerifier(algorithms=["RS256", "RS512"], jwks=JwksSource(path.as_uri()), clock=clock)
    assert unknown_key(verifier, sign("RS512", rsa_key, claims(), kid="k")) == "unknown key id"


def test_jwk_for_encryption_is_not_used(rsa_key: rsa.RSAPrivateKey, clock: Clock, tmp_path: Path) -> None:
    """A JWKS key with `use: enc` is skipped."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_of(rsa_key, "k", use="enc")]}))
    verifier = JwtVerifier(algorithms=["RS256"], jwks=JwksSource(path.as_uri()), clock=clock)
    assert unknown_key(verifier, sign("RS256", rsa_key, claims(), kid="k")) == "unknown key id"


def test_ec_key_of_another_curve_is_not_used(ec_key: ec.EllipticCurvePrivateKey, clock: Clock) -> None:
    """An ES384 token is not verified with a P-256 key (no key fits the algorithm)."""
    verifier = JwtVerifier(algorithms=["ES256", "ES384"], public_key_pem=public_pem(ec_key), clock=clock)
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert refusal(verifier, sign("ES384", p384, claims())) == "no key for algorithm"


def test_eddsa_token_with_an_rsa_pem_has_no_key(
    rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey, clock: Clock
) -> None:
    """With RS256+EdDSA allowed and only an RSA PEM, an EdDSA token finds no key."""
    verifier = JwtVerifier(algorithms=["RS256", "EdDSA"], public_key_pem=public_pem(rsa_key), clock=clock)
    assert refusal(verifier, sign("EdDSA", ed_key, claims())) == "no key for algorithm"


# ---------------------------------------------------------------- signatures


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key", "ed_key"])
def test_token_signed_by_another_key_is_refused(
    key_name: str, clock: Clock, request: pytest.FixtureRequest
) -> None:
    """A token signed by a different private key of the same type fails the signature check."""
    other: PrivateKey
    if key_name == "rsa_key":
        alg, other = "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key_name == "ec_key":
        alg, other = "ES256", ec.generate_private_key(ec.SECP256R1())
    else:
        alg, other = "EdDSA", ed25519.Ed25519PrivateKey.generate()
    key = request.getfixturevalue(key_name)
    verifier = JwtVerifier(algorithms=[alg], public_key_pem=public_pem(key), clock=clock)
    assert refusal(verifier, sign(alg, other, claims())) == "signature invalid"


def test_token_signed_with_another_secret_is_refused(hs: JwtVerifier) -> None:
    """An HS256 token signed with a different secret fails."""
    assert refusal(hs, sign("HS256", b"another-secret-" + b"z" * 32, claims())) == "signature invalid"


def test_tampered_payload_is_refused(hs: JwtVerifier) -> None:
    """Changing the payload of a signed token (role escalation) fails the signature check."""
    head, _, sig = sign("HS256", KEY, claims(role="viewer")).split(".")
    forged = f"{head}.{segment(claims(role='admin'))}.{sig}"
    assert refusal(hs, forged) == "signature invalid"


def test_corrupted_signature_is_refused(hs: JwtVerifier, rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
    """Flipping one character inside the signature, or dropping it, fails the check."""
    token = sign("HS256", KEY, claims())
    head, payload, sig = token.split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    assert refusal(hs, f"{head}.{payload}.{flipped}") == "signature invalid"
    assert refusal(hs, f"{head}.{payload}.") == "signature invalid"
    rs = JwtVerifier(algorithms=["RS256"], public_key_pem=public_pem(rsa_key), clock=clock)
    head, payload, sig = sign("RS256", rsa_key, claims()).split(".")
    short = b64(base64.urlsafe_b64decode(sig + "==")[:-6])
    assert refusal(rs, f"{head}.{payload}.{short}") == "signature invalid"


# ---------------------------------------------------------------- time claims


def test_expired_token_is_refused(hs: JwtVerifier) -> None:
    """A token whose exp has passed is refused."""
    assert refusal(hs, sign("HS256", KEY, claims(exp=NOW - 1))) == "token expired"


def test_exp_boundaries_without_leeway(clock: Clock) -> None:
    """With leeway 0: accepted one second before exp, refused exactly at exp."""
    verifier = JwtVerifier(algorithms=["HS256"], secret=SECRET, clock=clock)
    token = sign("HS256", KEY, claims(exp=NOW + 10))
    clock.t = NOW + 9.999
    assert verifier.verify(token).sub == "alice"
    clock.t = NOW + 10
    assert refusal(verifier, token) == "token expired"


def test_exp_boundaries_with_leeway(clock: Clock) -> None:
    """With leeway 5: accepted at exp and at exp+4.999, refused at exp+5."""
    verifier = JwtVerifier(algorithms=["HS256"], secret=SECRET, leeway_s=5, clock=clock)
    token = sign("HS256", KEY, claims(exp=NOW + 10))
    for t in (NOW + 10, NOW + 14.999):
        clock.t = t
        assert verifier.verify(token).sub == "alice"
    clock.t = NOW + 15
    assert refusal(verifier, token) == "token expired"


@pytest.mark.parametrize("exp", [None])
def test_missing_exp_is_refused(exp: Any, hs: JwtVerifier) -> None:
    """A token without exp is refused."""
    assert refusal(hs, sign("HS256", KEY, claims(exp=exp))) == "token has no exp"


@pytest.mark.parametrize("exp", ["1800000000", True, [NOW + 60], {"t": 1}])
def test_non_numeric_exp_is_refused(exp: Any, hs: JwtVerifier) -> None:
    """exp must be a number (not a string, boolean, list or object)."""
    assert refusal(hs, sign("HS256", KEY, claims(exp=exp))) == "invalid exp claim"


def test_nbf_in_the_future_is_refused(clock: Clock) -> None:
    """nbf one second ahead is refused; equal to now is accepted; leeway 1 accepts it."""
    strict = JwtVerifier(algorithms=["HS256"], secret=SECRET, clock=clock)
    lenient = JwtVerifier(algorithms=["HS256"], secret=SECRET, leeway_s=1, clock=clock)
    ahead = sign("HS256", KEY, claims(nbf=NOW + 1))
    assert refusal(strict, ahead) == "token not yet valid"
    assert strict.verify(sign("HS256", KEY, claims(nbf=NOW))).sub == "alice"
    assert lenient.verify(ahead).sub == "alice"
    assert refusal(lenient, sign("HS256", KEY, claims(nbf=NOW + 1.001))) == "token not yet valid"


def test_iat_in_the_future_is_refused(clock: Clock) -> None:
    """iat beyond now + leeway is refused; within the leeway it is accepted."""
    strict = JwtVerifier(algorithms=["HS256"], secret=SECRET, clock=clock)
    lenient = JwtVerifier(algorithms=["HS256"], secret=SECRET, leeway_s=30, clock=clock)
    token = sign("HS256", KEY, claims(iat=NOW + 30))
    assert refusal(strict, token) == "token issued in the future"
    assert lenient.verify(token).sub == "alice"
    assert refusal(lenient, sign("HS256", KEY, claims(iat=NOW + 31))) == "token issued in the future"


def test_non_numeric_nbf_and_iat_are_refused(hs: JwtVerifier) -> None:
    """nbf and iat, when present, must be numbers."""
    assert refusal(hs, sign("HS256", KEY, claims(nbf="0"))) == "invalid nbf claim"
    assert refusal(hs, sign("HS256", KEY, claims(iat=False))) == "invalid iat claim"


# ---------------------------------------------------------------- audience and issuer


@pytest.mark.parametrize("aud", ["other", ["other", "more"], None, [], 7])
def test_audience_mismatch_or_missing_is_refused(aud: Any, clock: Clock) -> None:
    """With an audience configured, a different, absent or malformed aud is refused."""
    verifier = JwtVerifier(algorithms=["HS256"], secret=SECRET, audience="fleetwire", clock=clock)
    assert refusal(verifier, sign("HS256", KEY, claims(aud=aud))) == "audience mismatch"


@pytest.mark.parametrize("iss", ["https://evil", None, "https://idp/"])
def test_issuer_mismatch_or_missing_is_refused(iss: Any, clock: Clock) -> None:
    """With an issuer configured, a different or absent iss is refused."""
    verifier = JwtVerifier(algorithms=["HS256"], secret=SECRET, issuer="https://idp", clock=clock)
    assert refusal(verifier, sign("HS256", KEY, claims(iss=iss))) == "issuer mismatch"


# ---------------------------------------------------------------- sub, role, devices


@pytest.mark.parametrize("role", ["root", "Admin", "", 1, None, ["admin"]])
def test_wrong_role_is_refused(role: Any, hs: JwtVerifier) -> None:
    """role must be exactly one of device, viewer, operator, admin."""
    assert refusal(hs, sign("HS256", KEY, claims(role=role))) == "invalid role claim"


@pytest.mark.parametrize("sub", [None, "", 42, ["alice"]])
def test_missing_or_bad_sub_is_refused(sub: Any, hs: JwtVerifier) -> None:
    """sub must be a non-empty string."""
    assert refusal(hs, sign("HS256", KEY, claims(sub=sub))) == "invalid sub claim"


@pytest.mark.parametrize("devices", ["site-a.*", [1], ["ok", None], {"a": 1}])
def test_devices_claim_not_a_list_of_strings_is_refused(devices: Any, hs: JwtVerifier) -> None:
    """On a client token, `devices` must be a list of strings."""
    assert refusal(hs, sign("HS256", KEY, claims(role="viewer", devices=devices))) == "invalid devices claim"


def test_devices_null_is_refused(hs: JwtVerifier) -> None:
    """`devices: null` is present but not a list: refused."""
    signing_input = f"{segment({'alg': 'HS256'})}.{segment({**claims(), 'devices': None})}"
    sig = hmac.new(KEY, signing_input.encode(), hashlib.sha256).digest()
    assert refusal(hs, f"{signing_input}.{b64(sig)}") == "invalid devices claim"


@pytest.mark.parametrize("payload", [[], "text", 5, None])
def test_payload_that_is_not_an_object_is_refused(payload: Any, hs: JwtVerifier) -> None:
    """A correctly signed payload that is not a JSON object is refused."""
    assert refusal(hs, sign("HS256", KEY, payload)) == "malformed token"


# ---------------------------------------------------------------- headers and kid


@pytest.mark.parametrize("name", ["jku", "x5u"])
def test_key_url_headers_are_refused_and_never_fetched(
    name: str, rsa_key: rsa.RSAPrivateKey, attacker_server: JwksServer, clock: Clock
) -> None:
    """A jku/x5u header pointing at a server is refused, and that server sees no request."""
    attacker_server.document = {"keys": [jwk_of(rsa_key, "evil")]}
    verifier = JwtVerifier(algorithms=["RS256"], public_key_pem=public_pem(rsa_key), clock=clock)
    token = sign("RS256", rsa_key, claims(), kid="evil", **{name: attacker_server.url_for("/keys")})
    assert refusal(verifier, token) == "token header not allowed"
    assert attacker_server.requests == []


@pytest.mark.anyio
async def test_jku_is_not_fetched_even_on_refresh(
    rsa_key: rsa.RSAPrivateKey,
    rsa_key2: rsa.RSAPrivateKey,
    jwks_server: JwksServer,
    attacker_server: JwksServer,
    clock: Clock,
) -> None:
    """With a JWKS URL configured, a token's jku is refused; refreshing asks only the configured server."""
    jwks_server.document = {"keys": [jwk_of(rsa_key, "good")]}
    attacker_server.document = {"keys": [jwk_of(rsa_key2, "evil")]}
    verifier = JwtVerifier(algorithms=["RS256"], jwks=JwksSource(jwks_server.url), clock=clock)
    token = sign("RS256", rsa_key2, claims(), kid="evil", jku=attacker_server.url)
    assert refusal(verifier, token) == "token header not allowed"
    clock.t += 10
    assert await verifier.refresh_keys() is True
    assert refusal(verifier, token) == "token header not allowed"
    assert attacker_server.requests == []
    assert jwks_server.requests == ["/.well-known/jwks.json", "/.well-known/jwks.json"]


def test_embedded_jwk_header_is_refused(
    rsa_key2: rsa.RSAPrivateKey, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    """A token carrying its own key in a `jwk` header (signed by that key) is refused."""
    verifier = JwtVerifier(algorithms=["RS256"], public_key_pem=public_pem(rsa_key), clock=clock)
    token = sign("RS256", rsa_key2, claims(), jwk=jwk_of(rsa_key2))
    assert refusal(verifier, token) == "token header not allowed"


def test_x5c_and_crit_headers_are_refused(rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
    """x5c (a sender-chosen certificate chain), crit and b64 are refused even with a valid signature."""
    verifier = JwtVerifier(algorithms=["RS256"], public_key_pem=public_pem(rsa_key), clock=clock)
    for extra in ({"x5c": ["MIIB"]}, {"crit": ["exp"]}, {"b64": True}):
        assert refusal(verifier, sign("RS256", rsa_key, claims(), **extra)) == "token header not allowed"


@pytest.mark.parametrize("kid", ["../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "..%2f..%2fetc"])
def test_path_like_kid_is_only_looked_up_in_the_jwks(
    kid: str, rsa_key: rsa.RSAPrivateKey, clock: Clock, tmp_path: Path
) -> None:
    """A path-like kid is an unknown key id (UnknownKeyError), never a file to read."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_of(rsa_key, "k1")]}))
    verifier = JwtVerifier(algorithms=["RS256"], jwks=JwksSource(path.as_uri()), clock=clock)
    assert unknown_key(verifier, sign("RS256", rsa_key, claims(), kid=kid)) == "unknown key id"


def test_path_like_kid_signed_by_hmac_of_a_file_is_refused(clock: Clock) -> None:
    """An HS256 token with kid=/dev/null signed with an empty-file key fails: kid never selects a key."""
    verifier = JwtVerifier(algorithms=["HS256"], secret=SECRET, clock=clock)
    token = sign("HS256", b"", claims(), kid="/dev/null")
    assert refusal(verifier, token) == "signature invalid"


def test_non_string_kid_is_refused(rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
    """A kid that is not a string is a malformed token."""
    verifier = JwtVerifier(algorithms=["RS256"], public_key_pem=public_pem(rsa_key), clock=clock)
    assert refusal(verifier, sign("RS256", rsa_key, claims(), kid=7)) == "malformed token"


# ---------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "token missing"),
        (None, "token missing"),
        (b"a.b.c", "token missing"),
        ("abc", "malformed token"),
        ("a.b", "malformed token"),
        ("a.b.c.d", "malformed token"),
        ("....", "malformed token"),
        ("..", "malformed token"),
        ("é.é.é", "malformed token"),
        ("a b.c.d", "malformed token"),
        ("Bearer x.y.z", "malformed token"),
        (f"{segment({'alg': 'HS256'})}=.{segment(claims())}.abc", "malformed token"),
        (f"{b64(b'not json')}.{segment(claims())}.abc", "malformed token"),
        (f"{segment(['HS256'])}.{segment(claims())}.abc", "malformed token"),
        (f"{segment({'alg': 'HS256'})}.{segment(claims())}.a", "malformed token"),
        (f"{segment({'alg': 'HS256'})}.{segment(claims())}.AB", "malformed token"),
        ("x" * 20_000, "token too large"),
    ],
)
def test_garbage_is_refused(token: Any, message: str, hs: JwtVerifier) -> None:
    """Strings that are not compact JWS tokens are refused with a fixed message."""
    assert refusal(hs, token) == message


def test_refusal_messages_never_contain_the_token(hs: JwtVerifier) -> None:
    """Neither the token nor its claims appear in the error message."""
    token = sign("HS256", b"wrong-secret-" + b"w" * 32, claims(sub="secret-subject"))
    with pytest.raises(AuthError) as info:
        hs.verify(token)
    assert str(info.value) == "signature invalid"
    assert "secret-subject" not in repr(info.value)
    assert token.split(".")[2] not in repr(info.value)


# ---------------------------------------------------------------- one spelling per token

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _respellings(text: str) -> list[str]:
    """Every other spelling of a base64url segment that decodes to the same bytes (its last
    character differing only in the unused trailing bits)."""
    unused = {2: 4, 3: 2}.get(len(text) % 4, 0)
    index = _ALPHABET.index(text[-1])
    return [
        text[:-1] + _ALPHABET[(index & ~((1 << unused) - 1)) | bits]
        for bits in range(1, 1 << unused)
    ]


def _token_with_leftover_bits() -> str:
    """A valid HS256 token each of whose three segments ends with unused bits (len % 4 of 2
    or 3; the 32-byte signature always does)."""
    for header_pad in range(3):
        for payload_pad in range(3):
            token = sign("HS256", KEY, {**claims(), "pad": "x" * payload_pad}, kid="k" * header_pad)
            if all(len(p) % 4 in (2, 3) for p in token.split(".")):
                return token
    raise AssertionError("no padding gives every segment leftover bits")


@pytest.mark.parametrize("part", [0, 1, 2])
def test_a_non_canonical_spelling_of_any_part_is_malformed(part: int, hs: JwtVerifier) -> None:
    """Each segment has one spelling: the same bytes with non-zero trailing bits are refused,
    `malformed token` for the header and the signature (which the HS* path compares as
    text); a payload's other spelling is text the signature does not cover."""
    token = _token_with_leftover_bits()
    hs.verify(token)  # the canonical spelling is accepted
    parts = token.split(".")
    others = _respellings(parts[part])
    assert len(others) in (3, 15)
    for other in others:
        assert base64.urlsafe_b64decode(other + "==") == base64.urlsafe_b64decode(parts[part] + "==")
        spelled = ".".join(other if i == part else p for i, p in enumerate(parts))
        assert refusal(hs, spelled) == ("signature invalid" if part == 1 else "malformed token")
