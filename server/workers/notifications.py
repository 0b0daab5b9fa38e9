"""The in-app evaluator of critical conditions, and users' own notices.

One replica evaluates at a time (a PostgreSQL advisory lock, ``notifications``; SQLite's
one process always does), every few seconds:

- ``dependency_down:<name>``: a dependency this replica probes has been down for
  ``TP_NOTIFY_DOWN_AFTER`` seconds (critical), and again when it is back (resolved);
- ``error_rate``: over the last 5 minutes, at least 100 calls and a share failing on the
  server's side (``internal``, ``dependency``) of ``TP_NOTIFY_ERROR_RATE`` or more; it
  clears below half of that;
- ``backup_too_old``: the newest backup in ``TP_BACKUP_DIR`` is over 26 hours old (only
  once a first backup exists).

A condition is told once when it is raised and once when it clears, however many rounds
see it. Users' own events reach them by email, as their preferences allow: today
``endpoint.disabled`` (their webhook endpoint was disabled). They are heard on the bus by
every replica; the leader alone sends. A change of leader may tell an active condition
once more.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path

from server.backup import backups
from server.domain.analytics.model import Category
from server.domain.analytics.service import CallOutcomes
from server.domain.common.clock import Clock
from server.domain.events.model import Event
from server.domain.notifications.model import Notice, Severity
from server.domain.notifications.rules import Conditions
from server.domain.notifications.service import Notifier
from server.domain.unit_of_work import UnitOfWorkFactory
from server.health import DependencyStatus
from server.storage.leader import Leadership
from server.workers.supervisor import Loop

log = logging.getLogger("tunnelplane.notifications")
WINDOW = timedelta(minutes=5)
MIN_CALLS = 100
BACKUP_MAX_AGE = timedelta(hours=26)
USER_EVENTS = frozenset({"endpoint.disabled"})
#: Events remembered as told (a bus may deliver one twice).
SEEN = 10_000


class ConditionWatch:
    """Evaluates the critical conditions and sends users' notices (see the module)."""

    def __init__(
        self,
        notifier: Notifier,
        leadership: Leadership,
        dependencies: Callable[[], Mapping[str, DependencyStatus]],
        outcomes: CallOutcomes,
        uow: UnitOfWorkFactory,
        clock: Clock,
        *,
        down_after: float,
        error_rate: float,
        backup_dir: Path,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._notifier = notifier
        self._leadership = leadership
        self._dependencies = dependencies
        self._outcomes = outcomes
        self._uow = uow
        self._clock = clock
        self._down_after = down_after
        self._error_rate = error_rate
        self._backup_dir = backup_dir
        self._now = monotonic
        self.conditions = Conditions()
        self._down_since: dict[str, float] = {}
        self._heard: list[Event] = []
        self._told: OrderedDict[str, None] = OrderedDict()

    def hear(self, event: Event) -> None:
        """A bus listener: keep a user's event to tell at the next round (no I/O)."""
        if event.type in USER_EVENTS and len(self._heard) < SEEN:
            self._heard.append(event)

    async def round(self) -> None:
        """One evaluation, by the leader only."""
        heard, self._heard = self._heard, []
        if not await self._leadership.hold():
            return
        await self._dependencies_round()
        await self._error_rate_round()
        await self._backup_round()
        for event in heard:
            await self._tell_user(event)

    async def _dependencies_round(self) -> None:
        now = self._now()
        for name, status in sorted(self._dependencies().items()):
            key = f"dependency_down:{name}"
            if status.up:
                self._down_since.pop(name, None)
                if self.conditions.cleared(key):
                    await self._tell(key, Severity.RESOLVED, f"{name} is back", dependency=name)
                continue
            since = self._down_since.setdefault(name, now)
            if now - since >= self._down_after and self.conditions.raised(key):
                await self._tell(
                    key, Severity.CRITICAL,
                    f"{name} has been down for {int(now - since)} s",
                    dependency=name, error=status.error,
                )  # fmt: skip

    async def _error_rate_round(self) -> None:
        summary = await self._outcomes.summarize(WINDOW, 5, compare=False)
        failing = (
            summary.by_category[Category.INTERNAL].count
            + summary.by_category[Category.DEPENDENCY].count
        )
        calls = summary.calls.count
        rate = failing / calls if calls else 0.0
        key = "error_rate"
        if calls >= MIN_CALLS and rate >= self._error_rate:
            if self.conditions.raised(key):
                top = [f"{e.method} {e.code} {e.reason}: {e.tally.count}" for e in summary.top]
                await self._tell(
                    key, Severity.CRITICAL,
                    f"{rate:.1%} of calls failed on the server's side in 5 min",
                    calls=calls, failing=failing, top="; ".join(top),
                )  # fmt: skip
        elif (calls < MIN_CALLS or rate < self._error_rate / 2) and self.conditions.cleared(key):
            await self._tell(key, Severity.RESOLVED, "the server-side error rate is back down")

    async def _backup_round(self) -> None:
        newest = backups(self._backup_dir)[-1:]
        if not newest:
            return
        made = datetime.fromisoformat(newest[0].created_at)
        age = self._clock.now() - made
        key = "backup_too_old"
        if age > BACKUP_MAX_AGE:
            if self.conditions.raised(key):
                hours = int(age.total_seconds() // 3600)
                await self._tell(
                    key, Severity.CRITICAL, f"the newest backup is {hours} hours old",
                    newest=newest[0].file,
                )  # fmt: skip
        elif self.conditions.cleared(key):
            await self._tell(key, Severity.RESOLVED, "a fresh backup exists")

    async def _tell(self, key: str, severity: Severity, summary: str, **details: object) -> None:
        log.log(
            logging.INFO if severity is Severity.RESOLVED else logging.WARNING,
            "notice: %s",
            summary,
            extra={"notice": key, "severity": severity.value},
        )
        notice = Notice(key, severity, summary, self._clock.now(), dict(details))
        await self._notifier.notify(notice)

    async def _tell_user(self, event: Event) -> None:
        key = f"event:{event.id}"
        if key in self._told:
            return
        self._told[key] = None
        if len(self._told) > SEEN:
            self._told.popitem(last=False)
        async with self._uow(readonly=True) as uow:
            user = await uow.users.get(event.user_id)
        if user is None:
            return
        notice = Notice(
            key, Severity.WARNING, "Your webhook endpoint was disabled", event.time,
            {"endpoint": event.subject, "reason": str(event.payload.get("reason", ""))},
        )  # fmt: skip
        await self._notifier.notify_user(user, notice)


def notification_loop(watch: ConditionWatch, interval: float) -> Loop:
    """A round every ``interval`` seconds."""
    return Loop("notifications", watch.round, interval, immediately=False)
