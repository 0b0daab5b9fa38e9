"""The GCRA limiter's laws (plan Property 9), on the in-process limiter.

The Redis limiter is held to the same answers in ``tests/integration/test_limiter.py``.
"""

from __future__ import annotations

import asyncio
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from server.domain.limits.model import Bucket, Check, Enforcement, Outcome
from server.domain.limits.rules import TOLERANCE_MS, gcra, rate_headers
from server.storage.limiter import MemoryLimiter

EPOCH = 1_764_000_000_000.0  # a realistic "now" in ms: float error is largest here
OPEN = Bucket(1_000_000, 1_000_000)  # the per-address limit, out of the way

buckets = st.builds(Bucket, limit=st.integers(1, 6000), burst=st.integers(1, 50))
#: Gaps between calls, in ms: bursts (0), near the rate, and idle stretches.
gaps = st.lists(
    st.one_of(st.just(0.0), st.floats(0, 5000, allow_nan=False), st.integers(0, 120_000)),
    min_size=1,
    max_size=120,
)


def check(bucket: Bucket, now: float, **extra: object) -> Check:
    return Check(
        subject="users/u", ip="10.0.0.1", subject_bucket=bucket, ip_bucket=OPEN, now_ms=now,
        **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def admitted_times(bucket: Bucket, times: list[float]) -> list[float]:
    limiter = MemoryLimiter()

    async def run() -> list[float]:
        return [now for now in times if (await limiter.decide(check(bucket, now))).allowed]

    return asyncio.run(run())


def timeline(start: float, steps: list[float]) -> list[float]:
    times, now = [], start
    for step in steps:
        now += float(step)
        times.append(now)
    return times


@settings(max_examples=300, deadline=None)
@given(bucket=buckets, steps=gaps, window=st.sampled_from([1.0, 1000.0, 60_000.0, 600_000.0]))
def test_no_window_admits_more_than_burst_plus_rate(
    bucket: Bucket, steps: list[float], window: float
) -> None:
    passed = admitted_times(bucket, timeline(EPOCH, steps))
    interval = bucket.interval_ms
    for i, start in enumerate(passed):
        inside = sum(1 for t in passed[i:] if t <= start + window)
        # n admitted calls need (n - burst) intervals; the slack covers float error only.
        bound = bucket.burst + (window + TOLERANCE_MS + inside * 0.001) / interval
        assert inside <= bound, (inside, bucket, window)


@settings(max_examples=300, deadline=None)
@given(
    bucket=buckets,
    extra=st.lists(st.floats(0, 10_000, allow_nan=False), min_size=1, max_size=200),
    start=st.floats(0, 4e12, allow_nan=False),
)
def test_a_caller_at_or_under_the_rate_is_never_refused(
    bucket: Bucket, extra: list[float], start: float
) -> None:
    steps = [bucket.interval_ms + e for e in extra]
    times = timeline(start, steps)
    assert admitted_times(bucket, times) == times


@settings(max_examples=200, deadline=None)
@given(bucket=buckets, steps=gaps)
def test_remaining_counts_down_to_a_refusal(bucket: Bucket, steps: list[float]) -> None:
    """``remaining`` promises that many more calls pass right now, and no more."""
    limiter = MemoryLimiter()

    async def run() -> None:
        for now in timeline(EPOCH, steps):
            decision = await limiter.decide(check(bucket, now))
            if not decision.allowed:
                continue
            for _ in range(decision.remaining):
                assert (await limiter.decide(check(bucket, now))).allowed
            refused = await limiter.decide(check(bucket, now))
            assert refused.outcome == Outcome.SUBJECT_LIMITED
            assert refused.retry_after_ms > 0

    asyncio.run(run())


def test_burst_then_one_per_interval() -> None:
    bucket = Bucket(limit=60, burst=3)  # one a second, three at once
    passed = admitted_times(bucket, [EPOCH] * 5 + [EPOCH + 999, EPOCH + 1000, EPOCH + 1001])
    assert passed == [EPOCH] * 3 + [EPOCH + 1000]


def test_a_refusal_says_when_to_retry_and_that_retry_passes() -> None:
    bucket = Bucket(limit=60, burst=1)
    first = gcra(None, EPOCH, bucket, 1, 0)
    refused = gcra(first.tat, EPOCH + 250, bucket, 1, 0)
    assert (refused.allowed, refused.retry_after_ms) == (False, 750)
    assert gcra(first.tat, EPOCH + 250 + refused.retry_after_ms, bucket, 1, 0).allowed


def test_a_short_wait_is_reserved_instead_of_refused() -> None:
    bucket = Bucket(limit=60, burst=1)
    first = gcra(None, EPOCH, bucket, 1, 0)
    queued = gcra(first.tat, EPOCH + 600, bucket, 1, max_wait=500)
    assert (queued.allowed, queued.wait_ms) == (True, 400)
    # The reserved slot is taken: the next caller waits behind it, or is refused.
    behind = gcra(queued.tat, EPOCH + 600, bucket, 1, max_wait=500)
    assert not behind.allowed
    assert behind.retry_after_ms == 1400


def test_cost_spends_several_units() -> None:
    bucket = Bucket(limit=60, burst=5)
    assert gcra(None, EPOCH, bucket, 5, 0).allowed
    assert not gcra(None, EPOCH, bucket, 6, 0).allowed


def test_scaling_tightens_but_never_to_zero() -> None:
    assert Bucket(100, 20).scaled(0.5) == Bucket(50, 10)
    assert Bucket(100, 20).scaled(1.0) == Bucket(100, 20)
    assert Bucket(3, 1).scaled(0.01) == Bucket(1, 1)


async def test_headers_on_admission_and_refusal() -> None:
    limiter = MemoryLimiter()
    bucket = Bucket(limit=60, burst=2)
    first = await limiter.decide(check(bucket, EPOCH))
    assert dict(rate_headers(first, bucket)) == {
        "ratelimit-policy": '"default";q=60;w=60;burst=2',
        "ratelimit": '"default";r=1;t=1',
    }
    await limiter.decide(check(bucket, EPOCH))
    refused = await limiter.decide(check(bucket, EPOCH + 100))
    headers = dict(rate_headers(refused, bucket))
    assert headers["retry-after"] == str(math.ceil(900 / 1000))
    assert headers["ratelimit"] == '"default";r=0;t=2'  # 1.9 s until the bucket is empty


async def test_quota_counts_once_per_request_id() -> None:
    limiter = MemoryLimiter()
    bucket = Bucket(limit=6000, burst=100)
    quota = {"quota_key": "quota:requests:u:202611", "quota_limit": 2, "quota_reset_ms": 1e6}
    first = await limiter.decide(check(bucket, EPOCH, dedupe="u:r1", **quota))
    retry = await limiter.decide(check(bucket, EPOCH + 1, dedupe="u:r1", **quota))
    assert (first.quota_used, retry.quota_used) == (1, 1)
    assert (await limiter.decide(check(bucket, EPOCH + 2, **quota))).quota_used == 2
    over = await limiter.decide(check(bucket, EPOCH + 3, **quota))
    assert over.outcome == Outcome.QUOTA_EXCEEDED
    # A retry of a counted request is not a new request: it still passes.
    assert (await limiter.decide(check(bucket, EPOCH + 4, dedupe="u:r1", **quota))).allowed


async def test_dry_runs_count_nothing() -> None:
    limiter = MemoryLimiter()
    bucket = Bucket(limit=60, burst=1)
    for offset in range(5):
        assert (
            await limiter.decide(check(bucket, EPOCH + offset, enforcement=Enforcement.DRY_RUN))
        ).allowed
    assert (await limiter.decide(check(bucket, EPOCH + 5))).allowed


async def test_an_address_that_keeps_violating_is_blocked_until_lifted() -> None:
    from server.domain.limits.model import BlockPolicy

    limiter = MemoryLimiter()
    tight = Bucket(limit=60, burst=1)
    policy = BlockPolicy(after=3, window_ms=60_000, duration_ms=900_000)

    def ip_check(now: float) -> Check:
        return Check(
            subject="ip/10.0.0.9", ip="10.0.0.9", subject_bucket=OPEN, ip_bucket=tight,
            block=policy, now_ms=now,
        )  # fmt: skip

    assert (await limiter.decide(ip_check(EPOCH))).allowed
    outcomes = [await limiter.decide(ip_check(EPOCH + i)) for i in range(1, 4)]
    assert [d.outcome for d in outcomes] == [Outcome.IP_LIMITED] * 3
    assert [d.blocked_now for d in outcomes] == [False, False, True]
    later = await limiter.decide(ip_check(EPOCH + 5000))
    assert later.outcome == Outcome.IP_BLOCKED
    assert later.retry_after_ms == 900_000 - 5000 + 3
    assert await limiter.lift("10.0.0.9")
    assert (await limiter.decide(ip_check(EPOCH + 5000))).allowed


async def test_an_authenticated_caller_is_neither_blocked_nor_limited_by_its_address() -> None:
    """Anonymous refusals block the address; a caller with credentials there is held to its
    own subject's limit, and its refusals never count towards a block."""
    from server.domain.limits.model import BlockPolicy

    limiter = MemoryLimiter()
    tight = Bucket(limit=60, burst=1)
    policy = BlockPolicy(after=2, window_ms=60_000, duration_ms=900_000)

    def from_address(now: float, **extra: object) -> Check:
        values: dict[str, object] = {
            "subject": "ip/10.0.0.9", "ip": "10.0.0.9", "subject_bucket": OPEN,
            "ip_bucket": tight, "block": policy, "now_ms": now, **extra,
        }  # fmt: skip
        return Check(**values)  # type: ignore[arg-type]

    assert (await limiter.decide(from_address(EPOCH))).allowed
    refused = [await limiter.decide(from_address(EPOCH + i)) for i in (1, 2)]
    assert [d.blocked_now for d in refused] == [False, True]
    assert (await limiter.decide(from_address(EPOCH + 3))).outcome == Outcome.IP_BLOCKED
    signed_in = {"subject": "users/u", "subject_bucket": Bucket(60, 2), "by_address": False}
    served = [await limiter.decide(from_address(EPOCH + 4 + i, **signed_in)) for i in range(3)]
    # Its own burst of two, then its own limit: never the address's block or bucket.
    assert [d.outcome for d in served] == [Outcome.ALLOWED] * 2 + [Outcome.SUBJECT_LIMITED]
    assert not served[2].blocked_now
    assert await limiter.lift("10.0.0.9")
    # Its refusals did not count towards a block, nor its calls towards the address's limit.
    assert (await limiter.decide(from_address(EPOCH + 2000))).allowed
    assert (await limiter.decide(from_address(EPOCH + 2001))).outcome == Outcome.IP_LIMITED
    assert not (await limiter.decide(from_address(EPOCH + 2002, **signed_in))).blocked_now


async def test_a_counter_made_again_says_so_and_takes_the_persisted_figure() -> None:
    limiter = MemoryLimiter()
    bucket = Bucket(limit=6000, burst=100)
    quota = {"quota_key": "quota:requests:u:202611", "quota_limit": 10, "quota_reset_ms": 1e6}
    first = await limiter.decide(check(bucket, EPOCH, **quota))
    second = await limiter.decide(check(bucket, EPOCH + 1, **quota))
    assert (first.quota_created, second.quota_created) == (True, False)
    retry = await limiter.decide(check(bucket, EPOCH + 2, dedupe="u:r", **quota))
    again = await limiter.decide(check(bucket, EPOCH + 3, dedupe="u:r", **quota))
    assert (retry.quota_used, again.quota_used, again.quota_created) == (3, 3, False)
    assert await limiter.seed("quota:requests:u:202611", 6)
    assert (await limiter.decide(check(bucket, EPOCH + 4, **quota))).quota_used == 10
    refused = await limiter.decide(check(bucket, EPOCH + 5, **quota))
    assert refused.outcome == Outcome.QUOTA_EXCEEDED
    assert not await limiter.seed("quota:requests:other:202611", 6), "never makes a counter"
    assert await limiter.counter("quota:requests:other:202611") == 0


def test_only_a_genuine_retry_has_the_same_retry_key() -> None:
    from server.domain.limits.rules import retry_key

    base = ("users/u", "/tunnelplane.v1.UserService/GetUser", "req-1", b"\n\x08users/me")
    assert retry_key(*base) == retry_key(*base)
    for i, other in enumerate(("apiKeys/k", "/tunnelplane.v1.UserService/ListActivity", "req-2")):
        changed = list(base)
        changed[i] = other
        assert retry_key(*changed) != retry_key(*base)  # type: ignore[arg-type]
    assert retry_key(*base[:3], b"\n\x0busers/other") != retry_key(*base)
    # Parts cannot run into each other: "a" + "bc" is not "ab" + "c".
    assert retry_key("a", "bc", "r", b"") != retry_key("ab", "c", "r", b"")
    assert len(retry_key(*base[:3], b"x" * 100_000)) == len(retry_key(*base))


@given(limit=st.integers(10**5, 10**12), burst=st.integers(1, 10**9), cost=st.integers(1, 3))
def test_remaining_never_exceeds_what_the_burst_leaves(limit: int, burst: int, cost: int) -> None:
    """A very fast bucket (an interval far below the tolerance) still counts exactly: a
    fresh bucket has ``burst - cost`` left after the first call, never more."""
    bucket = Bucket(limit=limit, burst=burst)
    decision = asyncio.run(MemoryLimiter().decide(check(bucket, EPOCH, cost=cost)))
    assert 0 <= decision.remaining <= max(0, burst - cost)
    if cost <= burst:
        assert decision.allowed
        assert decision.remaining == burst - cost
