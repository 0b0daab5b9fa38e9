"""Limits' use cases: a user's quotas this month, the request counts waiting for the
monthly roll-up, and the log of refused calls, aggregated before it is written.

Requests are counted by the rate limiter, in the same decision that admits a call, and
rolled up to the database (:class:`RequestUsage`): the figure reported is the larger of
the limiter's counter and the persisted one, so a limiter that lost its counters never
makes the month look emptier than the last roll-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

from server.domain.common.clock import Clock
from server.domain.common.listing import FilterField, Lister, ListSpec, OrderKey, Page
from server.domain.identity.model import Tier
from server.domain.identity.tiers import TierCatalog
from server.domain.limits.model import Decision, Key, QuotaUse, Summary, Usage, ViolationRecord
from server.domain.limits.ports import Limiter
from server.domain.limits.rules import (
    METRIC,
    month_bounds,
    month_start,
    month_tag,
    parse_quota_key,
    quota_key,
    record_id,
    rows_of,
)
from server.domain.unit_of_work import UnitOfWorkFactory

# --- quotas ----------------------------------------------------------------------------
#
# Transfer comes from the tunnels' agents' reports (per-day usage), tunnels from the tunnels
# a user has, concurrent connections from what their connected agents last reported.


class QuotaService:
    """Reads usage against quota."""

    def __init__(
        self, limiter: Limiter, tiers: TierCatalog, clock: Clock, uow: UnitOfWorkFactory
    ) -> None:
        self._uow = uow
        self._limiter = limiter
        self._tiers = tiers
        self._clock = clock

    async def usage(self, user_id: str, tier: Tier) -> Usage:
        """The user's use of every quota this month."""
        now = self._clock.now()
        start, end = month_bounds(now)
        limits = self._tiers.get(f"tiers/{tier.value}").limits
        requests = await self._limiter.counter(quota_key(user_id, "requests", month_tag(now)))
        async with self._uow(lag_tolerant=True) as uow:
            requests = max(requests, await uow.request_usage.get(user_id, start.date()))
            tunnels = await uow.tunnels.count(user_id)
            last_day = (end - timedelta(days=1)).date()
            traffic = await uow.agents.user_traffic(user_id, start.date(), last_day)
            transfer, active, stream_seconds = traffic
        quotas = [
            QuotaUse("requests", requests, limits.requests_per_month),
            QuotaUse("transfer_bytes", transfer, limits.transfer_bytes_per_month),
            QuotaUse("stream_seconds", stream_seconds, limits.stream_seconds_per_month),
            QuotaUse("tunnels", tunnels, limits.max_tunnels),
            QuotaUse("concurrent_connections", active, limits.max_concurrent_connections),
        ]
        return Usage(user_id, tier, start, end, quotas)


# --- monthly request usage -------------------------------------------------------------
#
# The limiter's counters (in Redis, or in this process) hold the live figure, and every
# decision that counts a call reports the counter's new value. RequestUsage keeps the
# highest value each counter reached since the last roll-up (a dict update per call, no
# I/O); the roll-up (server/workers/usage.py) writes those figures as absolute counts that
# a row only ever rises to. A roll-up that runs twice, or two replicas rolling up the same
# counter at once, therefore never count anything twice. When the limiter loses a counter
# (Redis restarted or evicted it, or this process restarted), the next call makes it again
# and the decision says so; the persisted figure is then added to it. Losing the limiter's
# state loses at most one roll-up interval.


