"""Agent reports, totals, percentiles, daily usage and usage date ranges
(server/domain/tunnels/traffic.py)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from server.domain.common.errors import InvalidArgument
from server.domain.tunnels.traffic import (
    HISTOGRAM_SIZE,
    MAX_COUNT,
    DailyUsage,
    DateRange,
    Report,
    Totals,
    aggregate,
    date_range,
    distinct,
    rollup,
    total,
    usage_of,
)

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
TODAY = NOW.date()
VALID: dict[str, Any] = {
    "agent_id": "agent-1",
    "sequence": 1,
    "time": NOW - timedelta(seconds=30),
    "request_count": 10,
    "success_count": 7,
    "error_count": 3,
    "latency_buckets": [1, 2, 3, 4],
    "connections": 4,
    "bytes_in": 1000,
    "bytes_out": 5000,
    "peak_concurrency": 3,
    "active_connections": 2,
}


def report(**changes: Any) -> Report:
    """A valid report, with ``changes`` applied."""
    return Report.checked(**{**VALID, **changes}, now=NOW)


def bad_fields(**changes: Any) -> list[str]:
    """The fields a report with ``changes`` is rejected for."""
    with pytest.raises(InvalidArgument) as caught:
        report(**changes)
    return [violation.field for violation in caught.value.violations]


# --- report validation -----------------------------------------------------------------


def test_a_valid_report_keeps_its_values_and_pads_the_histogram() -> None:
    checked = report()
    assert checked.key == ("agent-1", 1)
    assert checked.latency_buckets == (1, 2, 3, 4) + (0,) * (HISTOGRAM_SIZE - 4)
    assert (checked.request_count, checked.success_count, checked.error_count) == (10, 7, 3)
    assert (checked.connections, checked.bytes_in, checked.bytes_out) == (4, 1000, 5000)
    assert (checked.peak_concurrency, checked.active_connections) == (3, 2)


def test_report_time_is_normalised_to_utc() -> None:
    local = datetime(2026, 3, 10, 13, 0, tzinfo=timezone(timedelta(hours=2)))
    checked = report(time=local)
    assert checked.time == datetime(2026, 3, 10, 11, 0, tzinfo=UTC)
    assert checked.time.tzinfo is UTC


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"time": NOW + timedelta(minutes=5)}, id="5-min-ahead"),
        pytest.param({"time": NOW - timedelta(days=7)}, id="7-days-old"),
        pytest.param({"latency_buckets": [1] * HISTOGRAM_SIZE, "request_count": 14}, id="full"),
        pytest.param({"latency_buckets": []}, id="no-histogram"),
        pytest.param(
            {"request_count": 0, "success_count": 0, "error_count": 0, "latency_buckets": []},
            id="idle",
        ),
        pytest.param({"request_count": MAX_COUNT}, id="max-count"),
        pytest.param({"peak_concurrency": 2}, id="peak-equals-active"),
        pytest.param({"success_count": 0, "error_count": 0}, id="outcomes-unknown"),
    ],
)
def test_boundary_reports_are_accepted(changes: dict[str, Any]) -> None:
    assert report(**changes).sequence == 1


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        pytest.param({"sequence": 0}, ["report.sequence"], id="sequence-zero"),
        pytest.param({"sequence": -5}, ["report.sequence"], id="sequence-negative"),
        pytest.param({"time": None}, ["report.time"], id="time-missing"),
        pytest.param({"time": NOW + timedelta(minutes=5, seconds=1)}, ["report.time"], id="future"),
        pytest.param({"time": NOW - timedelta(days=7, seconds=1)}, ["report.time"], id="old"),
        pytest.param({"request_count": -1}, ["report.request_count"], id="negative-requests"),
        pytest.param({"bytes_in": -1}, ["report.bytes_in"], id="negative-bytes-in"),
        pytest.param({"bytes_out": MAX_COUNT + 1}, ["report.bytes_out"], id="huge-bytes-out"),
        pytest.param({"connections": -1}, ["report.connections"], id="negative-connections"),
        pytest.param(
            {"stream_milliseconds": -1}, ["report.stream_milliseconds"], id="negative-stream-time"
        ),
        pytest.param({"success_count": 8}, ["report.request_count"], id="outcomes-exceed"),
        pytest.param({"error_count": 4}, ["report.request_count"], id="errors-exceed"),
        pytest.param(
            {"active_connections": 4}, ["report.peak_concurrency"], id="active-above-peak"
        ),
        pytest.param(
            {"active_connections": -1}, ["report.active_connections"], id="negative-active"
        ),
        pytest.param(
            {"latency_buckets": [0] * (HISTOGRAM_SIZE + 1)},
            ["report.latency_buckets"],
            id="too-many-buckets",
        ),
        pytest.param(
            {"latency_buckets": [1, -1, 2, -3]},
            ["report.latency_buckets[1]", "report.latency_buckets[3]"],
            id="negative-buckets",
        ),
        pytest.param(
            {"latency_buckets": [5, 6]}, ["report.latency_buckets"], id="more-samples-than-requests"
        ),
        pytest.param(
            {"sequence": 0, "time": None, "bytes_in": -1, "latency_buckets": [-1]},
            ["report.sequence", "report.time", "report.bytes_in", "report.latency_buckets[0]"],
            id="every-violation-at-once",
        ),
        pytest.param(
            {"request_count": -1, "success_count": 5, "latency_buckets": [1]},
            ["report.request_count"],
            id="no-cross-field-noise-on-invalid-count",
        ),
    ],
)
def test_invalid_reports_name_their_fields(changes: dict[str, Any], fields: list[str]) -> None:
    assert bad_fields(**changes) == fields


@pytest.mark.parametrize("field", ["time", "now"])
def test_naive_times_are_a_programming_error(field: str) -> None:
    naive = datetime(2026, 3, 10, 12, 0)  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError, match="timezone-aware"):
        Report.checked(**{**VALID, "now": NOW, field: naive})


# --- totals and percentiles ------------------------------------------------------------


def histogram(**counts: int) -> tuple[int, ...]:
    """A histogram with ``b<i>=count`` set, zero elsewhere."""
    buckets = [0] * HISTOGRAM_SIZE
    for name, count in counts.items():
        buckets[int(name[1:])] = count
    return tuple(buckets)


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        pytest.param(histogram(), 0.5, None, id="no-samples"),
        pytest.param(histogram(b0=4), 0.5, 0.5, id="first-bucket-from-zero"),
        pytest.param(histogram(b0=4), 1.0, 1.0, id="first-bucket-top"),
        pytest.param(histogram(b3=10), 0.0, 5.0, id="q0-is-lower-bound-of-first-sample"),
        pytest.param(histogram(b3=10), 0.5, 7.5, id="interpolated-10ms-bucket"),
        pytest.param(histogram(b3=10), 1.0, 10.0, id="q1-is-upper-bound"),
        pytest.param(histogram(b0=50, b6=50), 0.5, 1.0, id="median-at-bucket-edge"),
        pytest.param(histogram(b0=50, b6=50), 0.95, 95.0, id="p95-in-100ms-bucket"),
        pytest.param(histogram(b0=1, b13=99), 0.5, 10000.0, id="overflow-is-last-bound"),
        pytest.param(histogram(b13=1), 0.0, 10000.0, id="overflow-only"),
        pytest.param(histogram(b12=1, b13=1), 0.5, 10000.0, id="last-bounded-bucket"),
    ],
)
def test_percentile(buckets: tuple[int, ...], q: float, expected: float | None) -> None:
    totals = Totals(request_count=sum(buckets), latency_buckets=buckets)
    assert totals.percentile(q) == expected


@pytest.mark.parametrize("q", [-0.01, 1.01, float("nan")])
def test_percentile_rejects_quantiles_outside_0_1(q: float) -> None:
    with pytest.raises(ValueError, match="quantile"):
        Totals().percentile(q)


@pytest.mark.parametrize(
    ("requests", "successes", "rate"),
    [(0, 0, 0.0), (4, 0, 0.0), (4, 1, 0.25), (4, 4, 1.0)],
)
def test_success_rate(requests: int, successes: int, rate: float) -> None:
    assert Totals(request_count=requests, success_count=successes).success_rate == rate


def test_aggregate_counts_each_report_once() -> None:
    first = report()
    second = report(agent_id="agent-2", time=NOW, latency_buckets=[0, 0, 10])
    retried = report()
    totals = aggregate([first, second, retried])
    assert totals.request_count == 20
    assert (totals.success_count, totals.error_count) == (14, 6)
    assert totals.latency_buckets[:4] == (1, 2, 13, 4)
    assert (totals.connections, totals.bytes_in, totals.bytes_out) == (8, 2000, 10000)
    assert totals.last_report_time == NOW
    assert aggregate([]) == Totals()


def test_a_reused_key_resolves_the_same_way_in_any_order() -> None:
    small = report(bytes_in=1)
    large = report(bytes_in=2)
    assert distinct([large, small]) == distinct([small, large]) == [small]
    assert aggregate([large, small]).bytes_in == 1


# --- daily usage -----------------------------------------------------------------------


def test_rollup_groups_by_utc_day_and_ignores_duplicates() -> None:
    late = datetime(2026, 3, 9, 23, 30, tzinfo=timezone(timedelta(hours=-2)))  # 10th UTC
    reports = [
        report(sequence=1, time=NOW - timedelta(days=1), connections=1, peak_concurrency=5,
               stream_milliseconds=40_000),
        report(sequence=2, time=late, connections=2, peak_concurrency=4, stream_milliseconds=1),
        report(sequence=3, time=NOW, connections=3, peak_concurrency=7, stream_milliseconds=2),
        report(sequence=3, time=NOW, connections=3, peak_concurrency=7, stream_milliseconds=2),
    ]  # fmt: skip
    days = rollup(reports)
    assert list(days) == [date(2026, 3, 9), date(2026, 3, 10)]
    # Each report holds 10 requests; the duplicate counts once, its stream time too.
    assert days[date(2026, 3, 9)] == DailyUsage(date(2026, 3, 9), 1, 1000, 5000, 5, 10, 40_000)
    assert days[date(2026, 3, 10)] == DailyUsage(date(2026, 3, 10), 5, 2000, 10000, 7, 20, 3)
    assert usage_of(reports[1]).day == date(2026, 3, 10)


def test_total_sums_and_keeps_the_highest_peak() -> None:
    days = [
        DailyUsage(date(2026, 3, 2), 1, 2, 3, 9, 4, 500),
        DailyUsage(date(2026, 3, 1), 4, 5, 6, 7, 1, 1500),
    ]
    assert total(days) == DailyUsage(date(2026, 3, 1), 5, 7, 9, 9, 5, 2000)
    assert total(days, date(2026, 2, 1)).day == date(2026, 2, 1)
    assert total([], TODAY) == DailyUsage(TODAY)


def test_usage_of_different_days_does_not_add() -> None:
    with pytest.raises(ValueError, match="cannot add"):
        _ = DailyUsage(date(2026, 3, 1)) + DailyUsage(date(2026, 3, 2))


# --- date ranges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        pytest.param(None, None, (date(2026, 2, 8), TODAY), id="defaults"),
        pytest.param((0, 0, 0), (0, 0, 0), (date(2026, 2, 8), TODAY), id="zero-is-unset"),
        pytest.param(None, (2026, 1, 31), (date(2026, 1, 1), date(2026, 1, 31)), id="end-only"),
        pytest.param((2026, 3, 1), None, (date(2026, 3, 1), TODAY), id="start-only"),
        pytest.param((2026, 3, 10), (2026, 3, 10), (TODAY, TODAY), id="one-day"),
        pytest.param((2024, 2, 29), (2025, 3, 1), (date(2024, 2, 29), date(2025, 3, 1)), id="366"),
        pytest.param(None, (1, 1, 5), (date(1, 1, 1), date(1, 1, 5)), id="clamped-at-year-1"),
    ],
)
def test_valid_date_ranges(
    start: tuple[int, int, int] | None,
    end: tuple[int, int, int] | None,
    expected: tuple[date, date],
) -> None:
    assert date_range(start, end, TODAY) == DateRange(*expected)


@pytest.mark.parametrize(
    ("start", "end", "fields"),
    [
        pytest.param((2026, 13, 1), None, ["start_date"], id="month-13"),
        pytest.param(None, (2026, 2, 30), ["end_date"], id="feb-30"),
        pytest.param(None, (2025, 2, 29), ["end_date"], id="not-a-leap-year"),
        pytest.param((2026, 0, 1), None, ["start_date"], id="partial-month"),
        pytest.param((0, 3, 1), None, ["start_date"], id="partial-year"),
        pytest.param(None, (2026, 3, 0), ["end_date"], id="partial-day"),
        pytest.param((-1, 1, 1), None, ["start_date"], id="negative-year"),
        pytest.param((10000, 1, 1), None, ["start_date"], id="year-10000"),
        pytest.param((2**70, 1, 1), None, ["start_date"], id="overflowing-year"),
        pytest.param((2026, 2, 30), (2026, 13, 1), ["start_date", "end_date"], id="both"),
        pytest.param((2026, 3, 11), None, ["start_date"], id="start-after-today"),
        pytest.param((2026, 3, 2), (2026, 3, 1), ["start_date"], id="start-after-end"),
        pytest.param((2024, 2, 29), (2025, 3, 2), ["end_date"], id="367-days"),
    ],
)
def test_invalid_date_ranges(
    start: tuple[int, int, int] | None, end: tuple[int, int, int] | None, fields: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        date_range(start, end, TODAY)
    assert [violation.field for violation in caught.value.violations] == fields


@pytest.mark.parametrize("prefix", ["request", "request."])
def test_date_range_fields_carry_the_prefix(prefix: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        date_range((2026, 2, 30), None, TODAY, field_prefix=prefix)
    assert caught.value.violations[0].field == "request.start_date"


def test_date_range_contains_its_days_only() -> None:
    week = DateRange(date(2026, 3, 1), date(2026, 3, 7))
    assert date(2026, 3, 1) in week
    assert date(2026, 3, 7) in week
    assert date(2026, 3, 8) not in week
    assert "2026-03-02" not in week
