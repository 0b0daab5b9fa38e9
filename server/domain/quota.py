"""Monthly quotas: a user's use of each, against their tier's limits.

Requests are counted by the rate limiter, in the same decision that admits a call, and
rolled up to the database (:mod:`server.domain.usage`): the figure reported is the larger
of the limiter's counter and the persisted one, so a limiter that lost its counters never
makes the month look emptier than the last roll-up.
Transfer comes from the tunnels' agents' reports (per-day usage), tunnels from the tunnels
a user has, concurrent connections from what their connected agents last reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from server.domain.clock import Clock
from server.domain.ports import UnitOfWorkFactory
from server.domain.principal import Tier
from server.domain.ratelimit import Limiter, month_bounds, month_tag, quota_key
from server.domain.tiers import TierCatalog


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
        async with self._uow(readonly=True) as uow:
            requests = max(requests, await uow.request_usage.get(user_id, start.date()))
            tunnels = await uow.tunnels.count(user_id)
            last_day = (end - timedelta(days=1)).date()
            transfer, active = await uow.agents.user_traffic(user_id, start.date(), last_day)
        quotas = [
            QuotaUse("requests", requests, limits.requests_per_month),
            QuotaUse("transfer_bytes", transfer, limits.transfer_bytes_per_month),
            QuotaUse("tunnels", tunnels, limits.max_tunnels),
            QuotaUse("concurrent_connections", active, limits.max_concurrent_connections),
        ]
        return Usage(user_id, tier, start, end, quotas)