class RequestUsage:
    """The figures waiting for the next roll-up, the roll-up's write, and the restoring of
    counters the limiter lost."""

    def __init__(
        self, uow: UnitOfWorkFactory, limiter: Limiter, clock: Clock, log: logging.Logger
    ) -> None:
        self._uow = uow
        self._limiter = limiter
        self._clock = clock
        self._log = log
        self._seen: dict[str, int] = {}
        self._restoring: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Counters waiting for the next roll-up."""
        return len(self._seen)

    def counted(self, key: str, decision: Decision) -> None:
        """Note the value of the counter ``key`` that ``decision`` reports (per call: keep
        this cheap). A counter the call made is restored in the background."""
        self._note(key, decision.quota_used - decision.quota_pending)
        if decision.quota_created:
            self._restore_soon(key)

    def _note(self, key: str, used: int) -> None:
        if used > self._seen.get(key, 0):
            self._seen[key] = used

    def _restore_soon(self, key: str) -> None:
        task = asyncio.create_task(self.restore(key))
        self._restoring.add(task)
        task.add_done_callback(self._restoring.discard)

    async def restore(self, key: str) -> None:
        """Add the persisted figure to the counter ``key``, which a call has just made.
        Nothing persisted (the month's first call): nothing to add."""
        parsed = parse_quota_key(key)
        if parsed is None or parsed[1] != METRIC:
            return
        user_id, _, tag = parsed
        try:
            async with self._uow(readonly=True) as uow:
                persisted = await uow.request_usage.get(user_id, month_start(tag))
            if persisted and await self._limiter.seed(key, persisted):
                self._log.info(
                    "monthly request count restored",
                    extra={"user_id": user_id, "month": tag, "requests": persisted},
                )
        except Exception:  # noqa: BLE001 - a background task: logged, the next loss retries
            self._log.exception("could not restore a monthly request count")

    async def settled(self) -> None:
        """Add the counts this replica made under leases to the store (restoring the
        counters that flush finds lost), and wait for the restores under way."""
        await self._flush_counts()
        while self._restoring:
            await asyncio.gather(*self._restoring, return_exceptions=True)

    async def _flush_counts(self) -> None:
        for key, (value, created) in (await self._limiter.flush_counts()).items():
            self._note(key, value)
            if created:
                self._restore_soon(key)

    async def flush(self) -> int:
        """Persist the figures noted since the last flush, after adding this replica's
        leased counts to the store; the number of rows. On a failed write they stay
        noted, for the next flush."""
        await self._flush_counts()
        seen, self._seen = self._seen, {}
        rows = rows_of(seen)
        if not rows:
            return 0
        try:
            async with self._uow() as uow:
                await uow.request_usage.raise_to(rows, self._clock.now())
        except BaseException:
            for key, used in seen.items():
                if used > self._seen.get(key, 0):
                    self._seen[key] = used
            raise
        return len(rows)


# --- refused calls ---------------------------------------------------------------------
#
# Refusals are aggregated in memory per minute, subject, address, method and policy, and
# written every few seconds as upserts of counts, so an attack costs the database a bounded
# number of rows per interval, not one per refused call. Past a cap on distinct keys per
# interval, refusals are folded into one ``*`` row per method and policy. The first refusal
# of each key per interval is also logged.

RETENTION = timedelta(days=30)
MAX_KEYS = 2_000
OTHER = "*"

LIST_SPEC = ListSpec(
    filter_fields={
        "subject": FilterField("string"),
        "ip_address": FilterField("string"),
        "method": FilterField("string"),
        "policy": FilterField("string"),
        "window_start": FilterField("timestamp"),
    },
    order_fields=frozenset({"window_start"}),
    default_order=(OrderKey("window_start", descending=True),),
)


class ViolationLog:
    """Counts refusals and writes them in aggregate."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        lister: Lister,
        clock: Clock,
        log: logging.Logger,
        *,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._uow = uow
        self._lister = lister
        self._clock = clock
        self._log = log
        self._max_keys = max_keys
        self._counts: Counter[Key] = Counter()

    def record(self, subject: str, ip: str, method: str, policy: str) -> None:
        """Count one refusal (no I/O)."""
        minute = (self._clock.time() // 60) * 60
        key: Key = (minute, subject, ip, method, policy)
        if key not in self._counts:
            if len(self._counts) >= self._max_keys:
                key = (minute, OTHER, OTHER, method, policy)
            else:
                self._log.warning(
                    "rate limit refusal",
                    extra={"subject": subject, "client_ip": ip, "method": method, "policy": policy},
                )
        self._counts[key] += 1

    @property
    def pending(self) -> int:
        """Distinct keys waiting to be written."""
        return len(self._counts)

    async def flush(self) -> int:
        """Write what was counted since the last flush; returns how many rows."""
        counts, self._counts = self._counts, Counter()
        records = [
            ViolationRecord(
                record_id(key),
                datetime.fromtimestamp(key[0], UTC),
                key[1],
                key[2],
                key[3],
                key[4],
                count,
            )
            for key, count in counts.items()
        ]
        if records:
            async with self._uow() as uow:
                await uow.violations.add_counts(records)
        return len(records)

    async def prune(self) -> None:
        """Drop the entries past retention."""
        async with self._uow() as uow:
            await uow.violations.delete_before(self._clock.now() - RETENTION)

    async def list(self, *, page_size: int, page_token: str, filter: str) -> Page[ViolationRecord]:  # noqa: A002
        """A page of aggregated refusals, newest first."""
        query = self._lister.query(
            LIST_SPEC, page_size=page_size, page_token=page_token, filter=filter
        )
        async with self._uow(lag_tolerant=True) as uow:
            rows = await uow.violations.list(query)
        return self._lister.page(query, rows, lambda r: (r.window_start, r.id))

    async def summarize(self, window: timedelta, top: int) -> Summary:
        """Totals and the top keys since ``window`` ago."""
        since = self._clock.now() - window
        async with self._uow(lag_tolerant=True) as uow:
            return Summary(
                await uow.violations.total(since),
                await uow.violations.top("subject", since, top),
                await uow.violations.top("method", since, top),
                await uow.violations.top("ip_address", since, top),
            )
