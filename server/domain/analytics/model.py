"""Call outcomes and their summaries."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class Category(enum.StrEnum):
    """What kind of failure a status code is (``ok`` for a call that succeeded)."""

    OK = "ok"
    #: The caller's request was wrong: bad input, a missing or conflicting resource.
    CLIENT = "client"
    #: No credentials, bad ones, or not allowed.
    AUTH = "auth"
    #: A rate limit or a quota refused it.
    QUOTA = "quota"
    #: A dependency was down or too slow (or the server shed load).
    DEPENDENCY = "dependency"
    #: The server failed: a bug.
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class OutcomeCount:
    """Calls of one method that ended with one code and reason in one minute."""

    id: str
    window_start: datetime
    method: str
    code: str
    reason: str
    category: Category
    count: int


@dataclass(frozen=True, slots=True)
class Tally:
    """Counts in one window and in the window before it, of the same length."""

    count: int
    previous: int


@dataclass(frozen=True, slots=True)
class TopError:
    """One kind of failure (method, code, reason) and how often it happened."""

    method: str
    code: str
    reason: str
    category: Category
    tally: Tally


@dataclass(frozen=True, slots=True)
class ErrorSummary:
    """Calls, failures by category and the top failures over a window, each beside the
    window before it."""

    start: datetime
    end: datetime
    calls: Tally
    errors: Tally
    by_category: dict[Category, Tally]
    top: list[TopError]
