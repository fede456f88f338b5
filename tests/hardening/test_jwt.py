"""JWT attacks at the real handshake (header and `access_token` query) and at REST (issue 7,
contract §1, RFC 8725). The verifier's unit tests (tests/unit/auth) cover each rule in
isolation; these check that the running server applies them on every entry point."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.clock import ManualClock
from tests.hardening.helpers import SECRET, handshake, rest_status
from tests.integration.harness import Node
from tests.unit.auth.helpers import jwk_of, public_pem, segment, serve_jwks, sign

pytestmark = pytest.mark.anyio

HS_SECRET = SECRET.encode()


def claims(role: str = "admin", sub: str = "alice", **overrides: Any) -> dict[str, Any]:
    """Valid claims now; an override of None removes the claim."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": sub, "role": role, "iat": now, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


async def outcome(node: Node, token: str) -> tuple[int, int, int]:
    """(handshake with the header, handshake with `access_token`, REST GET /devices)."""
    url = f"{node.ws_url}/ws/client"
    return (
        await handshake(url, token),
        await handshake(url, token, query=True),
        await rest_status(node.http_url, token),
    )


def header_of(token: str) -> dict[str, Any]:
    head = token.split(".")[0]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    return decoded


REFUSED = (401, 401, 401)
ACCEPTED = (101, 101, 200)


def both_families(
    make_node: Callable[..., Node], key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, tmp_path: Path
) -> Node:
    """A node that accepts HS256 (shared secret) and RS256 or ES256 (a PEM key and a JWKS file)."""
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk_of(key, kid="k1", alg=alg, use="sig")]}))
    return make_node(
        jwt_algorithms=f"HS256,{alg}", jwt_public_key=public_pem(key), jwt_jwks_url=jwks.as_uri()
    )


async def test_alg_none_is_refused_everywhere(node: Node) -> None:
    """`alg: none` (any case, with or without a signature) is 401 at both handshake forms and
    at REST (with `WWW-Authenticate: Bearer`); the same claims signed HS256 are accepted."""
    body = claims()
    for alg in ("none", "None", "NONE", "nOnE"):
        unsigned = f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(body)}."
        assert await outcome(node, unsigned) == REFUSED, alg
    signed_none = sign("HS256", HS_SECRET, body).rsplit(".", 1)[1]
    forged = f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(body)}.{signed_none}"
    assert await outcome(node, forged) == REFUSED
    assert await outcome(node, sign("HS256", HS_SECRET, body)) == ACCEPTED


