"""The tier catalogue: limits per tier (these defaults, overridden by settings) and the
features each tier unlocks.
"""

from __future__ import annotations

from collections.abc import Mapping

from server.domain.common.errors import InvalidArgument, NotFound
from server.domain.identity.model import Tier, TierInfo, TierLimits

GIB = 1024**3

HOUR = 3600
DEFAULT_TIERS: Mapping[str, TierLimits] = {
    "free": TierLimits(
        100,
        3,
        5,
        10_000,
        1 * GIB,
        20,
        max_watch_streams=5,
        max_agent_streams=5,
        stream_seconds_per_month=100 * HOUR,
    ),
    "premium": TierLimits(
        1_000,
        50,
        100,
        1_000_000,
        100 * GIB,
        200,
        max_watch_streams=50,
        max_agent_streams=100,
        stream_seconds_per_month=10_000 * HOUR,
    ),
    "enterprise": TierLimits(
        10_000, -1, -1, -1, -1, 2_000, max_watch_streams=1_000, max_agent_streams=1_000
    ),
}

FEATURES: Mapping[Tier, tuple[str, ...]] = {
    Tier.FREE: (),
    Tier.PREMIUM: ("endpoint_failover", "tunnel_sharing"),
    Tier.ENTERPRISE: ("endpoint_failover", "tunnel_sharing", "audit_export", "priority_support"),
}
DISPLAY_NAMES: Mapping[Tier, str] = {
    Tier.FREE: "Free",
    Tier.PREMIUM: "Premium",
    Tier.ENTERPRISE: "Enterprise",
}
#: Tiers a user may move to by themselves; the rest are assigned by billing administrators.
SELF_SERVICE = frozenset({Tier.FREE, Tier.PREMIUM})


class TierCatalog:
    """Read-only view of the tiers configured in settings."""

    def __init__(self, limits: Mapping[str, TierLimits]) -> None:
        self._tiers = {
            tier: TierInfo(
                tier, DISPLAY_NAMES[tier], limits[tier.value], FEATURES[tier], tier in SELF_SERVICE
            )
            for tier in Tier
        }

    def all(self) -> list[TierInfo]:
        """Every tier, lowest first."""
        return list(self._tiers.values())

    def limits(self, tier: Tier) -> TierLimits:
        """The limits of ``tier``."""
        return self._tiers[tier].limits

    def features(self, tier: Tier) -> tuple[str, ...]:
        """The features ``tier`` unlocks."""
        return self._tiers[tier].features

    def get(self, name: str) -> TierInfo:
        """A tier by resource name, ``tiers/{tier}``."""
        prefix, _, value = name.partition("/")
        if prefix != "tiers" or not value or "/" in value:
            raise InvalidArgument.single("name", "must look like tiers/{tier}")
        try:
            return self._tiers[Tier(value)]
        except ValueError:
            raise NotFound("tier", name) from None
