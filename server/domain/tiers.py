"""The tier catalogue: limits per tier (from settings) and the features each unlocks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from server.domain.principal import Tier
from server.errors import InvalidArgument, NotFound
from server.settings import TierLimits

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


@dataclass(frozen=True, slots=True)
class TierInfo:
    """One tier with its limits and features."""

    tier: Tier
    display_name: str
    limits: TierLimits
    features: tuple[str, ...]
    self_service: bool


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
