"""Access tokens: short-lived JWTs signed with EdDSA (Ed25519) or ES256, with ``kid``.

Verification accepts only the allow-listed algorithms, and only the algorithm of the key
named by ``kid``; it checks ``typ`` (``at+jwt``, RFC 9068), ``iss``, ``aud``, ``exp``,
``nbf`` and ``iat``. The public keys are published as a JWKS so other services can verify
tokens offline. Verified tokens are cached until they expire; revocation is checked by
the caller on every use, cached or not.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from server.domain.common.clock import Clock
from server.domain.common.errors import Unauthenticated
from server.domain.identity.model import AccessClaims, IssuedToken

ALLOWED_ALGORITHMS = frozenset({"EdDSA", "ES256"})
TOKEN_TYPE = "at+jwt"  # noqa: S105 - the JWT `typ` of access tokens (RFC 9068)
LEEWAY_SECONDS = 5
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key that may have signed a valid token."""

    kid: str
    alg: str
    key: PublicKey
    jwk: dict[str, str]


def verification_key(public_key: PublicKey) -> VerificationKey:
    """The JWK, algorithm and RFC 7638 thumbprint ``kid`` of a public key."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        required = {"crv": "Ed25519", "kty": "OKP", "x": _b64(raw)}
        alg = "EdDSA"
    elif isinstance(public_key.curve, ec.SECP256R1):
        numbers = public_key.public_numbers()
        required = {
            "crv": "P-256",
            "kty": "EC",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
        }
        alg = "ES256"
    else:
        raise TypeError("signing keys must be Ed25519 or EC P-256")
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True).encode()
    kid = _b64(hashlib.sha256(canonical).digest())
    return VerificationKey(kid, alg, public_key, {**required, "kid": kid, "use": "sig", "alg": alg})


@dataclass(frozen=True, slots=True)
class KeySet:
    """The current signing key and every key whose tokens are still accepted."""

    private_key: PrivateKey
    current: VerificationKey
    accepted: dict[str, VerificationKey]

    @classmethod
    def build(cls, private_key: PrivateKey, retired: list[PublicKey] | None = None) -> KeySet:
        """A key set signing with ``private_key`` and also accepting ``retired`` keys."""
        current = verification_key(private_key.public_key())
        accepted = {current.kid: current}
        for key in retired or []:
            vk = verification_key(key)
            accepted.setdefault(vk.kid, vk)
        return cls(private_key, current, accepted)


def load_private_key(pem: bytes) -> PrivateKey:
    """Parse a PEM Ed25519 or P-256 private key; ``ValueError`` for anything else."""
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ValueError("the JWT signing key must be Ed25519 or EC P-256")


def load_public_keys(pem: bytes) -> list[PublicKey]:
    """Parse a bundle of PEM public keys."""
    keys: list[PublicKey] = []
    marker = b"-----END PUBLIC KEY-----"
    for block in pem.split(marker):
        if b"-----BEGIN PUBLIC KEY-----" not in block:
            continue
        key = serialization.load_pem_public_key(block + marker)
        if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
            raise TypeError("verification keys must be Ed25519 or EC P-256")
        keys.append(key)
    return keys


def generate_private_key_pem() -> bytes:
    """A new Ed25519 private key as unencrypted PKCS#8 PEM."""
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TokenService:
    """Issues and verifies access tokens."""

    def __init__(
        self,
        keys: KeySet,
        *,
        issuer: str,
        audience: str,
        ttl: float,
        clock: Clock,
        cache_size: int = 10_000,
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl
        self._clock = clock
        self._cache: OrderedDict[str, AccessClaims] = OrderedDict()
        self._cache_size = cache_size

    @property
    def ttl(self) -> float:
        """Lifetime of new tokens, seconds."""
        return self._ttl

    def jwks(self) -> list[dict[str, str]]:
        """Every accepted public key as a JWK, the current one first."""
        return [vk.jwk for vk in self._keys.accepted.values()]

    def issue(self, user_id: str, session_id: str) -> IssuedToken:
        """Sign a new access token for ``user_id`` in ``session_id``."""
        now = int(self._clock.time())
        claims = AccessClaims(user_id, session_id, secrets.token_urlsafe(16), now, now + self._ttl)
        payload = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": user_id,
            "sid": session_id,
            "jti": claims.token_id,
            "iat": now,
            "nbf": now,
            "exp": int(claims.expires_at),
        }
        current = self._keys.current
        token = jwt.encode(
            payload,
            self._keys.private_key,
            algorithm=current.alg,
            headers={"kid": current.kid, "typ": TOKEN_TYPE},
        )
        return IssuedToken(token, claims)

    def verify(self, token: str, *, expired_ok: bool = False) -> AccessClaims:
        """The claims of a valid token; :class:`Unauthenticated` otherwise.

        ``expired_ok`` accepts a token whose ``exp`` has passed (everything else is still
        checked): for a stream the token authenticated when it was fresh, which its
        session, not the token's lifetime, bounds.
        """
        now = self._clock.time()
        cached = self._cache.get(token)
        if cached is not None:
            if expired_ok or not self.expired(cached):
                return cached
            del self._cache[token]
        claims = self._verify_signature_and_claims(token, now, expired_ok=expired_ok)
        # Past its exp too (verified ``expired_ok``): a stream re-checks it again and again,
        # and a call without ``expired_ok`` drops it above and is refused.
        self._cache[token] = claims
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return claims

    def expired(self, claims: AccessClaims) -> bool:
        """Whether a token with ``claims`` is past its ``exp`` (and the leeway) now."""
        return claims.expires_at <= self._clock.time() - LEEWAY_SECONDS

    def _verify_signature_and_claims(
        self, token: str, now: float, *, expired_ok: bool
    ) -> AccessClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("malformed token") from None
        alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if alg not in ALLOWED_ALGORITHMS:
            raise _invalid("token algorithm not allowed")
        if not isinstance(typ, str) or typ.lower() not in {TOKEN_TYPE, "application/at+jwt"}:
            raise _invalid("not an access token")
        key = self._keys.accepted.get(kid) if isinstance(kid, str) else None
        if key is None or key.alg != alg:
            raise _invalid("unknown signing key")
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.alg],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti", "sid"],
                    # PyJWT reads the wall clock; times are judged by self._clock below.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError:
            raise _invalid("token verification failed") from None
        _check_times(payload, now, expired_ok=expired_ok)
        if not all(isinstance(payload[k], str) for k in ("sub", "sid", "jti")):
            raise _invalid("malformed claims")
        return AccessClaims(
            payload["sub"],
            payload["sid"],
            payload["jti"],
            float(payload["iat"]),
            float(payload["exp"]),
        )


def _check_times(payload: dict[str, Any], now: float, *, expired_ok: bool) -> None:
    """``iat``, ``nbf`` and ``exp`` against ``now``, with :data:`LEEWAY_SECONDS` either way
    (``exp`` not at all when ``expired_ok``)."""
    times = [payload[k] for k in ("iat", "nbf", "exp")]
    if not all(type(t) is int or (type(t) is float and math.isfinite(t)) for t in times):
        raise _invalid("malformed claims")
    issued_at, not_before, expires_at = times
    if expires_at <= now - LEEWAY_SECONDS and not expired_ok:
        raise Unauthenticated("access token expired", reason="TOKEN_EXPIRED")
    if max(issued_at, not_before) > now + LEEWAY_SECONDS:
        raise _invalid("token not valid yet")


def _invalid(message: str) -> Unauthenticated:
    return Unauthenticated(message, reason="TOKEN_INVALID")
