"""Erases soft-deleted users once their retention period has passed."""

from __future__ import annotations

import asyncio
import logging

from server.domain.identity.users import UserService

INTERVAL = 3600.0


async def purge_loop(
    users: UserService,
    log: logging.Logger,
    interval: float = INTERVAL,
) -> None:
    """Purge due users every ``interval`` seconds; deletion is idempotent, so replicas may
    run this loop side by side."""
    while True:
        try:
            purged = await users.purge_expired()
            if purged:
                log.info("purged soft-deleted users", extra={"count": purged})
        except Exception:
            log.exception("purge failed; will retry")
        await asyncio.sleep(interval)
