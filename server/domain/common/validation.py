"""Input rules shared by the domain services. Each returns the cleaned value or records a
violation naming the request field, so a response lists every bad field at once."""

from __future__ import annotations

import re
import unicodedata
import zoneinfo
from functools import cache

from server.domain.common.errors import Violations

MAX_EMAIL = 254
MIN_PASSWORD = 10
MAX_PASSWORD = 128
MAX_DISPLAY_NAME = 100
_EMAIL_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_DOMAIN_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8}){0,4}$")
# Bidirectional overrides and isolates: used to disguise text (trojan-source, spoofing).
# Zero-width (non-)joiners are format characters that Persian, Indic scripts and emoji need.
_JOINERS = frozenset("\u200c\u200d")
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def email(value: str, field: str, violations: Violations) -> str:
    """A syntactically valid address, lower-cased for comparison; '' if invalid."""
    if not value:
        violations.add(field, "is required", "REQUIRED")
        return ""
    if len(value) > MAX_EMAIL or not value.isascii():
        violations.add(field, f"must be an ASCII address of at most {MAX_EMAIL} characters")
        return ""
    local, at, domain = value.rpartition("@")
    labels = domain.split(".")
    if (
        not at
        or not _EMAIL_LOCAL.fullmatch(local)
        or local.startswith(".")
        or local.endswith(".")
        or ".." in local
        or len(labels) < 2
        or not all(_DOMAIN_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        violations.add(field, "is not a valid email address")
        return ""
    return value.lower()


def password(value: str, email_value: str, field: str, violations: Violations) -> None:
    """Length and sanity rules for a new password (NIST SP 800-63B style: no composition rules)."""
    if not value:
        violations.add(field, "is required", "REQUIRED")
    elif len(value) < MIN_PASSWORD or len(value) > MAX_PASSWORD:
        violations.add(field, f"must be {MIN_PASSWORD}-{MAX_PASSWORD} characters")
    elif "\x00" in value:
        violations.add(field, "must not contain NUL characters")
    elif email_value and value.lower() == email_value.lower():
        violations.add(field, "must not be the email address")
    elif len(set(value)) < 3:
        violations.add(field, "is too repetitive")


def display_name(
    value: str, field: str, violations: Violations, max_length: int = MAX_DISPLAY_NAME
) -> str:
    """A name for people to read: trimmed, 1-100 characters, no markup or control characters."""
    cleaned = unicodedata.normalize("NFC", value).strip()
    if not cleaned:
        violations.add(field, "is required", "REQUIRED")
    elif len(cleaned) > max_length:
        violations.add(field, f"must be at most {max_length} characters")
    elif any(_bad_text_char(c) for c in cleaned):
        violations.add(field, "must not contain control, formatting or markup characters")
    return cleaned


def free_text(value: str, field: str, violations: Violations, max_length: int) -> str:
    """Optional text for people to read (line breaks allowed), at most ``max_length``."""
    cleaned = unicodedata.normalize("NFC", value).strip()
    if len(cleaned) > max_length:
        violations.add(field, f"must be at most {max_length} characters")
    elif any(c not in "\n\t" and _bad_text_char(c) for c in cleaned):
        violations.add(field, "must not contain control or formatting characters")
    return cleaned


def _bad_text_char(c: str) -> bool:
    if c in _JOINERS:
        return False
    return c in "<>" or c in _BIDI or unicodedata.category(c) in {"Cc", "Cf", "Cs", "Co", "Cn"}


def language(value: str, field: str, violations: Violations) -> str:
    """A BCP 47 language tag such as ``en`` or ``pt-BR``."""
    if len(value) > 35 or not _LANGUAGE.fullmatch(value):
        violations.add(field, "must be a BCP 47 language tag such as en or pt-BR")
    return value


@cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def time_zone(value: str, field: str, violations: Violations) -> str:
    """An IANA time zone name, or empty for UTC."""
    if value and value not in _zones():
        violations.add(field, "must be an IANA time zone such as Europe/Lisbon")
    return value
