"""Opaque, prefixed, time-sortable identifiers such as ``usr_01jd3k...``.

The body is 26 Crockford base32 characters: 48 bits of milliseconds since the epoch,
then 80 random bits (the ULID layout), lower-cased. Ids made later sort later.
"""

from __future__ import annotations

import re
import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
BODY_LENGTH = 26
PREFIXES = frozenset(
    {"usr", "ses", "rtk", "key", "aud", "tun", "evt", "lnk", "whk", "dlv", "opr", "prx", "pse"}
)
_ID = re.compile(rf"^([a-z]{{3}})_([{_ALPHABET}]{{{BODY_LENGTH}}})$")


def new_id(prefix: str, now: float | None = None) -> str:
    """A new id with ``prefix`` (one of :data:`PREFIXES`)."""
    assert prefix in PREFIXES, prefix
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (millis << 80) | secrets.randbits(80)
    chars = []
    for _ in range(BODY_LENGTH):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


def is_id(value: str, prefix: str) -> bool:
    """Whether ``value`` is a well-formed id with ``prefix``."""
    match = _ID.fullmatch(value)
    return bool(match) and match.group(1) == prefix  # type: ignore[union-attr]
