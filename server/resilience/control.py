"""An operator closes a circuit breaker by hand (``AdminService.ResetCircuitBreaker``),
audited with the reason and the breaker's state before and after."""

from __future__ import annotations

from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail
from server.domain.common.clock import Clock
from server.domain.unit_of_work import UnitOfWorkFactory
from server.resilience.breakers import Breakers, BreakerUnknownError
from server.status import Breaker


class BreakerReset:
    """Resets breakers and records who did it and why."""

    def __init__(self, breakers: Breakers, uow: UnitOfWorkFactory, clock: Clock) -> None:
        self._breakers = breakers
        self._uow = uow
        self._clock = clock

    async def reset(self, name: str, reason: str, trail: AuditTrail | None) -> Breaker:
        """Close breaker ``name``; ``LookupError`` if this process has none of that name."""
        before = next((b for b in self._breakers.states() if b.name == name), None)
        try:
            after = await self._breakers.reset(name)
        except BreakerUnknownError:
            raise LookupError(name) from None
        async with self._uow() as uow:
            await audit.record(
                uow,
                trail,
                self._clock.now(),
                resource=f"circuitBreakers/{name}",
                reason=reason,
                before=before.state if before is not None else "closed",
                after=after.state,
                failures_before=before.failures if before is not None else 0,
            )
        return after
