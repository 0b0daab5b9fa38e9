"""Rate limits and quotas: the rules, independent of where their state lives.

Limits use GCRA (the generic cell rate algorithm). A bucket has an emission interval
``T`` (a minute divided by the rate) and a burst ``B``: from idle, ``B`` calls pass at
once, then one per ``T``; in any window of length ``W`` at most ``B + W / T`` pass. The
state is one number per key, the theoretical arrival time (TAT). A call that would pass
within ``max_wait`` reserves its slot and waits for it instead of being refused, which is
the bounded queue near the limit.

:func:`gcra` is the arithmetic. The Redis limiter runs the same arithmetic in a Lua script
(``server/storage/limiter.py``); a property test holds the two to the same answers.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

MINUTE_MS = 60_000.0
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


#: Differences below this many milliseconds count as equal: timestamps near 1.7e12 ms
#: carry float error around 2e-4 ms, and a caller exactly at the rate must never be refused
#: for it.
TOLERANCE_MS = 0.01


def stored(tat: float) -> float:
    """The TAT as kept in the store, rounded down to a microsecond exactly as the Lua script
    does it (down, so that rounding never makes a caller wait)."""
    return math.floor(tat * 1000) / 1000


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


def gcra(
    previous: float | None, now: float, bucket: Bucket, cost: int, max_wait: float
) -> GcraResult:
    """Admit ``cost`` units at ``now`` (ms) given the stored TAT ``previous``."""
    interval = bucket.interval_ms
    tat = now if previous is None else max(previous, now)
    new_tat = tat + interval * cost
    allow_at = new_tat - interval * bucket.burst
    diff = now - allow_at
    if diff >= -TOLERANCE_MS or -diff <= max_wait:
        wait = 0 if diff >= -TOLERANCE_MS else math.ceil(-diff)
        remaining = math.floor((max(diff, 0) + TOLERANCE_MS) / interval) if not wait else 0
        reset = math.ceil(new_tat - now)
        return GcraResult(
            allowed=True, tat=stored(new_tat), wait_ms=wait, retry_after_ms=0,
            remaining=remaining, reset_ms=reset,
        )  # fmt: skip
    return GcraResult(
        allowed=False, tat=tat, wait_ms=0, retry_after_ms=math.ceil(-diff), remaining=0,
        reset_ms=math.ceil(tat - now),
    )  # fmt: skip


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
    #: the month's first call. The persisted figure is added to it (:mod:`server.domain.usage`).
    quota_created: bool = False

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


class Limiter(Protocol):
    """Where limiter state lives: Redis, or this process."""

    @property
    def backend(self) -> str:
        """``redis`` or ``memory``."""
        ...

    async def decide(self, check: Check) -> Decision:
        """Answer one check, counting it unless it is a dry run or refused."""
        ...

    async def blocks(self) -> list[IpBlock]:
        """Addresses blocked now."""
        ...

    async def lift(self, ip: str) -> bool:
        """End a block early; whether there was one."""
        ...

    async def counter(self, key: str) -> int:
        """The value of a quota counter."""
        ...

    async def seed(self, key: str, amount: int) -> bool:
        """Add ``amount`` to a quota counter that exists (one the store lost and a call
        made again); whether it existed."""
        ...


@functools.lru_cache(maxsize=256)
def _policy_headers(bucket: Bucket) -> tuple[tuple[str, str], tuple[str, str]]:
    return (
        ("x-ratelimit-limit", str(bucket.limit)),
        ("ratelimit-policy", f'"default";q={bucket.limit};w=60;burst={bucket.burst}'),
    )


def rate_headers(decision: Decision, bucket: Bucket) -> list[tuple[str, str]]:
    """``X-RateLimit-*``, the IETF ``RateLimit-Policy``/``RateLimit`` fields and, on a
    refusal, ``Retry-After``, all in seconds."""
    reset = max(0, math.ceil(decision.reset_ms / 1000))
    remaining = decision.remaining
    limit, policy = _policy_headers(bucket)
    headers = [
        limit,
        ("x-ratelimit-remaining", str(remaining)),
        ("x-ratelimit-reset", str(reset)),
        policy,
        ("ratelimit", f'"default";r={remaining};t={reset}'),
    ]
    if not decision.allowed:
        headers.append(("retry-after", str(max(1, math.ceil(decision.retry_after_ms / 1000)))))
    return headers


def client_address(peer: str, forwarded_for: str, trusted: Sequence[Network]) -> str:
    """The caller's address: the peer, unless the peer is a trusted proxy, in which case
    the right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy."""
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop if _valid(hop) else peer
    return hops[0] if hops and _valid(hops[0]) else peer


def _valid(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


@functools.lru_cache(maxsize=4096)
def in_networks(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether ``address`` falls in any of ``networks`` (remembered per address)."""
    return _is_trusted(address, networks)


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    """The start of this calendar month (UTC) and of the next."""
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def month_tag(now: datetime) -> str:
    """The calendar month (UTC) as quota keys name it, ``YYYYMM``."""
    return f"{now.astimezone(UTC):%Y%m}"


def quota_key(user_id: str, metric: str, month: str) -> str:
    """The store key of a user's counter for the month tagged ``month``."""
    return f"quota:{metric}:{user_id}:{month}"


def parse_quota_key(key: str) -> tuple[str, str, str] | None:
    """The user id, metric and month tag of a :func:`quota_key` (``None`` if it is not one)."""
    parts = key.split(":")
    if len(parts) != 4 or parts[0] != "quota" or len(parts[3]) != 6 or not parts[3].isdigit():
        return None
    return parts[2], parts[1], parts[3]


def retry_key(subject: str, method: str, request_id: str, request: bytes) -> str:
    """What makes a call a retry of another: the same subject, method, request id and
    request (its deterministic serialization), hashed into one bounded key. Calls that
    share a request id but differ in anything else are distinct, and each one counts."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (subject, method, request_id):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(request)
    return f"{subject}:{digest.hexdigest()}"
