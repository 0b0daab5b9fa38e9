"""Property 2: JWT validation round trip (server/domain/identity/tokens.py).

A token the service issues verifies to the same subject and session; anything else, a
changed character, another key, another algorithm, other claims or another time, is
refused with ``Unauthenticated``. Forgeries are made with PyJWT or by hand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from server.domain.common.errors import Unauthenticated
from server.domain.identity.tokens import (
    LEEWAY_SECONDS,
    TOKEN_TYPE,
    KeySet,
    PrivateKey,
    PublicKey,
    TokenService,
)

ISSUER = "tunnelplane"
AUDIENCE = "tunnelplane-api"
TTL = 900.0
#: Far from the wall clock on purpose: the service must judge time by its clock alone.
T0 = 2_000_000_000.0
ED_KEY = ed25519.Ed25519PrivateKey.generate()
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_ED_KEY = ed25519.Ed25519PrivateKey.generate()
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass
class FakeClock:
    """A clock that moves only when told to."""

    t: float = T0

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)

    def time(self) -> float:
        return self.t


def service(
    key: PrivateKey = ED_KEY, retired: list[PublicKey] | None = None, clock: FakeClock | None = None
) -> TokenService:
    return TokenService(
        KeySet.build(key, retired),
        issuer=ISSUER,
        audience=AUDIENCE,
        ttl=TTL,
        clock=clock or FakeClock(),
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def kid_of(svc: TokenService) -> str:
    return svc.jwks()[0]["kid"]


def claims(**changes: Any) -> dict[str, Any]:
    """The payload the service would issue at ``T0``, with ``changes``."""
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "usr_1",
        "sid": "ses_1",
        "jti": "tok_1",
        "iat": int(T0),
        "nbf": int(T0),
        "exp": int(T0 + TTL),
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def forge(
    payload: dict[str, Any], key: PrivateKey = ED_KEY, alg: str = "EdDSA", **header: Any
) -> str:
    """A token signed with ``key``; the header defaults to the service's kid and typ."""
    headers = {"kid": kid_of(service(ED_KEY)), "typ": TOKEN_TYPE, **header}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def hand_made(header: dict[str, Any], payload: dict[str, Any], sign: Any) -> str:
    """A token assembled by hand, for algorithms PyJWT refuses to produce."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def with_alg(token: str, alg: str) -> str:
    """``token`` with its header's ``alg`` rewritten and its signature kept."""
    head, payload, signature = token.split(".")
    header = {**json.loads(unb64(head)), "alg": alg}
    return f"{b64(json.dumps(header).encode())}.{payload}.{signature}"


