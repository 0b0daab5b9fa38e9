"""Counts every call's outcome in memory and writes the counts per minute (bounded rows,
as the violation log does); summarizes a window against the window before it."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from server.domain.analytics.model import Category, ErrorSummary, OutcomeCount, Tally, TopError
from server.domain.analytics.rules import category_of, count_id
from server.domain.common.clock import Clock
from server.domain.unit_of_work import UnitOfWorkFactory

#: Distinct (minute, method, code, reason) failures kept between two flushes; beyond it,
#: new ones are counted under the reason ``OTHER``.
MAX_KEYS = 10_000
OTHER = "OTHER"
#: How long per-minute counts are kept.
RETENTION = timedelta(days=14)
#: The longest window a summary covers (and its previous window as long again).
MAX_WINDOW = timedelta(days=7)

_Key = tuple[float, str, str, str]


class CallOutcomes:
    """The outcome of every call, counted and written in aggregate."""

    def __init__(self, uow: UnitOfWorkFactory, clock: Clock, *, max_keys: int = MAX_KEYS) -> None:
        self._uow = uow
        self._clock = clock
        self._max_keys = max_keys
        #: Successful calls per method since the last flush (counted in the flush's minute).
        self._ok: Counter[str] = Counter()
        self._failed: Counter[_Key] = Counter()

    def succeeded(self, method: str) -> None:
        """Count one call that succeeded (no I/O; the hot path)."""
        self._ok[method] += 1

    def failed(self, method: str, code: str, reason: str) -> None:
        """Count one call that failed with ``code`` (its name) and ``reason`` (no I/O)."""
        minute = (self._clock.time() // 60) * 60
        key = (minute, method, code, reason)
        if key not in self._failed and len(self._failed) >= self._max_keys:
            key = (minute, method, code, OTHER)
        self._failed[key] += 1

    async def flush(self) -> int:
        """Write what was counted since the last flush; how many rows it touched."""
        ok, self._ok = self._ok, Counter()
        failed, self._failed = self._failed, Counter()
        minute = (self._clock.time() // 60) * 60
        counts = [_count(minute, method, "OK", "", n) for method, n in ok.items()]
        counts += [_count(*key, n) for key, n in failed.items()]
        if counts:
            async with self._uow() as uow:
                await uow.call_outcomes.add_counts(counts)
        return len(counts)

    async def prune(self) -> None:
        """Drop counts past retention."""
        async with self._uow() as uow:
            await uow.call_outcomes.delete_before(self._clock.now() - RETENTION)

    async def summarize(self, window: timedelta, top: int, *, compare: bool = True) -> ErrorSummary:
        """Calls, failures by category and the ``top`` failures over the last ``window``,
        each beside the ``window`` before it, both starting at a minute's start. Counts
        reach storage at each flush, so the last few seconds may be missing; a flush puts
        the successful calls since the one before in its own minute. Without ``compare``
        the window before is not read (its counts are 0)."""
        end = self._clock.now()
        # Counts are per minute: each window starts on a minute's start.
        start, before = _minute_of(end - window), _minute_of(end - 2 * window)
        async with self._uow(lag_tolerant=True) as uow:
            now_rows = await uow.call_outcomes.totals(start, end)
            then_rows = await uow.call_outcomes.totals(before, start) if compare else []
        now_by, then_by = _by_kind(now_rows), _by_kind(then_rows)
        calls = Tally(sum(now_by.values()), sum(then_by.values()))
        failures = {k for k in now_by.keys() | then_by.keys() if k[1] != "OK"}
        errors = Tally(
            sum(now_by.get(k, 0) for k in failures), sum(then_by.get(k, 0) for k in failures)
        )
        by_category: dict[Category, Tally] = {}
        for category in Category:
            if category is Category.OK:
                continue
            kinds = [k for k in failures if category_of(k[1]) is category]
            by_category[category] = Tally(
                sum(now_by.get(k, 0) for k in kinds), sum(then_by.get(k, 0) for k in kinds)
            )
        ranked = sorted(
            (k for k in failures if now_by.get(k, 0) > 0),
            key=lambda k: (-now_by[k], k),
        )[:top]
        listed = [
            TopError(m, c, r, category_of(c), Tally(now_by[(m, c, r)], then_by.get((m, c, r), 0)))
            for m, c, r in ranked
        ]
        return ErrorSummary(start, end, calls, errors, by_category, listed)


def _minute_of(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _count(minute: float, method: str, code: str, reason: str, n: int) -> OutcomeCount:
    return OutcomeCount(
        count_id(minute, method, code, reason),
        datetime.fromtimestamp(minute, UTC),
        method,
        code,
        reason,
        category_of(code),
        n,
    )


def _by_kind(rows: list[tuple[str, str, str, str, int]]) -> dict[tuple[str, str, str], int]:
    found: dict[tuple[str, str, str], int] = {}
    for method, code, reason, _category, count in rows:
        found[(method, code, reason)] = found.get((method, code, reason), 0) + count
    return found
