"""What ``AdminService.GetSystemStatus`` reports, as plain values, and the protocol of
whatever assembles them (:class:`StatusSource`; the composition root's is
:class:`server.compose.health.LiveStatus`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from server.domain.audit.model import AuditTrail

State = Literal["SERVING", "DEGRADED", "NOT_SERVING"]


@dataclass(frozen=True, slots=True)
class Dependency:
    """The last probe of one dependency."""

    name: str
    up: bool
    #: Down, it degrades the server (which serves from a fallback) rather than stopping it.
    optional: bool
    error: str


@dataclass(frozen=True, slots=True)
class Load:
    """The load signal and the adaptive factors it sets."""

    in_flight: int
    loop_lag_ms: float
    level: float
    tier_factors: Mapping[str, float]
    shedding: bool


@dataclass(frozen=True, slots=True)
class Breaker:
    """One circuit breaker that is not closed."""

    name: str
    kind: str
    state: str
    failures: int
    #: When it opened (epoch seconds).
    opened_at: float | None


@dataclass(frozen=True, slots=True)
class SystemStatus:
    """This server now."""

    state: State
    #: Sorted by name.
    dependencies: Sequence[Dependency]
    #: Where rate-limit state lives now: ``redis`` or ``memory``.
    limiter_backend: str
    load: Load
    #: (subject, calls waiting) of the longest rate-limit queues.
    queues: Sequence[tuple[str, int]]
    #: Circuit breakers not closed, by name.
    breakers: Sequence[Breaker] = ()


class BreakerControl(Protocol):
    """Closes a circuit breaker by hand."""

    async def reset(self, name: str, reason: str, trail: AuditTrail | None) -> Breaker:
        """Close breaker ``name`` (``kind.target``); ``LookupError`` if there is none."""
        ...


class StatusSource(Protocol):
    """Reads the server's status."""

    def status(self) -> SystemStatus:
        """The status now."""
        ...
