"""Tunnel traffic: agents' reports, their totals, daily usage roll-ups and usage date ranges.

An agent sends one :class:`Report` per interval; reports are idempotent by
``(agent_id, sequence)``, so every aggregate here counts each key once, whatever the
number of copies and whatever their order. When two different reports share a key (an
agent that lost its state and reused a sequence), the least in report order wins, so
the result never depends on the order in which reports arrived.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction

from server.domain.common.errors import InvalidArgument, Violations

#: Upper bounds (inclusive, in milliseconds) of the latency histogram's buckets; one more
#: bucket, the overflow, holds anything slower.
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
#: Counts in a histogram: one per bound plus the overflow bucket.
HISTOGRAM_SIZE = len(LATENCY_BUCKETS_MS) + 1
#: The largest count a report may carry: every integer up to it is exact as a JSON number.
MAX_COUNT = 2**53
#: How far ahead of the control plane's clock a report's time may be (agents' clock skew).
MAX_CLOCK_SKEW = timedelta(minutes=5)
#: How old a report may be; older ones are rejected rather than counted late.
MAX_REPORT_AGE = timedelta(days=7)
#: Usage query defaults and limits.
DEFAULT_RANGE_DAYS = 30
MAX_RANGE_DAYS = 366

_NO_LATENCIES = (0,) * HISTOGRAM_SIZE
_COUNT_FIELDS = (
    "request_count",
    "success_count",
    "error_count",
    "connections",
    "bytes_in",
    "bytes_out",
    "peak_concurrency",
    "active_connections",
    "stream_milliseconds",
)

ReportKey = tuple[str, int]


@dataclass(frozen=True, slots=True, order=True)
class Report:
    """Traffic one agent carried in one interval (``tunnelplane.v1.AgentReport``).

    Build it with :meth:`checked`. Reports order by key first, then by contents, which
    is what makes the choice between two reports that share a key deterministic.
    """

    agent_id: str
    sequence: int
    #: When the interval ended, UTC.
    time: datetime
    request_count: int
    success_count: int
    error_count: int
    #: :data:`HISTOGRAM_SIZE` counts, see :data:`LATENCY_BUCKETS_MS`.
    latency_buckets: tuple[int, ...]
    connections: int
    bytes_in: int
    bytes_out: int
    peak_concurrency: int
    active_connections: int
    #: How long the requests that ended in the interval were open, added up.
    stream_milliseconds: int = 0

    @property
    def key(self) -> ReportKey:
        """What makes a report idempotent: ``(agent_id, sequence)``."""
        return (self.agent_id, self.sequence)

    @classmethod
    def checked(
        cls,
        *,
        agent_id: str,
        sequence: int,
        time: datetime | None,
        now: datetime,
        request_count: int = 0,
        success_count: int = 0,
        error_count: int = 0,
        latency_buckets: Sequence[int] = (),
        connections: int = 0,
        bytes_in: int = 0,
        bytes_out: int = 0,
        peak_concurrency: int = 0,
        active_connections: int = 0,
        stream_milliseconds: int = 0,
    ) -> Report:
        """A validated report, its histogram padded to :data:`HISTOGRAM_SIZE` counts.

        Raises :class:`InvalidArgument` naming every bad field as ``report.<field>``.
        ``time`` and ``now`` must be timezone-aware (``ValueError`` otherwise: a bug in
        the caller, not in the request); ``time`` is None when the agent sent none.
        """
        violations = Violations()
        _check_sequence(sequence, violations)
        report = cls(
            agent_id,
            sequence,
            _check_time(time, now, violations),
            request_count,
            success_count,
            error_count,
            tuple(latency_buckets),
            connections,
            bytes_in,
            bytes_out,
            peak_concurrency,
            active_connections,
            stream_milliseconds,
        )
        if _check_counts(report, violations):
            _check_consistency(report, violations)
        _check_histogram(report, violations)
        violations.raise_if_any()
        return replace(report, latency_buckets=_padded(report.latency_buckets))


def _check_time(time: datetime | None, now: datetime, violations: Violations) -> datetime:
    _require_aware(now, "now")
    if time is None:
        violations.add("report.time", "is required", "REQUIRED")
        return now
    _require_aware(time, "time")
    if time > now + MAX_CLOCK_SKEW:
        violations.add("report.time", "must not be more than 5 minutes in the future")
    elif time < now - MAX_REPORT_AGE:
        violations.add("report.time", "must not be more than 7 days old")
    return time.astimezone(UTC)


def _require_aware(value: datetime, name: str) -> None:
    if value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


def _check_sequence(sequence: int, violations: Violations) -> None:
    if not 1 <= sequence <= MAX_COUNT:
        violations.add("report.sequence", f"must be between 1 and {MAX_COUNT}")


def _check_counts(report: Report, violations: Violations) -> bool:
    """Each count in ``[0, MAX_COUNT]``; whether all are."""
    valid = True
    for name in _COUNT_FIELDS:
        if not 0 <= getattr(report, name) <= MAX_COUNT:
            violations.add(f"report.{name}", f"must be between 0 and {MAX_COUNT}")
            valid = False
    return valid


def _check_consistency(report: Report, violations: Violations) -> None:
    """Rules between counts, checked once each count is valid on its own."""
    if report.success_count + report.error_count > report.request_count:
        violations.add("report.request_count", "must be at least success_count + error_count")
    if report.active_connections > report.peak_concurrency:
        violations.add("report.peak_concurrency", "must be at least active_connections")


def _check_histogram(report: Report, violations: Violations) -> None:
    buckets = report.latency_buckets
    if len(buckets) > HISTOGRAM_SIZE:
        violations.add("report.latency_buckets", f"must have at most {HISTOGRAM_SIZE} entries")
        return
    bad = [i for i, count in enumerate(buckets) if not 0 <= count <= MAX_COUNT]
    for index in bad:
        violations.add(f"report.latency_buckets[{index}]", f"must be between 0 and {MAX_COUNT}")
    if not bad and 0 <= report.request_count < sum(buckets):
        violations.add("report.latency_buckets", "must not count more than request_count")


def distinct(reports: Iterable[Report]) -> list[Report]:
    """One report per key, in key order; of reports sharing a key, the least wins."""
    chosen: dict[ReportKey, Report] = {}
    for report in reports:
        kept = chosen.get(report.key)
        if kept is None or report < kept:
            chosen[report.key] = report
    return [chosen[key] for key in sorted(chosen)]


# --- totals ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Totals:
    """Traffic summed over reports (``tunnelplane.v1.TunnelMetrics``).

    ``Totals()`` is empty and the identity of ``+``, which is commutative and associative.
    """

    request_count: int = 0
    success_count: int = 0
    error_count: int = 0
    latency_buckets: tuple[int, ...] = _NO_LATENCIES
    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: The latest report's time; None before the first report.
    last_report_time: datetime | None = None

    @classmethod
    def of(cls, report: Report) -> Totals:
        """One report's traffic."""
        return cls(
            report.request_count,
            report.success_count,
            report.error_count,
            _padded(report.latency_buckets),
            report.connections,
            report.bytes_in,
            report.bytes_out,
            report.time,
        )

    def __add__(self, other: Totals) -> Totals:
        """Both together: counts summed, the later report time."""
        return Totals(
            self.request_count + other.request_count,
            self.success_count + other.success_count,
            self.error_count + other.error_count,
            tuple(a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)),
            self.connections + other.connections,
            self.bytes_in + other.bytes_in,
            self.bytes_out + other.bytes_out,
            _later(self.last_report_time, other.last_report_time),
        )

    @property
    def success_rate(self) -> float:
        """``success_count / request_count``, in [0, 1]; 0 when there were no requests."""
        if self.request_count <= 0:
            return 0.0
        return min(self.success_count / self.request_count, 1.0)

    def percentile(self, q: float) -> float | None:
        """The ``q``-quantile (``q`` in [0, 1], e.g. 0.95) of latency in milliseconds.

        Interpolated linearly inside the bucket that holds it; a quantile in the overflow
        bucket is reported as the last bound. None when no latency was reported.
        """
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], not {q}")
        return _quantile(self.latency_buckets, Fraction(q))


