"""Secrets and personal data that must not leave in free text: error reports
(:mod:`server.errortracking`) and logged tracebacks (:mod:`server.logs`) pass through
:func:`redact`."""

from __future__ import annotations

import re

FILTERED = "[Filtered]"
#: Values that are secrets or personal data wherever they appear in a string.
_PATTERNS = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + FILTERED),
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), FILTERED),
    (re.compile(r"\btp_[a-z]+_[A-Za-z0-9_-]{8,}"), FILTERED),
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[email]"),
    (re.compile(r"\[parameters: .*?\](?=\s|$)", re.DOTALL), "[parameters: " + FILTERED + "]"),
)


def redact(text: str) -> str:
    """``text`` with bearer and basic credentials, JWTs, Tunnelplane keys, e-mail
    addresses and SQL parameters (as SQLAlchemy quotes them in errors) replaced."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
