"""A replica's leases: slices of subjects' budgets taken from Redis and spent here.

Deciding every call in Redis costs a round trip inside a busy event loop. Instead, when a
signed-in caller's call goes to Redis, the script (:mod:`server.storage.limiter_script`)
may also grant this replica a *slice*: it advances the subject's TAT by up to ``k - 1``
more emission intervals, as if that many more calls had been admitted then, and allows up
to ``k - 1`` more monthly counts. The replica spends them on the subject's next calls
without a round trip, until the slice runs out or expires (``ttl``), then asks again.
Calls counted here reach the monthly counter with the next run of the script for that
counter or, at the latest, one ``ttl`` after they were counted (a timer).

**Over-admission.** A token is admitted by the global bucket when it is leased; the
replica spends it later. So in any window of length ``W`` the replicas together admit at
most what the bucket allows, ``B + W / T``, plus the tokens the replicas held unspent when
the window began: each holds at most one slice of at most ``k - 1`` tokens (a slice is
asked for when the last one is half spent, spent, expired or too small, and what was left
of it is counted in: the new grant tops it up to at most ``k - 1``). With ``R``
replicas: at most ``R * (k - 1)`` calls beyond the exact limit, and likewise at most
``R * (k - 1)`` monthly counts beyond the quota (a grant never exceeds what is left of the
quota when it is made). ``k`` (:func:`slice_cap`) is at most
a tenth of the burst (so ``R`` replicas exceed the limit by at most ``R / 10`` of the
burst), what the rate refills in one ``ttl``, and ``maximum`` (``TP_RATE_LEASE_MAX``);
where that is 1 (the default free tier: a burst of 20, 100 calls a minute), no slice is
ever granted and every call is decided in Redis exactly as the in-process limiter
decides it.

**Renewal ahead of need.** The call that finds less than half of its subject's slice
left is decided in Redis and asks for the top-up, while the subject's other calls keep
spending what is left: with many calls in flight, none of them waits for a renewal unless
the slice runs out before the answer comes back.

**Unspent tokens are not returned**: giving credit back to a bucket is only safe when no
refill happened meanwhile, which a replica cannot know. To waste little, a slice's size
adapts to the demand this replica sees: it starts at one (the call itself), doubles when
a slice was spent within half its ``ttl``, and falls to what was spent when a slice
expired.

**Headers.** ``Remaining`` on a call spent here is the global bucket's remaining when the
slice was granted plus what is left of the slice: other replicas' calls since are not
seen, nor the refill since (both bounded by a slice, and a ``ttl``). ``Reset`` is the
time until the bucket is full again as of the grant.

**Refusals** are remembered too: when Redis refuses a leasable call because the
subject's bucket is empty, every call of the same or a greater cost is refused until the
retry time it gave (less the queue's longest wait), since another replica can only make
the bucket emptier; a refusal because the month's quota is spent is remembered for one
``ttl`` at most. Both are exact (nothing is admitted that Redis would refuse): a subject
hammering past its limit costs Redis one script run per retry interval, not one per call.

Not leased, always decided in Redis: anonymous calls (the address's block and limit must
count every call at once), calls with a retry key (whether a retry was counted is
known only to Redis), and dry runs (they count nothing).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from server.domain.limits.model import Bucket, Check, Decision, Enforcement, Outcome

#: A slice is at most this share of a bucket's burst.
SHARE = 10
#: Leases and counter views kept before expired ones are dropped.
MAX_ENTRIES = 100_000


@functools.lru_cache(maxsize=1024)
def slice_cap(bucket: Bucket, ttl_ms: float, maximum: int) -> int:
    """The largest slice (``k``, the calls one grant covers) of ``bucket``: at most a tenth
    of its burst, what its rate refills in one lease interval, and ``maximum``; at least
    one."""
    refill = int(ttl_ms / bucket.interval_ms)
    return max(1, min(maximum, bucket.burst // SHARE, refill))


def leasable(check: Check) -> bool:
    """Whether ``check`` may be decided from a slice (see the module's docstring)."""
    return not check.by_address and not check.dedupe and check.enforcement != Enforcement.DRY_RUN


@dataclass(slots=True)
class Lease:
    """A slice of one subject's bucket."""

    bucket: Bucket
    #: Tokens left to spend.
    tokens: int
    #: The global bucket's remaining calls just after the grant.
    remaining: int
    #: When (ms) the global bucket is full again, as of the grant.
    reset_at: float
    granted_at: float
    expires_at: float
    #: The calls the grant was meant to cover, and the tokens spent from it so far.
    size: int
    spent: int = 0


@dataclass(slots=True)
class Refusal:
    """A refusal of one subject's calls, made at ``at`` (ms), that holds until ``until``."""

    bucket: Bucket
    cost: int
    quota_limit: int
    decision: Decision
    at: float
    until: float

    def holds(self, check: Check, now: float) -> bool:
        """Whether ``check`` is refused by it at ``now``."""
        return (
            now < self.until
            and check.cost >= self.cost
            and self.bucket == check.subject_bucket
            and self.quota_limit == check.quota_limit
        )

    def answer(self, now: float) -> Decision:
        """The refusal as of ``now``."""
        elapsed = math.ceil(now - self.at)
        return replace(
            self.decision,
            retry_after_ms=max(1, self.decision.retry_after_ms - elapsed),
            reset_ms=max(0, self.decision.reset_ms - elapsed),
        )


@dataclass(slots=True)
class Counter:
    """One monthly counter as this replica sees it."""

    #: Its value in Redis after the last script run that touched it.
    known: int
    #: Counted here, not yet sent to Redis.
    pending: int = 0
    #: Counted here, sent to Redis, the answer not back yet (taken out of ``pending``
    #: when sent, so that two sends never carry the same counts).
    sending: int = 0
    #: Counts this replica may still make without asking, until ``expires_at``.
    allowance: int = 0
    limit: int = -1
    expires_at: float = -math.inf
    #: When (ms) the month ends (the counter's expiry is taken from it).
    month_end: float = 0.0
    #: A flush made the counter again: the next decision about it says so.
    created: bool = False
    #: A timer will flush ``pending``.
    due: bool = False


class Leases:
    """This replica's slices and monthly counters (no I/O; the Redis limiter runs the
    scripts and tells this table what they granted)."""

    def __init__(self, ttl_ms: float, maximum: int, on_pending: Callable[[str], None]) -> None:
        self.ttl_ms = ttl_ms
        self.maximum = maximum
        self._on_pending = on_pending
        self._leases: dict[str, Lease] = {}
        self._counters: dict[str, Counter] = {}
        self._refusals: dict[str, Refusal] = {}

    def spend(self, check: Check, now: float) -> Decision | None:
        """Decide ``check`` from this replica's slice, or from a refusal Redis made that
        still holds; ``None`` if it must go to Redis."""
        refusal = self._refusals.get(check.subject)
        if refusal is not None:
            if refusal.holds(check, now):
                return refusal.answer(now)
            if now >= refusal.until:
                del self._refusals[check.subject]
        lease = self._leases.get(check.subject)
        if (
            lease is None
            or lease.tokens < check.cost
            or now >= lease.expires_at
            or lease.bucket != check.subject_bucket
        ):
            return None
        used, created, local = -1, False, 0
        if check.quota_key and check.quota_limit >= 0:
            counter = self._counters.get(check.quota_key)
            if (
                counter is None
                or counter.allowance < 1
                or now >= counter.expires_at
                or counter.limit != check.quota_limit
            ):
                return None
            counter.allowance -= 1
            counter.pending += 1
            local = counter.pending + counter.sending
            used, created, counter.created = counter.known + local, counter.created, False
            if not counter.due:
                counter.due = True
                self._on_pending(check.quota_key)
        lease.tokens -= check.cost
        lease.spent += check.cost
        reset = max(0, math.ceil(lease.reset_at - now))
        return Decision(
            Outcome.ALLOWED, 0, 0, lease.tokens + lease.remaining, reset, used,
            quota_created=created, quota_pending=local,
        )  # fmt: skip

    def running_low(self, check: Check, now: float) -> bool:
        """Whether ``check``'s subject holds a live slice with less than half of it left:
        the call that finds it so asks Redis for the next slice (its own call decided
        there), while the subject's other calls go on spending what is left, instead of
        all of them waiting for the renewal once the slice is spent."""
        lease = self._leases.get(check.subject)
        return (
            lease is not None
            and lease.size > 1
            and 0 < lease.tokens * 2 < lease.size
            and now < lease.expires_at
            and lease.bucket == check.subject_bucket
        )

    def wants(self, check: Check, now: float) -> tuple[int, int, int]:
        """The slice to ask for with ``check``: its size, the tokens and the monthly counts
        to ask for beyond the call itself (what is left of the current slice counts)."""
        lease = self._leases.get(check.subject)
        carried = 0
        if lease is None or lease.bucket != check.subject_bucket:
            size = 1
        elif now >= lease.expires_at:
            size = max(1, lease.spent)
        else:
            carried = lease.tokens
            fast = now - lease.granted_at < self.ttl_ms / 2
            size = lease.size * 2 if fast else lease.size
        size = min(size, slice_cap(check.subject_bucket, self.ttl_ms, self.maximum))
        counted = bool(check.quota_key) and check.quota_limit >= 0
        return size, max(0, size - check.cost - carried), max(0, size - 1) if counted else 0

    def granted(
        self, check: Check, now: float, size: int, decision: Decision, extra: int, allowance: int
    ) -> None:
        """Record what a script run for a leasable ``check`` (asked with ``size``) granted."""
        lease = self._leases.get(check.subject)
        carried = 0
        if lease is not None and lease.bucket == check.subject_bucket and now < lease.expires_at:
            carried = lease.tokens
        if not decision.allowed:
            self._refused(check, now, decision)
            return
        self._refusals.pop(check.subject, None)
        if len(self._leases) >= MAX_ENTRIES:
            self._prune(now)
        self._leases[check.subject] = Lease(
            check.subject_bucket, carried + extra, decision.remaining, now + decision.reset_ms,
            now, now + self.ttl_ms, size,
        )  # fmt: skip
        if check.quota_key and check.quota_limit >= 0:
            counter = self._counter(check, now)
            counter.allowance, counter.limit = allowance, check.quota_limit
            counter.expires_at = now + self.ttl_ms

    def _refused(self, check: Check, now: float, decision: Decision) -> None:
        """Remember a refusal for as long as Redis would repeat it (module docstring)."""
        if decision.outcome == Outcome.SUBJECT_LIMITED:
            span = decision.retry_after_ms - check.max_wait_ms
        elif decision.outcome == Outcome.QUOTA_EXCEEDED:
            span = min(decision.retry_after_ms, self.ttl_ms)
        else:
            return
        if span <= 0:
            return
        if len(self._refusals) >= MAX_ENTRIES:
            self._prune(now)
        self._refusals[check.subject] = Refusal(
            check.subject_bucket, check.cost, check.quota_limit, decision, now, now + span
        )

    def pending(self, key: str) -> int:
        """Counts of ``key`` made here whose answer from Redis is not back yet."""
        counter = self._counters.get(key)
        return 0 if counter is None else counter.pending + counter.sending

    def take(self, key: str) -> int:
        """The counts of ``key`` to send with a script run now (they are in flight until
        :meth:`flushed`, :meth:`counted_in_redis` or :meth:`returned`)."""
        counter = self._counters.get(key)
        if counter is None or not counter.pending:
            return 0
        sent, counter.pending = counter.pending, 0
        counter.sending += sent
        return sent

    def returned(self, key: str, sent: int) -> None:
        """A send of ``sent`` counts of ``key`` failed: they wait for the next one."""
        counter = self._counters.get(key)
        if counter is not None and sent:
            counter.sending -= sent
            counter.pending += sent

    def flushed(self, check: Check, now: float, sent: int, decision: Decision) -> Decision:
        """A script run for ``check`` that carried ``sent`` counts answered ``decision``:
        note the counter, and say what this replica sees of it."""
        if not check.quota_key or (decision.quota_used < 0 and not sent):
            return decision
        counter = self._counter(check, now)
        counter.sending -= sent
        if decision.quota_used < 0:
            return decision
        counter.known = decision.quota_used
        created, counter.created = decision.quota_created or counter.created, False
        local = counter.pending + counter.sending
        if not local and created == decision.quota_created:
            return decision
        return Decision(
            decision.outcome, decision.wait_ms, decision.retry_after_ms, decision.remaining,
            decision.reset_ms, decision.quota_used + local, decision.blocked_now,
            created, local,
        )  # fmt: skip

    def counted_in_redis(self, key: str, sent: int, value: int, created: bool) -> None:
        """A timer's flush of ``sent`` counts of ``key`` left the counter at ``value``."""
        counter = self._counters.get(key)
        if counter is None:
            return
        counter.sending -= sent
        counter.known = value
        counter.due = False
        if created:
            # Redis had lost it: the next call asks, and its decision says the counter was
            # made again, so that the persisted figure is added.
            counter.created, counter.allowance = True, 0

    def reschedule(self, key: str) -> bool:
        """After a timer's flush: whether counts are still pending (a new timer is due)."""
        counter = self._counters.get(key)
        if counter is None or not counter.pending:
            if counter is not None:
                counter.due = False
            return False
        counter.due = True
        return True

    def month_end(self, key: str) -> float:
        """When (ms since the epoch) the month of ``key`` ends, as its calls said."""
        counter = self._counters.get(key)
        return 0.0 if counter is None else counter.month_end

    def revoke(self, key: str) -> None:
        """No more counts of ``key`` without asking (its figure changed behind us)."""
        counter = self._counters.get(key)
        if counter is not None:
            counter.allowance = 0

    def pending_keys(self) -> list[str]:
        """Every counter with counts not yet in Redis."""
        return [key for key, counter in self._counters.items() if counter.pending]

    def _counter(self, check: Check, now: float) -> Counter:
        counter = self._counters.get(check.quota_key)
        if counter is None:
            if len(self._counters) >= MAX_ENTRIES:
                self._prune(now)
            counter = self._counters[check.quota_key] = Counter(known=0)
        counter.month_end = now + check.quota_reset_ms
        return counter

    def _prune(self, now: float) -> None:
        """Drop expired slices and idle counters (never counts still pending)."""
        for subject in [s for s, lease in self._leases.items() if now >= lease.expires_at]:
            del self._leases[subject]
        for subject in [s for s, refusal in self._refusals.items() if now >= refusal.until]:
            del self._refusals[subject]
        idle = [
            k
            for k, c in self._counters.items()
            if not c.pending and not c.sending and now >= c.expires_at
        ]
        for key in idle:
            del self._counters[key]
        while len(self._leases) >= MAX_ENTRIES:
            del self._leases[next(iter(self._leases))]
        while len(self._refusals) >= MAX_ENTRIES:
            del self._refusals[next(iter(self._refusals))]
