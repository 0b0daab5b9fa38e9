"""Limits' records: a rate limit and one decision about a call, monthly quotas and
request counts, and aggregated refusals.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import date, datetime

from server.domain.identity.model import Tier

# --- rate limits -----------------------------------------------------------------------

MINUTE_MS = 60_000.0


@dataclass(frozen=True, slots=True)
class Bucket:
    """A GCRA limit: ``limit`` calls per minute with ``burst`` at once."""

    limit: int
    burst: int

    @property
    def interval_ms(self) -> float:
        """The emission interval T."""
        return MINUTE_MS / self.limit

    def scaled(self, factor: float) -> Bucket:
        """This limit tightened by ``factor`` (adaptive limits); never below one call."""
        if factor >= 1:
            return self
        return Bucket(max(1, int(self.limit * factor)), max(1, int(self.burst * factor)))


@dataclass(frozen=True, slots=True)
class GcraResult:
    """One GCRA step."""

    allowed: bool
    tat: float
    wait_ms: int
    retry_after_ms: int
    remaining: int
    reset_ms: int


class Outcome(enum.IntEnum):
    """What a decision says; the numbers are shared with the Lua script."""

    ALLOWED = 0
    IP_BLOCKED = 1
    IP_LIMITED = 2
    SUBJECT_LIMITED = 3
    QUOTA_EXCEEDED = 4

    @property
    def policy(self) -> str:
        """The name recorded in the violation log."""
        return {
            Outcome.IP_BLOCKED: "ip_block",
            Outcome.IP_LIMITED: "ip",
            Outcome.SUBJECT_LIMITED: "subject",
            Outcome.QUOTA_EXCEEDED: "quota:requests",
        }.get(self, "")


class Enforcement(enum.IntEnum):
    """How a decision is applied; the numbers are shared with the Lua script."""

    #: Count the call; refuse it over a limit; an anonymous call's refusals count towards
    #: blocking its address.
    ENFORCE = 0
    #: Count nothing (methods exempt by policy must not spend the caller's budget).
    DRY_RUN = 1
    #: Count the call, but the caller is exempt (role, address): a refusal is only
    #: reported, and never counts towards a block.
    COUNT_ONLY = 2


@dataclass(frozen=True, slots=True)
class BlockPolicy:
    """When repeated refusals block an address."""

    after: int
    window_ms: float
    duration_ms: float


@dataclass(frozen=True, slots=True)
class Check:
    """Everything one decision needs; the limiter answers it in one round trip."""

    subject: str
    ip: str
    subject_bucket: Bucket
    ip_bucket: Bucket
    cost: int = 1
    max_wait_ms: float = 0.0
    #: Monthly request counter to count against (``""``: none, for anonymous callers).
    quota_key: str = ""
    #: Requests allowed this month; -1 means unlimited.
    quota_limit: int = -1
    #: Milliseconds until the month ends (when a refused quota resets).
    quota_reset_ms: float = 0.0
    #: A retry's key (:func:`retry_key`): a call that repeats the key of a counted call
    #: (same subject, method, request id and request) is not counted twice against the
    #: quota. ``""``: none.
    dedupe: str = ""
    #: Whether the call is counted and whether a refusal is meant.
    enforcement: Enforcement = Enforcement.ENFORCE
    block: BlockPolicy = BlockPolicy(100, 60_000.0, 900_000.0)
    #: The time, ms since the epoch; ``None``: the limiter's own clock.
    now_ms: float | None = None
    #: Whether the address's block and limit apply: to anonymous callers (and bad
    #: credentials). An authenticated caller is held to its subject's limit alone, and its
    #: refusals never count towards blocking the address it shares with others.
    by_address: bool = True


@dataclass(frozen=True, slots=True)
class Decision:
    """A limiter's answer."""

    outcome: Outcome
    wait_ms: int = 0
    retry_after_ms: int = 0
    remaining: int = 0
    reset_ms: int = 0
    quota_used: int = -1
    blocked_now: bool = False
    #: This call made the monthly counter (it did not exist): a counter the store lost, or
    #: the month's first call. The persisted figure is added to it
    #: (:class:`~server.domain.limits.service.RequestUsage`).
    quota_created: bool = False
    #: How many of ``quota_used`` this replica counted and the store does not hold yet
    #: (a leased slice's counts, added to the store within a lease interval). The
    #: roll-up persists ``quota_used - quota_pending`` only: a figure the store holds, so
    #: that restoring a lost counter never counts a call twice.
    quota_pending: int = 0

    @property
    def allowed(self) -> bool:
        """Whether the call may proceed (possibly after ``wait_ms``)."""
        return self.outcome == Outcome.ALLOWED


@dataclass(frozen=True, slots=True)
class IpBlock:
    """An address blocked for repeated refusals."""

    ip: str
    reason: str
    since_ms: float
    until_ms: float


# --- quotas and monthly usage ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuotaUse:
    """One quota."""

    metric: str
    used: int
    limit: int


@dataclass(frozen=True, slots=True)
class Usage:
    """A user's quotas this month."""

    user_id: str
    tier: Tier
    period_start: datetime
    period_end: datetime
    quotas: list[QuotaUse]


@dataclass(frozen=True, slots=True)
class MonthlyRequests:
    """A user's requests in one calendar month (UTC)."""

    user_id: str
    #: The first day of the month.
    month: date
    requests: int


# --- refused calls ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ViolationRecord:
    """Refusals of one key in one minute."""

    id: str
    window_start: datetime
    subject: str
    ip_address: str
    method: str
    policy: str
    count: int


@dataclass(frozen=True, slots=True)
class Summary:
    """The most-refused subjects, methods and addresses over a window."""

    total: int
    subjects: list[tuple[str, int]]
    methods: list[tuple[str, int]]
    addresses: list[tuple[str, int]]


Key = tuple[float, str, str, str, str]
