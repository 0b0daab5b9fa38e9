"""Property 7: metrics aggregation consistency (server/domain/tunnels/traffic.py).

Agents retry reports, and reports arrive in any order. Whatever the order and however
many copies, the totals and the daily roll-up are the same, and they equal the sum over
the distinct reports. Totals form a commutative monoid under ``+``; the success rate is
a fraction and latency percentiles grow with the quantile.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from server.domain.tunnels.traffic import (
    HISTOGRAM_SIZE,
    LATENCY_BUCKETS_MS,
    DailyUsage,
    Report,
    Totals,
    aggregate,
    rollup,
    total,
)

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
SUMMED = ("request_count", "success_count", "error_count", "connections", "bytes_in", "bytes_out")
counts = st.integers(min_value=0, max_value=10_000)


@st.composite
def reports(draw: st.DrawFn) -> Report:
    """A valid report; agents and sequences come from a small set so that keys collide."""
    buckets = draw(st.lists(st.integers(0, 50), max_size=HISTOGRAM_SIZE))
    requests = sum(buckets) + draw(counts)
    successes = draw(st.integers(0, requests))
    active = draw(counts)
    return Report.checked(
        agent_id=draw(st.sampled_from(["agent-a", "agent-b", "agent-c"])),
        sequence=draw(st.integers(1, 6)),
        time=NOW - timedelta(seconds=draw(st.integers(-300, 7 * 24 * 3600))),
        now=NOW,
        request_count=requests,
        success_count=successes,
        error_count=draw(st.integers(0, requests - successes)),
        latency_buckets=buckets,
        connections=draw(counts),
        bytes_in=draw(st.integers(0, 2**40)),
        bytes_out=draw(st.integers(0, 2**40)),
        peak_concurrency=active + draw(counts),
        active_connections=active,
    )


report_lists = st.lists(reports(), max_size=12)
distinct_lists = st.lists(reports(), max_size=12, unique_by=lambda report: report.key)
totals = report_lists.map(aggregate)


@st.composite
def redelivered(draw: st.DrawFn) -> tuple[list[Report], list[Report]]:
    """Reports, and the same reports shuffled with some of them delivered again."""
    original = draw(report_lists)
    copies = draw(st.lists(st.sampled_from(original), max_size=8)) if original else []
    return original, draw(st.permutations(original + copies))


@given(delivery=redelivered())
def test_order_and_duplicates_do_not_change_totals(
    delivery: tuple[list[Report], list[Report]],
) -> None:
    original, received = delivery
    assert aggregate(received) == aggregate(original)


@given(delivery=redelivered())
def test_order_and_duplicates_do_not_change_the_daily_rollup(
    delivery: tuple[list[Report], list[Report]],
) -> None:
    original, received = delivery
    assert rollup(received) == rollup(original)
    assert list(rollup(received)) == sorted(rollup(original))


@given(distinct=distinct_lists)
def test_totals_are_the_sum_over_distinct_reports(distinct: list[Report]) -> None:
    result = aggregate(distinct)
    for field in SUMMED:
        assert getattr(result, field) == sum(getattr(report, field) for report in distinct)
    assert result.latency_buckets == tuple(
        sum(report.latency_buckets[i] for report in distinct) for i in range(HISTOGRAM_SIZE)
    )
    assert result.last_report_time == max((report.time for report in distinct), default=None)


@given(distinct=distinct_lists, extra=report_lists)
def test_aggregate_of_disjoint_reports_is_the_sum_of_aggregates(
    distinct: list[Report], extra: list[Report]
) -> None:
    keys = {report.key for report in distinct}
    others = [report for report in extra if report.key not in keys]
    assert aggregate(distinct + others) == aggregate(distinct) + aggregate(others)


@given(distinct=distinct_lists)
def test_daily_usage_sums_to_the_totals(distinct: list[Report]) -> None:
    days = rollup(distinct)
    overall = total(days.values())
    totals_ = aggregate(distinct)
    assert (overall.connections, overall.bytes_in, overall.bytes_out) == (
        totals_.connections,
        totals_.bytes_in,
        totals_.bytes_out,
    )
    assert overall.peak_concurrency == max((r.peak_concurrency for r in distinct), default=0)
    assert all(usage.day == day for day, usage in days.items())


@given(a=totals, b=totals, c=totals)
def test_totals_add_commutatively_and_associatively(a: Totals, b: Totals, c: Totals) -> None:
    assert a + b == b + a
    assert (a + b) + c == a + (b + c)
    assert a + Totals() == a == Totals() + a


@given(
    a=st.builds(DailyUsage, st.just(NOW.date()), counts, counts, counts, counts),
    b=st.builds(DailyUsage, st.just(NOW.date()), counts, counts, counts, counts),
    c=st.builds(DailyUsage, st.just(NOW.date()), counts, counts, counts, counts),
)
def test_daily_usage_adds_commutatively_and_associatively(
    a: DailyUsage, b: DailyUsage, c: DailyUsage
) -> None:
    assert a + b == b + a
    assert (a + b) + c == a + (b + c)
    assert total([a, b, c]) == a + b + c


@given(result=totals)
def test_success_rate_is_a_fraction(result: Totals) -> None:
    assert 0.0 <= result.success_rate <= 1.0
    assert (result.success_rate == 0.0) == (result.success_count == 0)


@given(
    result=totals,
    qs=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6).map(sorted),
)
def test_percentiles_grow_with_the_quantile(result: Totals, qs: list[float]) -> None:
    values = [result.percentile(q) for q in qs]
    if sum(result.latency_buckets) == 0:
        assert values == [None] * len(qs)
        return
    numbers = [value for value in values if value is not None]
    assert len(numbers) == len(qs)
    assert numbers == sorted(numbers)
    assert all(0.0 <= value <= LATENCY_BUCKETS_MS[-1] for value in numbers)
