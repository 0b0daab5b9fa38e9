"""Address blocks an operator lifts before they end."""

from __future__ import annotations

from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail
from server.domain.common.clock import Clock
from server.domain.limits.ports import Limiter
from server.domain.unit_of_work import UnitOfWorkFactory


class IpBlocks:
    """Lifts blocks (``AdminService.DeleteIpBlock``)."""

    def __init__(self, limiter: Limiter, uow: UnitOfWorkFactory, clock: Clock) -> None:
        self._limiter = limiter
        self._uow = uow
        self._clock = clock

    async def lift(self, ip: str, trail: AuditTrail | None = None) -> bool:
        """End ``ip``'s block now; whether there was one. A block lives in the limiter's
        store, not in the database, so the audit entry cannot share its transaction: it is
        written once the block is gone."""
        if not await self._limiter.lift(ip):
            return False
        async with self._uow() as uow:
            await audit.record(uow, trail, self._clock.now(), resource=f"ipBlocks/{ip}")
        return True
