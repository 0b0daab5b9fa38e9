"""Monthly quotas: a user's use of each, against their tier's limits.

Requests are counted by the rate limiter, in the same decision that admits a call.
Transfer, tunnels and concurrent connections are counted by the tunnel features; until
a user has tunnels they are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from server.domain.clock import Clock
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

    def __init__(self, limiter: Limiter, tiers: TierCatalog, clock: Clock) -> None:
        self._limiter = limiter
        self._tiers = tiers
        self._clock = clock

    async def usage(self, user_id: str, tier: Tier) -> Usage:
        """The user's use of every quota this month."""
        now = self._clock.now()
        start, end = month_bounds(now)
        limits = self._tiers.get(f"tiers/{tier.value}").limits
        requests = await self._limiter.counter(quota_key(user_id, "requests", month_tag(now)))
        quotas = [
            QuotaUse("requests", requests, limits.requests_per_month),
            QuotaUse("transfer_bytes", 0, limits.transfer_bytes_per_month),
            QuotaUse("tunnels", 0, limits.max_tunnels),
            QuotaUse("concurrent_connections", 0, limits.max_concurrent_connections),
        ]
        return Usage(user_id, tier, start, end, quotas)