def _padded(buckets: tuple[int, ...]) -> tuple[int, ...]:
    return (buckets + _NO_LATENCIES)[:HISTOGRAM_SIZE]


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return max(a, b)


def _quantile(buckets: tuple[int, ...], q: Fraction) -> float | None:
    # Exact arithmetic: totals may pass 2**53 samples, where a float rank would round.
    rank = q * sum(buckets)
    before = 0
    for index, count in enumerate(buckets):
        if count > 0 and before + count >= rank:
            return _interpolate(index, (rank - before) / count)
        before += count
    return None


def _interpolate(index: int, fraction: Fraction) -> float:
    """The point ``fraction`` of the way through bucket ``index``."""
    if index >= len(LATENCY_BUCKETS_MS):
        return float(LATENCY_BUCKETS_MS[-1])
    lower = LATENCY_BUCKETS_MS[index - 1] if index else 0
    upper = LATENCY_BUCKETS_MS[index]
    return float(lower + (upper - lower) * fraction)


def aggregate(reports: Iterable[Report]) -> Totals:
    """The totals of ``reports``, each key counted once (see :func:`distinct`)."""
    return sum((Totals.of(report) for report in distinct(reports)), Totals())


# --- daily usage -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DailyUsage:
    """Usage on one UTC day (``tunnelplane.v1.DailyUsage``), as billed.

    ``+`` combines two records of the same day: connections and bytes add up, the peak
    is the higher of the two.
    """

    day: date
    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    peak_concurrency: int = 0
    #: Requests (TCP: connections) that ended.
    requests: int = 0
    #: How long they were open, added up.
    stream_milliseconds: int = 0

    def __add__(self, other: DailyUsage) -> DailyUsage:
        """Both records of this day together; ``ValueError`` for different days."""
        if other.day != self.day:
            raise ValueError(f"cannot add usage of {other.day} to usage of {self.day}")
        return _combined(self.day, self, other)


