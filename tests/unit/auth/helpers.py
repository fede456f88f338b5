"""Test helpers: an independent JWT signer (hmac + cryptography, not the code under test),
JWK conversion, a settable clock and a tiny real HTTP server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fleetwire.auth.jwt import JwtVerifier
from fleetwire.auth.principal import AuthError, UnknownKeyError

NOW = 1_700_000_000
SECRET = "s3cret-" + "x" * 40

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class Clock:
    """A settable clock for the verifier (seconds since the epoch)."""

    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid admin claims at NOW; an override of None removes the claim."""
    base: dict[str, Any] = {"sub": "alice", "role": "admin", "iat": NOW, "exp": NOW + 60}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


def raw_signature(alg: str, key: bytes | PrivateKey, signing_input: bytes) -> bytes:
    if alg.startswith("HS"):
        assert isinstance(key, bytes)
        return hmac.new(key, signing_input, getattr(hashlib, "sha" + alg[2:])).digest()
    if alg.startswith("RS"):
        assert isinstance(key, rsa.RSAPrivateKey)
        return key.sign(signing_input, padding.PKCS1v15(), _HASHES[alg[2:]]())
    if alg.startswith("ES"):
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(_HASHES[alg[2:]]())))
        size = (key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if alg == "EdDSA":
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return key.sign(signing_input)
    raise AssertionError(alg)


def sign(alg: str, key: bytes | PrivateKey, payload: Any, **header: Any) -> str:
    """A compact JWS over ``payload`` (any JSON value) with header ``{"alg", "typ", **header}``."""
    head = {"alg": alg, "typ": "JWT", **header}
    signing_input = f"{segment(head)}.{segment(payload)}"
    return f"{signing_input}.{b64(raw_signature(alg, key, signing_input.encode()))}"


def public_pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _int_b64(value: int, size: int | None = None) -> str:
    size = size or (value.bit_length() + 7) // 8
    return b64(value.to_bytes(size, "big"))


def jwk_of(key: PrivateKey, kid: str | None = None, **extra: Any) -> dict[str, Any]:
    """The public JWK (RFC 7517/8037) of ``key``, built with cryptography only."""
    pub = key.public_key()
    jwk: dict[str, Any]
    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        jwk = {"kty": "RSA", "n": _int_b64(nums.n), "e": _int_b64(nums.e)}
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        nums_ec = pub.public_numbers()
        size = (pub.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[pub.curve.name]
        jwk = {"kty": "EC", "crv": crv, "x": _int_b64(nums_ec.x, size), "y": _int_b64(nums_ec.y, size)}
    else:
        assert isinstance(pub, ed25519.Ed25519PublicKey)
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def refusal(verifier: JwtVerifier, token: Any) -> str:
    """The message of the plain AuthError (not UnknownKeyError) that ``verify`` raises."""
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert type(info.value) is AuthError
    message = str(info.value)
    if isinstance(token, str) and token:
        assert token not in message
    return message


def unknown_key(verifier: JwtVerifier, token: str) -> str:
    """The message of the UnknownKeyError that ``verify`` raises."""
    with pytest.raises(UnknownKeyError) as info:
        verifier.verify(token)
    return str(info.value)


@dataclass
class JwksServer:
    """A real HTTP server on 127.0.0.1 serving ``document`` at every path."""

    document: Any = field(default_factory=lambda: {"keys": []})
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    def url_for(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextmanager
def serve_jwks() -> Iterator[JwksServer]:
    state = JwksServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            body = json.dumps(state.document).encode()
            self.send_response(state.status)
            for name, value in state.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