def refused(svc: TokenService, token: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        svc.verify(token)
    return caught.value


# --- round trip ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(user_id=st.text(max_size=40), session_id=st.text(max_size=40), alg=st.sampled_from("EC"))
def test_issued_token_verifies_to_the_same_subject_and_session(
    user_id: str, session_id: str, alg: str
) -> None:
    svc = service(ED_KEY if alg == "E" else EC_KEY)
    issued = svc.issue(user_id, session_id)
    verified = svc.verify(issued.token)
    assert (verified.subject, verified.session_id) == (user_id, session_id)
    assert verified == issued.claims
    assert verified.expires_at == verified.issued_at + TTL == T0 + TTL
    # A fresh service (no cache) agrees.
    fresh = service(ED_KEY if alg == "E" else EC_KEY)
    assert fresh.verify(issued.token) == issued.claims


def test_header_names_key_algorithm_and_type() -> None:
    for key, alg in [(ED_KEY, "EdDSA"), (EC_KEY, "ES256")]:
        svc = service(key)
        header = jwt.get_unverified_header(svc.issue("usr_1", "ses_1").token)
        assert header == {"alg": alg, "kid": kid_of(svc), "typ": "at+jwt"}


def test_token_ids_are_unique() -> None:
    svc = service()
    ids = {svc.issue("usr_1", "ses_1").claims.token_id for _ in range(50)}
    assert len(ids) == 50


# --- tampering ------------------------------------------------------------------------

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(max_examples=150, deadline=None)
@given(data=st.data(), key=st.sampled_from([ED_KEY, EC_KEY]), segment=st.sampled_from([0, 1, 2]))
def test_any_changed_character_is_refused(
    data: st.DataObject, key: PrivateKey, segment: int
) -> None:
    svc = service(key)
    parts = svc.issue("usr_1", "ses_1").token.split(".")
    index = data.draw(st.integers(0, len(parts[segment]) - 1), label="index")
    old = parts[segment][index]
    new = data.draw(st.sampled_from(B64URL + "=.+/ ~é").filter(lambda c: c != old), label="char")
    changed = parts[segment][:index] + new + parts[segment][index + 1 :]
    if segment == 2 and new in B64URL:
        # The last character's low bits are base64 padding: the same signature, re-spelt.
        assume(unb64(changed) != unb64(parts[2]))
    tampered = ".".join([*parts[:segment], changed, *parts[segment + 1 :]])
    assert refused(svc, tampered).reason == "TOKEN_INVALID"


@pytest.mark.parametrize(
    "token", ["", "abc", "a.b", "a.b.c", "a.b.c.d", "...", "e30.e30.", "é.é.é"]
)
def test_malformed_tokens_are_refused(token: str) -> None:
    assert refused(service(), token).reason == "TOKEN_INVALID"


# --- forgeries ------------------------------------------------------------------------


def _ed_public_raw() -> bytes:
    return ED_KEY.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _ed_public_pem() -> bytes:
    return ED_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _hs256(secret: bytes) -> Any:
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


def _header(alg: str) -> dict[str, str]:
    return {"alg": alg, "kid": kid_of(service()), "typ": TOKEN_TYPE}


FORGERIES: dict[str, Any] = {
    "another key, our kid": lambda: forge(claims(), OTHER_ED_KEY),
    "another key, its kid": lambda: forge(
        claims(), OTHER_ED_KEY, kid=kid_of(service(OTHER_ED_KEY))
    ),
    "no kid": lambda: hand_made({"alg": "EdDSA", "typ": TOKEN_TYPE}, claims(), ED_KEY.sign),
    "kid not a string": lambda: hand_made(
        {"alg": "EdDSA", "kid": 7, "typ": TOKEN_TYPE}, claims(), ED_KEY.sign
    ),
    "alg none": lambda: hand_made(_header("none"), claims(), lambda _data: b""),
    "alg none, signature kept": lambda: hand_made(_header("none"), claims(), ED_KEY.sign),
    "HS256 with the raw public key": lambda: hand_made(
        _header("HS256"), claims(), _hs256(_ed_public_raw())
    ),
    "HS256 with the PEM public key": lambda: hand_made(
        _header("HS256"), claims(), _hs256(_ed_public_pem())
    ),
    "HS256 with the kid": lambda: hand_made(
        _header("HS256"), claims(), _hs256(kid_of(service()).encode())
    ),
    "ES256 key under the EdDSA kid": lambda: forge(claims(), EC_KEY, alg="ES256"),
    "EdDSA header on an ES256 kid": lambda: with_alg(
        forge(claims(), EC_KEY, alg="ES256", kid=kid_of(service(EC_KEY))), "EdDSA"
    ),
    "wrong issuer": lambda: forge(claims(iss="someone-else")),
    "no issuer": lambda: forge(claims(iss=None)),
    "wrong audience": lambda: forge(claims(aud="other-api")),
    "audience list without ours": lambda: forge(claims(aud=["other-api", "more"])),
    "no audience": lambda: forge(claims(aud=None)),
    "typ JWT": lambda: forge(claims(), typ="JWT"),
    "no typ": lambda: forge(claims(), typ=None),
    "typ of an ID token": lambda: forge(claims(), typ="id+jwt"),
    "no subject": lambda: forge(claims(sub=None)),
    "subject not a string": lambda: forge(claims(sub=42)),
    "no session": lambda: forge(claims(sid=None)),
    "session not a string": lambda: forge(claims(sid=["ses_1"])),
    "no token id": lambda: forge(claims(jti=None)),
    "no expiry": lambda: forge(claims(exp=None)),
    "no not-before": lambda: forge(claims(nbf=None)),
    "no issued-at": lambda: forge(claims(iat=None)),
    "expiry not a number": lambda: forge(claims(exp="later")),
    "expiry NaN": lambda: forge(claims(exp=float("nan"))),
    "expiry infinite": lambda: forge(claims(exp=float("inf"))),
    "issued-at a boolean": lambda: forge(claims(iat=True)),
    "not-before a list": lambda: forge(claims(nbf=[0])),
    "not valid yet (nbf)": lambda: forge(claims(nbf=int(T0) + 60)),
    "issued in the future": lambda: forge(claims(iat=int(T0) + 60, nbf=int(T0) - 60)),
    "expired": lambda: forge(
        claims(iat=int(T0 - 2 * TTL), nbf=int(T0 - 2 * TTL), exp=int(T0) - 60)
    ),
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_forged_tokens_are_refused(case: str) -> None:
    svc = service(ED_KEY, retired=[EC_KEY.public_key()])
    token = FORGERIES[case]()
    error = refused(svc, token)
    assert error.reason == ("TOKEN_EXPIRED" if case == "expired" else "TOKEN_INVALID")
    assert error.message  # says what, without echoing the token
    assert token not in error.message


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt"])
def test_both_spellings_of_the_access_token_type_are_accepted(typ: str) -> None:
    assert service().verify(forge(claims(), typ=typ)).subject == "usr_1"


# --- time -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "valid"),
    [
        (0, True),
        (TTL - 1, True),
        (TTL + LEEWAY_SECONDS - 1, True),
        (TTL + LEEWAY_SECONDS, False),
        (TTL + 3600, False),
    ],
)
@pytest.mark.parametrize("cached", [True, False])
def test_expiry_follows_the_service_clock(elapsed: float, *, valid: bool, cached: bool) -> None:
    clock = FakeClock()
    issuer = service(clock=clock)
    token = issuer.issue("usr_1", "ses_1").token
    verifier = issuer if cached else service(clock=clock)
    if cached:
        verifier.verify(token)
    clock.t = T0 + elapsed
    if valid:
        assert verifier.verify(token).subject == "usr_1"
    else:
        assert refused(verifier, token).reason == "TOKEN_EXPIRED"


@pytest.mark.parametrize(
    ("early", "valid"), [(0, True), (LEEWAY_SECONDS, True), (LEEWAY_SECONDS + 1, False)]
)
def test_token_from_the_future_is_refused(early: float, *, valid: bool) -> None:
    token = service(clock=FakeClock()).issue("usr_1", "ses_1").token
    verifier = service(clock=FakeClock(T0 - early))
    if valid:
        assert verifier.verify(token).subject == "usr_1"
    else:
        assert refused(verifier, token).reason == "TOKEN_INVALID"


def test_expired_token_stays_refused_once_the_cache_dropped_it() -> None:
    clock = FakeClock()
    svc = service(clock=clock)
    token = svc.issue("usr_1", "ses_1").token
    svc.verify(token)
    clock.t += TTL + LEEWAY_SECONDS + 1
    assert refused(svc, token).reason == "TOKEN_EXPIRED"
    assert refused(svc, token).reason == "TOKEN_EXPIRED"


@settings(max_examples=60, deadline=None)
@given(
    elapsed=st.integers(0, 400 * 86400),
    cached=st.booleans(),
    data=st.data(),
)
def test_an_established_stream_may_hold_an_expired_token_and_nothing_else(
    elapsed: int, *, cached: bool, data: st.DataObject
) -> None:
    """``expired_ok`` (re-checking a running stream) lets ``exp`` pass, at any age, and
    checks everything else as before: a changed character is still refused."""
    clock = FakeClock()
    issuer = service(clock=clock)
    issued = issuer.issue("usr_1", "ses_1")
    verifier = issuer if cached else service(clock=clock)
    if cached:
        verifier.verify(issued.token)
    clock.t = T0 + elapsed
    assert verifier.verify(issued.token, expired_ok=True) == issued.claims
    assert verifier.expired(issued.claims) == (elapsed >= TTL + LEEWAY_SECONDS)
    if verifier.expired(issued.claims):
        assert refused(verifier, issued.token).reason == "TOKEN_EXPIRED"
    parts = issued.token.split(".")
    index = data.draw(st.integers(0, len(parts[1]) - 1), label="index")
    new = data.draw(st.sampled_from(B64URL).filter(lambda c: c != parts[1][index]), label="c")
    tampered = ".".join([parts[0], parts[1][:index] + new + parts[1][index + 1 :], parts[2]])
    with pytest.raises(Unauthenticated) as error:
        verifier.verify(tampered, expired_ok=True)
    assert error.value.reason == "TOKEN_INVALID"


# --- keys -----------------------------------------------------------------------------


def test_retired_key_tokens_are_accepted_and_new_tokens_use_the_current_key() -> None:
    old = service(EC_KEY).issue("usr_1", "ses_1")
    rotated = service(ED_KEY, retired=[EC_KEY.public_key(), ED_KEY.public_key()])
    assert rotated.verify(old.token) == old.claims
    assert [jwk["kid"] for jwk in rotated.jwks()] == [
        kid_of(service(ED_KEY)),
        kid_of(service(EC_KEY)),
    ]
    new = rotated.issue("usr_2", "ses_2")
    assert jwt.get_unverified_header(new.token)["kid"] == kid_of(service(ED_KEY))
    assert refused(service(ED_KEY), old.token).reason == "TOKEN_INVALID"


def test_jwks_entries_verify_tokens_offline() -> None:
    for key in (ED_KEY, EC_KEY):
        svc = service(key)
        (jwk,) = svc.jwks()
        token = svc.issue("usr_1", "ses_1").token
        public = jwt.PyJWK(jwk).key
        payload = jwt.decode(
            token,
            public,
            algorithms=[jwk["alg"]],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
        assert payload["sub"] == "usr_1"
        assert jwk["use"] == "sig"
        assert "d" not in jwk  # never the private part


def thumbprint(members: str) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, without whitespace."""
    return b64(hashlib.sha256(members.encode()).digest())


@settings(max_examples=40, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32))
def test_ed25519_kid_is_the_rfc7638_thumbprint(seed: bytes) -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    x = b64(
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    (jwk,) = service(key).jwks()
    assert jwk["kid"] == thumbprint(f'{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}')
    assert (jwk["kty"], jwk["crv"], jwk["x"], jwk["alg"]) == ("OKP", "Ed25519", x, "EdDSA")


@settings(max_examples=40, deadline=None)
@given(secret=st.integers(1, P256_ORDER - 1))
def test_p256_kid_is_the_rfc7638_thumbprint(secret: int) -> None:
    key = ec.derive_private_key(secret, ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    x, y = b64(numbers.x.to_bytes(32, "big")), b64(numbers.y.to_bytes(32, "big"))
    (jwk,) = service(key).jwks()
    assert jwk["kid"] == thumbprint(f'{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}')
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", "P-256", "ES256")
    assert len(jwk["x"]) == len(jwk["y"]) == 43  # fixed width, leading zeros kept


def test_kid_matches_the_rfc8037_example() -> None:
    # RFC 8037, appendix A.1 (key) and A.3 (its RFC 7638 thumbprint).
    key = ed25519.Ed25519PrivateKey.from_private_bytes(
        unb64("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
    )
    (jwk,) = service(key).jwks()
    assert jwk["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert jwk["kid"] == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