def _combined(day: date, a: DailyUsage, b: DailyUsage) -> DailyUsage:
    return DailyUsage(
        day,
        a.connections + b.connections,
        a.bytes_in + b.bytes_in,
        a.bytes_out + b.bytes_out,
        max(a.peak_concurrency, b.peak_concurrency),
        a.requests + b.requests,
        a.stream_milliseconds + b.stream_milliseconds,
    )


def usage_of(report: Report) -> DailyUsage:
    """One report's usage, on the UTC day its interval ended."""
    return DailyUsage(
        report.time.astimezone(UTC).date(),
        report.connections,
        report.bytes_in,
        report.bytes_out,
        report.peak_concurrency,
        report.request_count,
        report.stream_milliseconds,
    )


def rollup(reports: Iterable[Report]) -> dict[date, DailyUsage]:
    """Usage per day, in day order, each key counted once (see :func:`distinct`)."""
    days: dict[date, DailyUsage] = {}
    for report in distinct(reports):
        usage = usage_of(report)
        days[usage.day] = days[usage.day] + usage if usage.day in days else usage
    return dict(sorted(days.items()))


def total(days: Iterable[DailyUsage], day: date | None = None) -> DailyUsage:
    """The sum over ``days``, with the highest peak.

    Labelled ``day``; by default the earliest of ``days`` (``date.min`` if there are none).
    """
    usages = list(days)
    label = day or min((usage.day for usage in usages), default=date.min)
    result = DailyUsage(label)
    for usage in usages:
        result = _combined(label, result, usage)
    return result


# --- date ranges -----------------------------------------------------------------------

YearMonthDay = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class DateRange:
    """Days from ``start`` to ``end``, both included."""

    start: date
    end: date

    def __contains__(self, day: object) -> bool:
        """Whether ``day`` (a :class:`date`) falls in the range."""
        return isinstance(day, date) and self.start <= day <= self.end


def date_range(
    start: YearMonthDay | None,
    end: YearMonthDay | None,
    today: date,
    field_prefix: str = "",
) -> DateRange:
    """The range a usage query asks for, from ``google.type.Date`` fields.

    None or ``(0, 0, 0)`` means unset: ``end`` defaults to ``today`` and ``start`` to 30
    days before ``end``. Violations name ``start_date`` and ``end_date`` under
    ``field_prefix`` (``"request"`` or ``"request."`` give ``request.start_date``).
    """
    start_field = _field(field_prefix, "start_date")
    end_field = _field(field_prefix, "end_date")
    violations = Violations()
    first = _parse_date(start, start_field, violations)
    last = _parse_date(end, end_field, violations)
    violations.raise_if_any()
    last = last or today
    first = first or _days_before(last, DEFAULT_RANGE_DAYS)
    if first > last:
        raise InvalidArgument.single(start_field, "must not be after end_date")
    if (last - first).days > MAX_RANGE_DAYS:
        raise InvalidArgument.single(
            end_field, f"must be at most {MAX_RANGE_DAYS} days after start_date"
        )
    return DateRange(first, last)


def _field(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('.')}.{name}" if prefix else name


def _parse_date(value: YearMonthDay | None, field: str, violations: Violations) -> date | None:
    if value is None or value == (0, 0, 0):
        return None
    if 0 in value:
        violations.add(field, "must be a full date: year, month and day")
        return None
    try:
        return date(*value)
    except (ValueError, OverflowError):
        violations.add(field, "is not a valid date")
        return None


def _days_before(day: date, days: int) -> date:
    """``day`` minus ``days``, stopping at the first representable date."""
    return date.fromordinal(max(day.toordinal() - days, 1))
