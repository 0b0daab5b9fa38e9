"""Latency buckets, back-off, report numbering and agent ids: small laws, tested directly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tunnelplane.v1 import agents_pb2

from agent.backoff import Backoff, BackoffPolicy
from agent.counters import BUCKET_COUNT, LATENCY_BUCKETS_MS, Counters, Snapshot, bucket_of
from agent.identity import derived_agent_id, resolve_agent_id
from agent.reports import ReportBook


@pytest.mark.parametrize(
    ("milliseconds", "bucket"),
    [(0, 0), (1, 0), (1.01, 1), (2, 1), (3, 2), (999, 9), (1000, 9), (10000, 12), (10001, 13)],
)
def test_bucket_holds_latencies_up_to_its_bound(milliseconds: float, bucket: int) -> None:
    assert bucket_of(milliseconds) == bucket


def test_there_are_fourteen_buckets() -> None:
    assert len(LATENCY_BUCKETS_MS) == 13
    assert BUCKET_COUNT == 14
    counters = Counters()
    counters.opened()
    counters.closed(ok=True, connect_seconds=60.0)
    assert counters.take().latency_buckets == (0,) * 13 + (1,)


def test_a_connection_is_reported_whole_in_the_interval_it_ends() -> None:
    counters = Counters()
    counters.opened()
    counters.bytes_in += 5
    while_open = counters.take()
    assert (while_open.connections, while_open.bytes_in, while_open.active) == (1, 5, 1)
    assert (while_open.requests, sum(while_open.latency_buckets)) == (0, 0)
    counters.closed(ok=True, connect_seconds=0.004)
    ended = counters.take()
    assert (ended.connections, ended.requests, ended.successes, ended.active) == (0, 1, 1, 0)
    assert ended.latency_buckets[bucket_of(4)] == 1
    assert sum(ended.latency_buckets) == 1


def test_stream_time_counts_in_the_interval_a_connection_ends() -> None:
    counters = Counters()
    counters.opened()
    counters.opened()
    counters.closed(ok=True, open_seconds=30.0004)
    assert counters.take().stream_milliseconds == 30_000
    counters.closed(ok=False, open_seconds=0.25)
    assert counters.take().stream_milliseconds == 250
    assert counters.take().stream_milliseconds == 0


def test_a_connection_that_never_reached_its_target_has_no_latency() -> None:
    counters = Counters()
    counters.opened()
    counters.closed(ok=False)
    snapshot = counters.take()
    assert (snapshot.requests, snapshot.errors, sum(snapshot.latency_buckets)) == (1, 1, 0)


def test_backoff_is_full_jitter_under_a_doubling_ceiling() -> None:
    backoff = Backoff(BackoffPolicy(initial=0.5, cap=30, reset_after=30), rng=random.Random(7))  # noqa: S311 - jitter
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    for ceiling in ceilings:
        assert 0 <= backoff.next_delay(session_seconds=1) <= ceiling
    assert backoff.failures == len(ceilings)
    backoff.next_delay(session_seconds=31)
    assert backoff.failures == 1
    assert backoff.at_cap() == 30


def test_backoff_delays_vary() -> None:
    backoff = Backoff(BackoffPolicy(initial=10, cap=10), rng=random.Random(1))  # noqa: S311 - jitter
    assert len({backoff.next_delay(0) for _ in range(10)}) == 10


def _report_of(bytes_in: int) -> Snapshot:
    return Snapshot(connections=1, bytes_in=bytes_in, successes=1, peak=1)


def test_reports_are_numbered_from_one_and_kept_until_acknowledged() -> None:
    book = ReportBook()
    first, second = book.add(_report_of(10)), book.add(_report_of(20))
    assert (first.sequence, second.sequence) == (1, 2)
    assert (first.request_count, first.success_count, first.bytes_in) == (1, 1, 10)
    book.acknowledge(agents_pb2.ReportAck(sequence=1, counted=True))
    assert [r.sequence for r in book.pending] == [2]


def test_a_refused_report_is_dropped_not_kept_for_resending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    book = ReportBook()
    book.add(_report_of(1))
    book.add(_report_of(2))
    book.acknowledge(
        agents_pb2.ReportAck(sequence=1, refused=True, refusal="report.request_count: bad")
    )
    assert [r.sequence for r in book.pending] == [2]
    assert book.refused == 1
    [entry] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert entry.__dict__["refusal"] == "report.request_count: bad"
    book.resume(last_sequence=0)  # a reconnect: what is left to send
    assert [r.sequence for r in book.pending] == [2]


def test_resume_drops_counted_reports_and_numbers_after_the_last() -> None:
    book = ReportBook()
    for size in (1, 2, 3):
        book.add(_report_of(size))
    book.resume(last_sequence=2)
    assert [r.sequence for r in book.pending] == [3]
    book.resume(last_sequence=40)
    assert book.pending == []
    assert book.add(_report_of(4)).sequence == 41


def test_derived_agent_id_is_stable_and_valid() -> None:
    one = derived_agent_id("build-01.example.com", "users/u/tunnels/t")
    assert one == derived_agent_id("build-01.example.com", "users/u/tunnels/t")
    assert one != derived_agent_id("build-01.example.com", "users/u/tunnels/other")
    assert one.startswith("build-01-")
    assert derived_agent_id("ünïcode host", "t").startswith("-n-code-host-")


def test_agent_id_comes_from_the_option_then_the_file(tmp_path: Path) -> None:
    stored = tmp_path / "agent-id"
    assert resolve_agent_id("given", "users/u/tunnels/t", stored) == "given"
    assert resolve_agent_id(None, "users/u/tunnels/t", stored).count("-") >= 1
    stored.write_text("installed-7\n")
    assert resolve_agent_id(None, "users/u/tunnels/t", stored) == "installed-7"
    with pytest.raises(ValueError, match="agent id"):
        resolve_agent_id("has space", "users/u/tunnels/t", stored)
