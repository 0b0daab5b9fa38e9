"""Which category a status code falls in, and the key of a per-minute count."""

from __future__ import annotations

import hashlib

from server.domain.analytics.model import Category

_CATEGORIES = {
    "OK": Category.OK,
    "UNAUTHENTICATED": Category.AUTH,
    "PERMISSION_DENIED": Category.AUTH,
    "RESOURCE_EXHAUSTED": Category.QUOTA,
    "UNAVAILABLE": Category.DEPENDENCY,
    "DEADLINE_EXCEEDED": Category.DEPENDENCY,
    "INTERNAL": Category.INTERNAL,
    "UNKNOWN": Category.INTERNAL,
    "DATA_LOSS": Category.INTERNAL,
    "UNIMPLEMENTED": Category.INTERNAL,
}


def category_of(code: str) -> Category:
    """The category of a status code's name (``INVALID_ARGUMENT`` -> client)."""
    return _CATEGORIES.get(code, Category.CLIENT)


def count_id(minute: float, method: str, code: str, reason: str) -> str:
    """The row of one (minute, method, code, reason): the same on every replica, so that
    their counts add up in one row."""
    key = f"{int(minute)}\x00{method}\x00{code}\x00{reason}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


def change(tally_count: int, previous: int) -> float | None:
    """The relative change from the previous window (None when it had nothing)."""
    return None if previous == 0 else (tally_count - previous) / previous
