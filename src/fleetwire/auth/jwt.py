"""JWT verification and signing (contract §1). The only fleetwire module that imports PyJWT.

PyJWT supplies the signature algorithms (``Algorithm.verify`` / ``sign``) and the JWK
parsers; the compact-form parsing, the key choice and the claim checks are done here so
that every rule is explicit and the clock can be injected.

Decisions where the contract is silent:

- Supported algorithms: HS256/384/512, RS256/384/512, PS256/384/512, ES256/384/512, EdDSA.
  ``none`` (in any case) or an unknown name in the allow-list is refused at construction.
- The key is chosen by the family of the header's ``alg``: HS* tokens are checked only
  against the shared secret (a ``kid`` is then ignored); asymmetric tokens only against the
  PEM public key or JWKS keys whose type, curve and ``alg`` fit. ``oct`` keys in a JWKS are
  never used. RSA keys under 2048 bits are refused.
- A token whose header carries ``jku``, ``x5u``, ``x5c``, ``jwk`` (keys or key locations
  chosen by the sender), ``crit`` (we understand no extension) or ``b64`` is **refused**
  ("token header not allowed"); nothing named there is ever fetched or used.
- With a JWKS configured, a token carrying a ``kid`` is checked only against the JWKS keys
  with that ``kid`` (a plain dictionary look-up; a ``kid`` is never a path). Without a JWKS,
  the ``kid`` is ignored and the PEM key is used. A token without ``kid`` is tried against
  the PEM key and every fitting JWKS key.
- ``aud`` / ``iss`` are ignored unless an audience / issuer is configured; then a missing
  claim is a mismatch. ``aud`` may be a string or a list containing the audience.
- Leeway: refused when ``now >= exp + leeway``, ``nbf > now + leeway`` or
  ``iat > now + leeway``. Time claims must be finite numbers (not booleans).
- ``sub`` must be a non-empty string; ``role`` one of the four roles; ``devices`` (ignored
  for role ``device``) a list of strings, ``[]`` meaning no device at all.
- Tokens longer than 16 KiB and non-canonical base64url (padding, stray bits) are refused.
- JWKS cache: the key set is reloaded when it is older than ``jwks_cache_s``; ``verify``
  signals that by raising UnknownKeyError("key set expired") so that the caller awaits
  ``refresh_keys()``. Attempts (successful or not) happen at most once per
  ``min_refresh_interval_s`` (10 s); between attempts the cached keys keep serving, so an
  unreachable JWKS server does not lock everyone out. Concurrent callers share one fetch.
- A ``file://`` JWKS that cannot be read at construction is a configuration error
  (ValueError); an ``http(s)://`` one is logged and retried on the first refresh.
  HTTP fetches do not follow redirects, must answer 200 within the timeout, at most 1 MiB.
"""

from __future__ import annotations

import asyncio
import binascii
import hmac
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread
import httpx
import orjson
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import Algorithm, ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms
from jwt.exceptions import PyJWTError

from fleetwire.auth.principal import AuthError, Principal, Role, UnknownKeyError
from fleetwire.auth.secret import signing_secret

if TYPE_CHECKING:
    from fleetwire.settings import Settings

log = logging.getLogger(__name__)

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
_PUBLIC_TYPES = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
_PRIVATE_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
EC_ALGORITHMS = frozenset(_EC_CURVES)
OKP_ALGORITHMS = frozenset({"EdDSA"})
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | EC_ALGORITHMS | OKP_ALGORITHMS
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS

_ALGORITHMS: dict[str, Algorithm] = {
    name: algo for name, algo in get_default_algorithms().items() if name in SUPPORTED_ALGORITHMS
}
assert set(_ALGORITHMS) == SUPPORTED_ALGORITHMS, "PyJWT lacks cryptography support"

