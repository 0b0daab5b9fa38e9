"""VerifyAuditLog: walk each day's hash chain and report the first link that does not
hold (:class:`server.domain.audit.rules.ChainCheck`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from server.domain.audit.rules import BrokenLink, ChainCheck
from server.domain.common.clock import Clock
from server.domain.common.errors import InvalidArgument, Violations
from server.domain.unit_of_work import UnitOfWorkFactory

#: The longest span one verification covers.
MAX_DAYS = 366
#: Without a span: the last 30 days, today included.
DEFAULT_DAYS = 30
BATCH = 1000


@dataclass(frozen=True, slots=True)
class Verification:
    """What a verification found."""

    start: date
    end: date
    days_checked: int
    entries_checked: int
    #: Entries of the span written before the chain existed (not verifiable).
    unchained: int
    broken: BrokenLink | None


def span(start: str, end: str, today: date) -> tuple[date, date]:
    """The days to check (inclusive); INVALID_ARGUMENT naming the field at fault."""
    violations = Violations()
    first = _day(start, "start_day", violations) if start else None
    last = _day(end, "end_day", violations) if end else None
    violations.raise_if_any()
    last = last or today
    first = first or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise InvalidArgument.single("start_day", "must not be after end_day")
    if (last - first).days >= MAX_DAYS:
        raise InvalidArgument.single("start_day", f"the span is at most {MAX_DAYS} days")
    return first, last


def _day(text: str, field: str, violations: Violations) -> date | None:
    try:
        if len(text) == len("2026-12-05"):
            return date.fromisoformat(text)
    except ValueError:
        pass
    violations.add(field, "must be a day, YYYY-MM-DD")
    return None


class AuditVerifier:
    """Reads the chains back from storage and checks them."""

    def __init__(self, uow: UnitOfWorkFactory, clock: Clock) -> None:
        self._uow = uow
        self._clock = clock

    async def verify(self, start: str = "", end: str = "") -> Verification:
        first, last = span(start, end, self._clock.now().astimezone(UTC).date())
        after_last = datetime.combine(last + timedelta(days=1), time(), UTC)
        low, high = first.isoformat(), last.isoformat()
        async with self._uow(readonly=True) as uow:
            heads = await uow.audit.heads(low, high)
            found = set(heads) | set(await uow.audit.chain_days(low, high))
            unchained = await uow.audit.unchained(datetime.combine(first, time(), UTC), after_last)
        days = sorted(found)
        entries, broken = 0, None
        for day in days:
            check = ChainCheck(day)
            while broken is None:
                async with self._uow(readonly=True) as uow:
                    rows = await uow.audit.chained(day, check.checked, BATCH)
                broken = check.feed(rows)
                if len(rows) < BATCH:
                    break
            broken = broken or check.finish(heads.get(day))
            entries += check.checked
            if broken is not None:
                break
        return Verification(first, last, len(days), entries, unchained, broken)
