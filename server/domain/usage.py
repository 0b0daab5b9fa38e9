"""Monthly request usage: counted by the rate limiter, persisted by a periodic roll-up.

The limiter's counters (in Redis, or in this process) hold the live figure, and every
decision that counts a call reports the counter's new value. :class:`RequestUsage` keeps
the highest value each counter reached since the last roll-up (a dict update per call, no
I/O); the roll-up (:mod:`server.workers.usage`) writes those figures as absolute counts
that a row only ever rises to. A roll-up that runs twice, or two replicas rolling up the
same counter at once, therefore never count anything twice.

When the limiter loses a counter (Redis restarted or evicted it, or this process
restarted), the next call makes it again and the decision says so; the persisted figure
is then added to it. Losing the limiter's state loses at most one roll-up interval.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import date

from server.domain.clock import Clock
from server.domain.ports import UnitOfWorkFactory
from server.domain.ratelimit import Decision, Limiter, parse_quota_key

#: The quota these counts are of.
METRIC = "requests"


@dataclass(frozen=True, slots=True)
class MonthlyRequests:
    """A user's requests in one calendar month (UTC)."""

    user_id: str
    #: The first day of the month.
    month: date
    requests: int


def month_start(tag: str) -> date:
    """The first day of the month a quota key's ``YYYYMM`` tag names."""
    return date(int(tag[:4]), int(tag[4:]), 1)


def rows_of(seen: dict[str, int]) -> list[MonthlyRequests]:
    """The request counters among ``seen`` (quota key -> value) as rows."""
    rows = []
    for key, used in seen.items():
        parsed = parse_quota_key(key)
        if parsed is not None and parsed[1] == METRIC:
            rows.append(MonthlyRequests(parsed[0], month_start(parsed[2]), used))
    return rows


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
        used = decision.quota_used
        if used > self._seen.get(key, 0):
            self._seen[key] = used
        if decision.quota_created:
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
        """Wait for the restores under way (the server is stopping)."""
        while self._restoring:
            await asyncio.gather(*self._restoring, return_exceptions=True)

    async def flush(self) -> int:
        """Persist the figures noted since the last flush; the number of rows. On a failed
        write they stay noted, for the next flush."""
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
