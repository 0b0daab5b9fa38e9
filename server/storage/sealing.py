"""Secrets at rest: values the server must read back (webhook signing secrets) are stored
sealed with AES-256-GCM, never in the clear.

A sealed value reads ``sealed:v1:<key id>:<base64 nonce+ciphertext>``. The key id names
which of the configured keys sealed it (the first key seals, every key opens: rotate by
putting a new key first and keeping the old ones until the rows are rewritten). The
row's id is authenticated with it, so a sealed value copied into another row does not
open. A value without the prefix is read as it is: a row written in the clear by a tool
outside the server (the bench's bulk fill), which the next rotation seals.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "sealed:v1:"
KEY_BYTES = 32
NONCE_BYTES = 12


class SealError(ValueError):
    """A sealed value that no configured key opens (wrong key, tampered, or moved)."""


def key_id(key: bytes) -> str:
    """A short public name of a key: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:8]


def parse_keys(text: str) -> tuple[bytes, ...]:
    """Keys from a setting: comma-separated standard base64 of 32 bytes each."""
    keys = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            key = base64.b64decode(part, validate=True)
        except binascii.Error:
            raise ValueError("a secrets key is standard base64") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"a secrets key is {KEY_BYTES} bytes")
        keys.append(key)
    if not keys:
        raise ValueError("at least one secrets key is needed")
    return tuple(keys)


def new_key() -> str:
    """A fresh key, as the setting takes it."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


class Sealer:
    """Seals with the first key; opens with any."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one secrets key is needed")
        self._sealing = keys[0]
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        self._current = key_id(keys[0])

    def seal(self, plaintext: str, row_id: str) -> str:
        """``plaintext`` sealed for the row ``row_id``."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self._current].encrypt(nonce, plaintext.encode(), row_id.encode())
        return f"{PREFIX}{self._current}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, stored: str, row_id: str) -> str:
        """The plaintext of a stored value of the row ``row_id``; :class:`SealError`."""
        if not stored.startswith(PREFIX):
            return stored  # written in the clear by a tool; sealed at the next rotation
        kid, _, encoded = stored.removeprefix(PREFIX).partition(":")
        aead = self._keys.get(kid)
        if aead is None:
            raise SealError(f"no configured secrets key has id {kid!r}")
        try:
            raw = base64.b64decode(encoded, validate=True)
            return aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], row_id.encode()).decode()
        except (binascii.Error, InvalidTag, UnicodeDecodeError):
            raise SealError("a sealed value does not open (tampered, or moved)") from None
