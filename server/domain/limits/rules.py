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

import functools
import hashlib
import ipaddress
import math
from collections.abc import Sequence
from datetime import UTC, date, datetime

from server.domain.common.addresses import Network
from server.domain.limits.model import Bucket, Decision, GcraResult, Key, MonthlyRequests

# --- GCRA ------------------------------------------------------------------------------

#: Differences below this many milliseconds count as equal: timestamps near 1.7e12 ms
#: carry float error around 2e-4 ms, and a caller exactly at the rate must never be refused
#: for it.
TOLERANCE_MS = 0.01


def stored(tat: float) -> float:
    """The TAT as kept in the store, rounded down to a microsecond exactly as the Lua script
    does it (down, so that rounding never makes a caller wait)."""
    return math.floor(tat * 1000) / 1000


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
        # Never more than the burst leaves: the tolerance alone would add TOLERANCE_MS /
        # interval calls to a very fast bucket's count.
        remaining = (
            max(0, min(math.floor((max(diff, 0) + TOLERANCE_MS) / interval), bucket.burst - cost))
            if not wait
            else 0
        )
        reset = math.ceil(new_tat - now)
        return GcraResult(
            allowed=True, tat=stored(new_tat), wait_ms=wait, retry_after_ms=0,
            remaining=remaining, reset_ms=reset,
        )  # fmt: skip
    return GcraResult(
        allowed=False, tat=tat, wait_ms=0, retry_after_ms=math.ceil(-diff), remaining=0,
        reset_ms=math.ceil(tat - now),
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _policy_header(bucket: Bucket) -> tuple[str, str]:
    return ("ratelimit-policy", f'"default";q={bucket.limit};w=60;burst={bucket.burst}')


def rate_headers(
    decision: Decision, bucket: Bucket, *, refused: bool | None = None
) -> list[tuple[str, str]]:
    """The IETF ``RateLimit-Policy``/``RateLimit`` fields and, on a refusal,
    ``Retry-After``, all in seconds. ``refused`` overrides the decision's verdict (an exempt
    caller over its limit is answered, not refused: no ``Retry-After``).

    Only the IETF pair travels as gRPC metadata: it carries limit, remaining and reset, and
    every entry costs each call (see bench/README.md). The gateway derives the
    ``X-RateLimit-*`` trio from it for HTTP (``gateway.headers``)."""
    reset = max(0, math.ceil(decision.reset_ms / 1000))
    headers = [_policy_header(bucket), ("ratelimit", f'"default";r={decision.remaining};t={reset}')]
    if not decision.allowed if refused is None else refused:
        headers.append(("retry-after", str(max(1, math.ceil(decision.retry_after_ms / 1000)))))
    return headers


# --- callers' addresses ----------------------------------------------------------------


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


# --- monthly quotas and request usage --------------------------------------------------


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


#: The quota these counts are of.
METRIC = "requests"


def month_start(tag: str) -> date:
    """The first day of the month a quota key's ``YYYYMM`` tag names."""
    return date(int(tag[:4]), int(tag[4:]), 1)


def rows_of(seen: dict[str, int]) -> list[MonthlyRequests]:
    """The request counters among ``seen`` (quota key -> value) as rows."""
    rows = []
    for key, used in seen.items():
        parsed = parse_quota_key(key)
        if parsed is not None and parsed[1] == METRIC:
            rows.append(MonthlyRequests(parsed[0], month_start(parsed[2]), used))
    return rows


# --- refused calls ---------------------------------------------------------------------


def record_id(key: Key) -> str:
    """A stable id per aggregation key (the upsert target)."""
    text = "|".join(str(part) for part in key)
    return hashlib.blake2s(text.encode(), digest_size=12).hexdigest()