# Header parameters that let the sender choose the key or demand unknown processing.
REFUSED_HEADERS = ("jku", "x5u", "x5c", "jwk", "crit", "b64")
MAX_TOKEN_CHARS = 16_384
MIN_RSA_BITS = 2048
MIN_REFRESH_INTERVAL_S = 10.0
MAX_JWKS_BYTES = 1 << 20
MAX_JWKS_KEYS = 100
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# What a canonical base64url segment may end with (RFC 4648 §3.5: the bits left over after the
# last whole byte are zero), by its length mod 4: 2 chars carry 1 byte, 3 carry 2.
_CANONICAL_LAST = {0: None, 2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}
# HS* by one-shot hmac.digest (OpenSSL, no PyJWT call): a handshake verifies a token.
_HMAC_DIGESTS = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
_ROLE_OF = {r.value: r for r in Role}
# base64url to the standard alphabet, for binascii (base64.urlsafe_b64decode is 3 Python calls).
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_JWKS_HEADERS = {"Accept": "application/jwk-set+json, application/json"}


# --------------------------------------------------------------------------- helpers


def _b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")


def _canonical(segment: str) -> bool:
    """Whether `segment` is base64url as an encoder writes it: the alphabet, no padding, zero
    trailing bits, so that one value has one spelling (checked by rule, not by re-encoding)."""
    if not _B64URL.fullmatch(segment):
        return False
    rest = len(segment) % 4
    if rest == 1:
        return False
    last = _CANONICAL_LAST[rest]
    return last is None or segment[-1] in last


def _b64decode(segment: str) -> bytes:
    if not _canonical(segment):
        raise AuthError("malformed token")
    return binascii.a2b_base64(segment.encode("ascii").translate(_TO_STANDARD) + b"=" * (-len(segment) % 4))


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise AuthError("malformed token") from None
    if not isinstance(value, dict):
        raise AuthError("malformed token")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fits(alg: str, key: PublicKey) -> bool:
    """Whether ``key`` is the kind of key algorithm ``alg`` verifies with (never for HS*)."""
    if alg in RSA_ALGORITHMS:
        return isinstance(key, rsa.RSAPublicKey)
    curve = _EC_CURVES.get(alg)
    if curve is not None:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, curve)
    if alg in OKP_ALGORITHMS:
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def _check_public_key(key: object) -> PublicKey:
    if isinstance(key, _PRIVATE_TYPES):
        key = key.public_key()
    if not isinstance(key, _PUBLIC_TYPES):
        raise ValueError("unsupported public key type (expected RSA, EC or Ed25519/Ed448)")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits")
    if not any(_fits(alg, key) for alg in ASYMMETRIC_ALGORITHMS):
        raise ValueError("unsupported elliptic curve (expected P-256, P-384 or P-521)")
    return key


def load_public_key(pem: str) -> PublicKey:
    """Parse a PEM public key or X.509 certificate (literal ``\\n`` sequences are accepted)."""
    data = pem.strip().replace("\\n", "\n").encode("utf-8")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError("the JWT public key is not a PEM public key or certificate") from exc
    return _check_public_key(key)


def read_public_key_setting(value: str) -> str:
    """``FLEETWIRE_JWT_PUBLIC_KEY``: PEM text, or the path of a PEM file."""
    text = value.strip()
    if text.startswith("-----BEGIN"):
        return text
    return Path(text).expanduser().read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class _Jwk:
    kid: str | None
    alg: str | None
    key: PublicKey

    def fits(self, alg: str) -> bool:
        return (self.alg is None or self.alg == alg) and _fits(alg, self.key)


@dataclass(frozen=True, slots=True)
class _KeySet:
    keys: tuple[_Jwk, ...] = ()

    def with_kid(self, kid: str) -> list[_Jwk]:
        return [k for k in self.keys if k.kid == kid]


