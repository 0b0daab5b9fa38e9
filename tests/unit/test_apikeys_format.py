"""The API key format: tp_ + 32 base62 characters + a 6-character CRC32 checksum."""

from __future__ import annotations

import hashlib
import re
import string
import zlib

import pytest

from server.domain.identity.rules import (
    display_prefix,
    generate_secret,
    hash_secret,
    looks_like_key,
)

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
#: Fixed examples: secret scanners depend on this format never changing.
KNOWN_KEYS = [
    "tp_0123456789ABCDEFGHIJKLMNOPQRSTUV4L1vi6",
    "tp_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa2F1Dpu",
]


def reference_checksum(body: str) -> str:
    """CRC32 of ``tp_`` + body as six base62 digits, most significant first."""
    value, digits = zlib.crc32(f"tp_{body}".encode()), ""
    for _ in range(6):
        value, digit = divmod(value, 62)
        digits = BASE62[digit] + digits
    return digits


def test_generated_secret_has_the_documented_shape() -> None:
    secret = generate_secret()
    assert re.fullmatch(r"tp_[0-9A-Za-z]{38}", secret)
    assert secret[-6:] == reference_checksum(secret[3:-6])
    assert looks_like_key(secret)


def test_generated_secrets_differ() -> None:
    secrets = {generate_secret() for _ in range(200)}
    assert len(secrets) == 200
    # Every base62 character turns up: the body draws from the whole alphabet.
    assert set("".join(s[3:-6] for s in secrets)) == set(BASE62)


@pytest.mark.parametrize("secret", KNOWN_KEYS)
def test_known_keys_are_recognised(secret: str) -> None:
    assert looks_like_key(secret)
    assert secret[-6:] == reference_checksum(secret[3:-6])


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "tp_",
        KNOWN_KEYS[0][:-1],
        KNOWN_KEYS[0] + "A",
        KNOWN_KEYS[0].upper(),
        "TP_" + KNOWN_KEYS[0][3:],
        "tk_" + KNOWN_KEYS[0][3:],
        " " + KNOWN_KEYS[0],
        KNOWN_KEYS[0] + "\n",
        KNOWN_KEYS[0][:10] + "-" + KNOWN_KEYS[0][11:],
        KNOWN_KEYS[0][:-6] + "000000",
        KNOWN_KEYS[0][:-6] + KNOWN_KEYS[1][-6:],
        "tp_" + "a" * 38,
        "tp_" + "٣" * 38,  # digits, but not ASCII ones
        "Bearer " + KNOWN_KEYS[0],
    ],
)
def test_other_strings_are_not_keys(secret: str) -> None:
    assert not looks_like_key(secret)


def test_hash_is_hex_sha256_of_the_whole_secret() -> None:
    secret = KNOWN_KEYS[0]
    digest = hash_secret(secret)
    assert digest == hashlib.sha256(secret.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert hash_secret(KNOWN_KEYS[1]) != digest


@pytest.mark.parametrize("secret", [*KNOWN_KEYS, generate_secret()])
def test_display_prefix_shows_the_prefix_and_six_body_characters(secret: str) -> None:
    prefix = display_prefix(secret)
    assert prefix == secret[:9]
    assert prefix.startswith("tp_")
    assert len(prefix) == 9
    assert secret[-6:] not in prefix  # nothing of the checksum
