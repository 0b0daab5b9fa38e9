"""Erases soft-deleted users once their retention period has passed."""

from __future__ import annotations

import logging

from server.domain.identity.users import UserService
from server.workers.supervisor import Loop

INTERVAL = 3600.0


def purge_loop(users: UserService, log: logging.Logger, interval: float = INTERVAL) -> Loop:
    """Purge due users every ``interval`` seconds; deletion is idempotent, so replicas may
    run this loop side by side."""

    async def purge() -> None:
        purged = await users.purge_expired()
        if purged:
            log.info("purged soft-deleted users", extra={"count": purged})

    return Loop("purge", purge, interval)