def _parse_jwk(raw: object) -> _Jwk | None:
    if not isinstance(raw, dict):
        return None
    kty, kid, alg = raw.get("kty"), raw.get("kid"), raw.get("alg")
    use, ops = raw.get("use"), raw.get("key_ops")
    if kid is not None and not isinstance(kid, str):
        return None
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        return None
    if use is not None and use != "sig":
        return None
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    try:
        if kty == "RSA":
            key: object = RSAAlgorithm.from_jwk(raw)
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(raw)
        elif kty == "OKP":
            key = OKPAlgorithm.from_jwk(raw)
        else:
            return None  # "oct" and unknown types are never used
        public = _check_public_key(key)
    except (PyJWTError, ValueError, TypeError, KeyError):
        return None
    if alg is not None and not _fits(alg, public):
        return None
    return _Jwk(kid=kid, alg=alg, key=public)


def parse_jwks(document: object) -> _KeySet:
    """The usable verification keys of a JWKS document; unusable entries are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    entries = [_parse_jwk(raw) for raw in document["keys"][:MAX_JWKS_KEYS]]
    return _KeySet(tuple(e for e in entries if e is not None))


# --------------------------------------------------------------------------- JWKS sources


class JwksProvider(Protocol):
    """Where a JWKS document comes from."""

    @property
    def url(self) -> str: ...

    @property
    def local(self) -> bool:
        """True for a local file: failing to read it at start-up is a configuration error."""
        ...

    def load(self) -> object:
        """Read the document synchronously (start-up only)."""
        ...

    async def fetch(self) -> object:
        """Read the document without blocking the event loop."""
        ...


class JwksSource:
    """A JWKS document at a ``file:///path``, ``https://…`` or ``http://…`` URL."""

    def __init__(self, url: str, *, timeout_s: float = 5.0, max_bytes: int = MAX_JWKS_BYTES) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        self._path: Path | None = None
        if scheme == "file":
            path = unquote(parts.path)
            if parts.netloc not in ("", "localhost") or not path.startswith("/"):
                raise ValueError("a file:// JWKS URL must name an absolute local path (file:///…)")
            self._path = Path(path)
        elif scheme in ("http", "https"):
            if not parts.hostname:
                raise ValueError("the JWKS URL has no host")
        else:
            raise ValueError("the JWKS URL must be https://…, http://… or file:///…")
        self._url = url
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes

    @property
    def url(self) -> str:
        return self._url

    @property
    def local(self) -> bool:
        return self._path is not None

    def _read_file(self) -> object:
        assert self._path is not None
        with self._path.open("rb") as fh:
            data = fh.read(self._max_bytes + 1)
        return self._decode(data)

    def _decode(self, data: bytes | bytearray) -> object:
        if len(data) > self._max_bytes:
            raise ValueError("JWKS document too large")
        return orjson.loads(data)

    def load(self) -> object:
        if self._path is not None:
            return self._read_file()
        body = bytearray()
        with (
            httpx.Client(timeout=self._timeout_s, follow_redirects=False) as client,
            client.stream("GET", self._url, headers=_JWKS_HEADERS) as response,
        ):
            if response.status_code != 200:
                raise ValueError(f"JWKS server answered HTTP {response.status_code}")
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > self._max_bytes:
                    break
        return self._decode(body)

    async def fetch(self) -> object:
        if self._path is not None:
            return await anyio.to_thread.run_sync(self._read_file)
        body = bytearray()
        with anyio.fail_after(self._timeout_s):
            async with (
                httpx.AsyncClient(timeout=self._timeout_s, follow_redirects=False) as client,
                client.stream("GET", self._url, headers=_JWKS_HEADERS) as response,
            ):
                if response.status_code != 200:
                    raise ValueError(f"JWKS server answered HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self._max_bytes:
                        break
        return self._decode(body)


# --------------------------------------------------------------------------- verifier


class JwtVerifier:
    """The TokenVerifier for fleetwire's JWTs (see the module docstring for the rules)."""

    def __init__(
        self,
        *,
        algorithms: Sequence[str],
        secret: str | None = None,
        public_key_pem: str | None = None,
        jwks: JwksProvider | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 0.0,
        jwks_cache_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        min_refresh_interval_s: float = MIN_REFRESH_INTERVAL_S,
    ) -> None:
        if isinstance(algorithms, str):
            raise TypeError("algorithms must be a list of names, not a string")
        allowed = list(dict.fromkeys(algorithms))
        if not allowed:
            raise ValueError("the JWT algorithm allow-list is empty")
        for name in allowed:
            if name.lower() == "none":
                raise ValueError("the 'none' JWT algorithm is never accepted")
            if name not in SUPPORTED_ALGORITHMS:
                raise ValueError(f"unsupported JWT algorithm {name!r}")
        if not (math.isfinite(leeway_s) and leeway_s >= 0):
            raise ValueError("leeway_s must be a finite number >= 0")
        if not jwks_cache_s >= 0:
            raise ValueError("jwks_cache_s must be >= 0")
        self._algorithms = frozenset(allowed)
        self._audience = audience or None
        self._issuer = issuer or None
        self._leeway = float(leeway_s)
        self._cache_s = float(jwks_cache_s)
        self._clock = clock
        self._min_refresh_s = float(min_refresh_interval_s)

        hmac_allowed = [a for a in allowed if a in HMAC_ALGORITHMS]
        secret = secret or None
        self._hmac_key: bytes | None = None
        if hmac_allowed:
            if secret is None:
                raise ValueError(f"{hmac_allowed[0]} is allowed but no JWT secret is configured")
            try:
                self._hmac_key = _ALGORITHMS["HS256"].prepare_key(secret)
            except PyJWTError as exc:
                raise ValueError("the JWT secret looks like an asymmetric key, not an HMAC secret") from exc
            if len(self._hmac_key) < 32:
                log.warning("the JWT secret is shorter than 32 bytes; use a longer random secret")

        asymmetric = [a for a in allowed if a in ASYMMETRIC_ALGORITHMS]
        self._public_key = load_public_key(public_key_pem) if public_key_pem else None
        self._jwks = jwks
        if asymmetric and self._public_key is None and jwks is None:
            raise ValueError(f"{asymmetric[0]} is allowed but neither a public key nor a JWKS is configured")
        if self._public_key is not None and not any(_fits(a, self._public_key) for a in asymmetric):
            raise ValueError("the JWT public key fits none of the allowed algorithms")

        self._keyset = _KeySet()
        self._loaded_at: float | None = None
        self._attempted_at: float | None = None
        self._inflight: asyncio.Future[bool] | None = None
        if jwks is not None:
            self._attempted_at = self._clock()
            try:
                self._keyset = parse_jwks(jwks.load())
            except Exception as exc:
                if jwks.local:
                    raise ValueError(f"cannot load the JWKS at {jwks.url}: {exc}") from exc
                log.warning("cannot load the JWKS at %s (%s); retrying on first use", jwks.url, exc)
            else:
                self._loaded_at = self._attempted_at

    @classmethod
    def from_settings(
        cls, settings: Settings, secret: str | None = None, *, clock: Callable[[], float] = time.time
    ) -> JwtVerifier:
        """Build from the Settings (contract §4).

        The HMAC secret is ``secret`` if given, else ``FLEETWIRE_JWT_SECRET``, else (only when an
        HS* algorithm is allowed) the one generated and kept in the data directory.
        """
        algorithms = settings.algorithms
        secret = secret or signing_secret(settings)
        public = read_public_key_setting(settings.jwt_public_key) if settings.jwt_public_key else None
        jwks = JwksSource(settings.jwt_jwks_url) if settings.jwt_jwks_url else None
        return cls(
            algorithms=algorithms,
            secret=secret,
            public_key_pem=public,
            jwks=jwks,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway_s=settings.jwt_leeway_s,
            jwks_cache_s=settings.jwks_cache_s,
            clock=clock,
        )

    # ---- TokenVerifier

    def verify(self, token: str) -> Principal:
        """The Principal of a valid token; AuthError (or UnknownKeyError) otherwise. No I/O."""
        if not isinstance(token, str) or not token:
            raise AuthError("token missing")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("token too large")
        parts = token.split(".")
        if len(parts) != 3 or not _B64URL.fullmatch(parts[1]):  # the others: _canonical
            raise AuthError("malformed token")
        header = _json_object(_b64decode(parts[0]))
        if not _canonical(parts[2]):
            raise AuthError("malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("algorithm not allowed")
        if any(name in header for name in REFUSED_HEADERS):
            raise AuthError("token header not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed token")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        digest = _HMAC_DIGESTS.get(alg)
        if digest is not None:
            assert self._hmac_key is not None  # an allowed HS* algorithm requires the secret
            # Compared encoded: both spellings are canonical, so equal text is equal bytes.
            expected = _b64encode(hmac.digest(self._hmac_key, signing_input, digest))
            if not hmac.compare_digest(expected, parts[2]):
                raise AuthError("signature invalid")
        else:
            signature = _b64decode(parts[2])
            algorithm = _ALGORITHMS[alg]
            keys = self._keys_for(alg, kid)
            if not any(_signature_ok(algorithm, signing_input, k, signature) for k in keys):
                raise AuthError("signature invalid")
        return self._principal(_json_object(_b64decode(parts[1])))

    async def refresh_keys(self) -> bool:
        """Reload the JWKS, at most once per ``min_refresh_interval_s``; concurrent calls share one fetch.

        Returns True when a reload was made or joined (retrying ``verify`` once is then
        worthwhile, even if the fetch failed: the cached keys serve until the next attempt);
        False when no JWKS is configured or the call was rate-limited.
        """
        if self._jwks is None:
            return False
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            return await asyncio.shield(inflight)
        now = self._clock()
        if self._attempted_at is not None and now - self._attempted_at < self._min_refresh_s:
            return False
        self._attempted_at = now
        task = asyncio.ensure_future(self._reload(self._jwks))
        self._inflight = task
        return await asyncio.shield(task)

    async def _reload(self, jwks: JwksProvider) -> bool:
        try:
            keyset = parse_jwks(await jwks.fetch())
        except Exception as exc:
            log.warning("JWKS refresh from %s failed: %s", jwks.url, exc)
            return True
        self._keyset = keyset
        self._loaded_at = self._clock()
        return True

    # ---- internals

    def _refresh_due(self, now: float) -> bool:
        if self._loaded_at is not None and now - self._loaded_at < self._cache_s:
            return False
        return self._attempted_at is None or now - self._attempted_at >= self._min_refresh_s

    def _keys_for(self, alg: str, kid: str | None) -> Iterable[bytes | PublicKey]:
        if alg in HMAC_ALGORITHMS:
            assert self._hmac_key is not None  # an allowed HS* algorithm requires the secret
            return (self._hmac_key,)
        if self._jwks is not None and self._refresh_due(self._clock()):
            raise UnknownKeyError("key set expired")
        keyset = self._keyset
        if kid is not None and self._jwks is not None:
            keys = [k.key for k in keyset.with_kid(kid) if k.fits(alg)]
            if not keys:
                raise UnknownKeyError("unknown key id")
            return keys
        candidates: list[PublicKey] = []
        if self._public_key is not None and _fits(alg, self._public_key):
            candidates.append(self._public_key)
        candidates.extend(k.key for k in keyset.keys if k.fits(alg))
        if not candidates:
            if self._jwks is not None:
                raise UnknownKeyError("no key for algorithm")
            raise AuthError("no key for algorithm")
        return candidates

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        now = self._clock()
        leeway = self._leeway
        exp = claims.get("exp")
        if exp is None:
            raise AuthError("token has no exp")
        if not _is_number(exp):
            raise AuthError("invalid exp claim")
        if now >= exp + leeway:
            raise AuthError("token expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _is_number(nbf):
                raise AuthError("invalid nbf claim")
            if nbf > now + leeway:
                raise AuthError("token not yet valid")
        iat = claims.get("iat")
        if iat is not None:
            if not _is_number(iat):
                raise AuthError("invalid iat claim")
            if iat > now + leeway:
                raise AuthError("token issued in the future")
        if self._audience is not None:
            aud = claims.get("aud")
            if not (aud == self._audience or (isinstance(aud, list) and self._audience in aud)):
                raise AuthError("audience mismatch")
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise AuthError("issuer mismatch")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("invalid sub claim")
        role_value = claims.get("role")
        role = _ROLE_OF.get(role_value) if isinstance(role_value, str) else None
        if role is None:
            raise AuthError("invalid role claim")
        patterns: tuple[str, ...] | None = None
        if role is not Role.DEVICE and "devices" in claims:
            devices = claims["devices"]
            if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
                raise AuthError("invalid devices claim")
            patterns = tuple(devices)
        expires_at_ms = exp * 1000 if isinstance(exp, int) else int(exp * 1000)
        return Principal(sub=sub, role=role, expires_at_ms=expires_at_ms, device_patterns=patterns)


def _signature_ok(algorithm: Algorithm, signing_input: bytes, key: object, signature: bytes) -> bool:
    try:
        return bool(algorithm.verify(signing_input, key, signature))
    except Exception:
        return False


# --------------------------------------------------------------------------- minting


def mint_token(
    *,
    secret: str,
    algorithm: str = "HS256",
    sub: str,
    role: Role | str,
    ttl_s: float,
    devices: list[str] | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
    kid: str | None = None,
) -> tuple[str, int]:
    """Sign a token; returns ``(token, expires_at_ms)``.

    The signing primitive under `fleetwire.auth.mint.TokenMinter`, the one mint path: the
    application mints there (it picks the secret, algorithm, audience and issuer); tests call
    this directly to forge any token, asymmetric ones included.

    ``secret`` is the shared secret for HS*, or a PEM private key for the asymmetric algorithms.
    Claims: ``sub``, ``role``, ``iat`` = floor(now), ``exp`` = floor(now + ttl_s), and
    ``devices`` / ``aud`` / ``iss`` when given. Raises ValueError for a bad argument:
    unsupported algorithm (``none`` included), unknown role, empty ``sub``, ``ttl_s`` < 1,
    ``devices`` not a list of strings, or an unusable key. ``devices`` is left out of a
    device token (its verification would ignore it anyway).
    """
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise ValueError(f"unsupported JWT algorithm {algorithm!r}")
    role_ = Role(role)
    if not isinstance(sub, str) or not sub:
        raise ValueError("sub must be a non-empty string")
    if not (math.isfinite(ttl_s) and ttl_s >= 1):
        raise ValueError("ttl_s must be at least 1 second")
    if devices is not None and not (isinstance(devices, list) and all(isinstance(d, str) for d in devices)):
        raise ValueError("devices must be a list of strings")
    issued = time.time() if now is None else now
    exp = math.floor(issued + ttl_s)
    payload: dict[str, Any] = {"sub": sub, "role": role_.value, "iat": math.floor(issued), "exp": exp}
    if devices is not None and role_ is not Role.DEVICE:  # a device token ignores `devices`
        payload["devices"] = list(devices)
    if audience is not None:
        payload["aud"] = audience
    if issuer is not None:
        payload["iss"] = issuer
    header: dict[str, Any] = {"alg": algorithm, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    algo = _ALGORITHMS[algorithm]
    try:
        key = algo.prepare_key(secret)
    except (PyJWTError, ValueError, TypeError) as exc:
        raise ValueError(f"the signing key is not usable for {algorithm}") from exc
    if algorithm in ASYMMETRIC_ALGORITHMS and not isinstance(key, _PRIVATE_TYPES):
        raise ValueError(f"{algorithm} needs a PEM private key to sign")
    signing_input = f"{_b64encode(orjson.dumps(header))}.{_b64encode(orjson.dumps(payload))}"
    signature = algo.sign(signing_input.encode("ascii"), key)
    return f"{signing_input}.{_b64encode(signature)}", exp * 1000


def build_verifier(settings: Settings, *, clock: Callable[[], float] = time.time) -> JwtVerifier:
    """The application's TokenVerifier, from the Settings."""
    return JwtVerifier.from_settings(settings, clock=clock)