@pytest.mark.parametrize("family", ["RS256", "ES256"])
async def test_hs256_signed_with_the_public_key_is_refused(
    make_node: Callable[..., Node], rsa_key: rsa.RSAPrivateKey, family: str, tmp_path: Path
) -> None:
    """With HS256 and RS256 (or ES256) both allowed, the public key configured as PEM and in a
    JWKS, an HS256 token whose HMAC key is that public key — as PEM text (with and without the
    final newline), DER, or the JWK's JSON — is 401 everywhere, with or without a `kid` naming
    the JWK. Genuine asymmetric and HS256 tokens are accepted on the same node."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa_key if family == "RS256" else ec.generate_private_key(ec.SECP256R1())
    )
    node = both_families(make_node, key, tmp_path)
    pem = public_pem(key)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk = jwk_of(key, kid="k1", alg=family, use="sig")
    keys = [
        pem.encode(),
        pem.strip().encode(),
        der,
        json.dumps(jwk).encode(),
        json.dumps(jwk, separators=(",", ":")).encode(),
    ]
    for hmac_key in keys:
        for header in ({}, {"kid": "k1"}):
            token = sign("HS256", hmac_key, claims(), **header)
            assert await outcome(node, token) == REFUSED, (hmac_key[:20], header)
    assert await outcome(node, sign(family, key, claims(), kid="k1")) == ACCEPTED
    assert await outcome(node, sign(family, key, claims())) == ACCEPTED
    assert await outcome(node, sign("HS256", HS_SECRET, claims())) == ACCEPTED


async def test_kid_with_path_traversal_never_selects_a_file(
    make_node: Callable[..., Node],
    rsa_key: rsa.RSAPrivateKey,
    attacker_key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    """A `kid` is a plain JWKS look-up, never a path: HS256 tokens signed with the content of
    the file their `kid` points to (/dev/null's empty content, an attacker-written file) and
    RS256 tokens signed by an attacker whose public PEM sits at the `kid` path are 401
    everywhere; so is the genuine key under a traversal `kid`."""
    node = both_families(make_node, rsa_key, tmp_path)
    planted = tmp_path / "planted.key"
    planted.write_bytes(b"attacker-chosen-hmac-key-of-32-bytes!!")
    planted_pem = tmp_path / "planted.pem"
    planted_pem.write_text(public_pem(attacker_key))
    data_dir = node.settings.data_dir
    relative = "../" * 12
    cases = [
        sign("HS256", b"", claims(), kid=f"{relative}dev/null"),
        sign("HS256", b"", claims(), kid="/dev/null"),
        sign("HS256", planted.read_bytes(), claims(), kid=str(planted)),
        sign("HS256", planted.read_bytes(), claims(), kid=f"{relative}{str(planted).lstrip('/')}"),
        sign("HS256", planted.read_bytes(), claims(), kid=f"file://{planted}"),
        sign("RS256", attacker_key, claims(), kid=str(planted_pem)),
        sign("RS256", attacker_key, claims(), kid=f"{relative}{str(planted_pem).lstrip('/')}"),
        sign("RS256", attacker_key, claims(), kid="k1"),
        sign("RS256", rsa_key, claims(), kid="../k1"),
        sign("RS256", rsa_key, claims(), kid=f"{data_dir}/../k1"),
        sign("RS256", rsa_key, claims(), kid="k1' OR '1'='1"),
    ]
    for token in cases:
        assert await outcome(node, token) == REFUSED, header_of(token)
    assert await outcome(node, sign("RS256", rsa_key, claims(), kid="k1")) == ACCEPTED


async def test_jku_and_x5u_are_refused_and_never_fetched(
    make_node: Callable[..., Node], rsa_key: rsa.RSAPrivateKey, attacker_key: rsa.RSAPrivateKey
) -> None:
    """Tokens carrying `jku` or `x5u` (pointing at a real local HTTP server that would serve
    the attacker's key) are 401 at both handshake forms and REST — even when their signature
    is genuine — on a node whose own keys come from a JWKS over HTTP; the attacker's server
    receives no request at all, while the node's JWKS server is the only one ever asked."""
    with serve_jwks() as legit, serve_jwks() as attacker:
        legit.document = {"keys": [jwk_of(rsa_key, kid="k1", alg="RS256")]}
        attacker.document = {"keys": [jwk_of(attacker_key, kid="evil", alg="RS256")]}
        node = make_node(jwt_algorithms="HS256,RS256", jwt_jwks_url=legit.url)
        cases = [
            sign("RS256", attacker_key, claims(), jku=attacker.url, kid="evil"),
            sign("RS256", attacker_key, claims(), jku=attacker.url),
            sign("RS256", attacker_key, claims(), x5u=attacker.url_for("/cert.pem")),
            sign("RS256", attacker_key, claims(), x5u=attacker.url_for("/cert.pem"), kid="evil"),
            sign("RS256", rsa_key, claims(), jku=attacker.url, kid="k1"),
            sign("RS256", rsa_key, claims(), x5u=attacker.url_for("/cert.pem"), kid="k1"),
            sign("HS256", HS_SECRET, claims(), jku=attacker.url),
            sign("HS256", HS_SECRET, claims(), x5u=attacker.url_for("/cert.pem")),
        ]
        for token in cases:
            assert await outcome(node, token) == REFUSED
        # Verification is synchronous with the answer: a fetch would have happened by now.
        assert attacker.requests == []
        assert await outcome(node, sign("RS256", rsa_key, claims(), kid="k1")) == ACCEPTED
        assert attacker.requests == []
        assert all(path == "/.well-known/jwks.json" for path in legit.requests)


async def test_missing_or_malformed_exp_is_refused(node: Node) -> None:
    """A token without `exp` (or with a null, string or boolean one) is 401 everywhere; the
    same claims with a numeric `exp` are accepted."""
    for exp in (None, "9999999999", True):
        body = claims()
        if exp is None:
            del body["exp"]
        else:
            body["exp"] = exp
        assert await outcome(node, sign("HS256", HS_SECRET, body)) == REFUSED, exp
    assert await outcome(node, sign("HS256", HS_SECRET, claims())) == ACCEPTED


async def test_leeway_edges_at_the_handshake_and_rest(make_node: Callable[..., Node]) -> None:
    """With FLEETWIRE_JWT_LEEWAY_S=10: `exp` 2 s ago, `nbf` and `iat` 2 s ahead are accepted;
    `exp` 30 s ago, `nbf` or `iat` 30 s ahead are 401. A WebSocket session opened with a token
    already 8 s past `exp` works, and is closed 4001 `token_expired` at `exp` + leeway, not
    before. Without leeway, `exp` 1 s ago is 401."""
    now = int(time.time())
    clock = ManualClock(now * 1000)  # the verifier and the sessions read this clock
    lenient = make_node(jwt_leeway_s=10, clock=clock)
    assert await rest_status(lenient.http_url, sign("HS256", HS_SECRET, claims(exp=now - 2))) == 200
    for body in (claims(nbf=now + 2), claims(iat=now + 2)):
        assert await outcome(lenient, sign("HS256", HS_SECRET, body)) == ACCEPTED
    for body in (claims(exp=now - 30), claims(nbf=now + 30), claims(iat=now + 30)):
        assert await outcome(lenient, sign("HS256", HS_SECRET, body)) == REFUSED, body
    await lenient.register("d1")
    exp = now - 8
    session = await lenient.device(
        "d1", token=sign("HS256", HS_SECRET, claims(role="device", sub="d1", exp=exp))
    )
    assert (await session.request({"type": "status", "status": "in-leeway"}))["type"] == "ack"
    lenient.advance(1.999)  # 1 ms before exp + leeway: still open
    assert (await session.request({"type": "status", "status": "still"}))["type"] == "ack"
    lenient.advance(0.001)
    assert await session.closed() == (4001, "token_expired")

    strict = make_node()
    assert await outcome(strict, sign("HS256", HS_SECRET, claims(exp=int(time.time()) - 1))) == REFUSED
    assert await outcome(strict, sign("HS256", HS_SECRET, claims(exp=int(time.time()) + 30))) == ACCEPTED


async def test_audience_and_issuer_mismatch_is_refused(make_node: Callable[..., Node]) -> None:
    """With an audience and an issuer configured, a token lacking either, or naming another
    (including a look-alike issuer with a trailing slash), is 401 everywhere; the right pair
    is accepted, `aud` as a string or as a list containing the audience."""
    node = make_node(jwt_audience="fleet-api", jwt_issuer="https://idp.example")
    good = {"aud": "fleet-api", "iss": "https://idp.example"}
    bad = [
        {},
        {"aud": "fleet-api"},
        {"iss": "https://idp.example"},
        {**good, "aud": "fleet-api-2"},
        {**good, "aud": ["other", "fleet"]},
        {**good, "aud": ""},
        {**good, "iss": "https://idp.example/"},
        {**good, "iss": "https://evil.example"},
    ]
    for extra in bad:
        assert await outcome(node, sign("HS256", HS_SECRET, claims(**extra))) == REFUSED, extra
    assert await outcome(node, sign("HS256", HS_SECRET, claims(**good))) == ACCEPTED
    listed = {**good, "aud": ["other", "fleet-api"]}
    assert await outcome(node, sign("HS256", HS_SECRET, claims(**listed))) == ACCEPTED


async def test_expired_token_reused_after_its_4001_is_refused(make_node: Callable[..., Node]) -> None:
    """A device and a client whose 2-second tokens expire are closed 4001 `token_expired`;
    the same tokens are then refused: 401 at a new handshake (header and query) and at REST."""
    node = make_node(token_warning_s=0.5, clock=ManualClock())
    await node.register("d1")
    device_token = node.token("d1", "device", ttl_s=2)
    client_token = node.token("app", "admin", ttl_s=2)
    device = await node.device("d1", token=device_token)
    client = await node.client(token=client_token)
    node.advance(3.0)  # past both `exp`s, on the clock the verifier reads too
    closed = await asyncio.gather(device.closed(), client.closed())
    assert closed == [(4001, "token_expired"), (4001, "token_expired")]
    assert await handshake(f"{node.ws_url}/ws/device", device_token) == 401
    assert await handshake(f"{node.ws_url}/ws/device", device_token, query=True) == 401
    assert await rest_status(node.http_url, device_token, "/api/v1/devices/d1/telemetry") == 401
    assert await outcome(node, client_token) == REFUSED
