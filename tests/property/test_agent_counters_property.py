"""The agent's reports are always ones the control plane accepts, and add up.

For any interleaving of connections opening, reaching their target, carrying bytes and
closing, of refused connections, and of report intervals ending (a connection may stay
open across any number of them, as a token stream or a keep-alive client does), every
report the agent makes passes the control plane's own validation
(``server.domain.tunnels.traffic.Report.checked``), and the reports together count each
connection, request, latency and byte exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.counters import Counters
from agent.reports import to_report
from server.domain.tunnels.traffic import Report

#: One step: open, connect (the n-th open connection reached its target), bytes, close
#: (the n-th open connection ended, ok or not), reject, or the end of an interval.
steps = st.one_of(
    st.just(("open",)),
    st.tuples(st.just("connect"), st.integers(0, 7), st.floats(0, 20)),
    st.tuples(st.just("bytes"), st.integers(0, 7), st.integers(1, 10**6)),
    st.tuples(st.just("close"), st.integers(0, 7), st.booleans()),
    st.just(("reject",)),
    st.just(("take",)),
)


@dataclass
class Model:
    """What really happened, to compare the reports with."""

    counters: Counters = field(default_factory=Counters)
    open: list[float | None] = field(default_factory=list)  # connect latency, if reached
    opened: int = 0
    ended: int = 0
    succeeded: int = 0
    reached: int = 0
    carried: int = 0

    def apply(self, step: tuple[Any, ...]) -> None:
        kind, *args = step
        if kind == "open":
            self.counters.opened()
            self.open.append(None)
            self.opened += 1
        elif kind == "reject":
            self.counters.rejected()
            self.opened += 1
            self.ended += 1
        elif self.open and kind == "connect":
            self.open[args[0] % len(self.open)] = args[1]
        elif self.open and kind == "bytes":
            self.counters.bytes_in += args[1]
            self.carried += args[1]
        elif self.open and kind == "close":
            self._close(args[0] % len(self.open), ok=args[1])

    def _close(self, index: int, *, ok: bool) -> None:
        latency = self.open.pop(index)
        self.counters.closed(ok=ok, connect_seconds=latency)
        self.ended += 1
        self.succeeded += ok
        self.reached += latency is not None


def checked(sequence: int, model: Model, now: datetime) -> Report:
    """The next report, as the control plane reads it (raises if it would refuse it)."""
    message = to_report(sequence, model.counters.take(), now)
    return Report.checked(
        agent_id="a",
        sequence=message.sequence,
        time=message.time.ToDatetime(UTC),
        now=now,
        request_count=message.request_count,
        success_count=message.success_count,
        error_count=message.error_count,
        latency_buckets=list(message.latency_buckets),
        connections=message.connections,
        bytes_in=message.bytes_in,
        bytes_out=message.bytes_out,
        peak_concurrency=message.peak_concurrency,
        active_connections=message.active_connections,
    )


@settings(max_examples=400)
@given(st.lists(steps, max_size=60))
def test_every_report_is_valid_and_together_they_count_everything_once(
    script: list[tuple[Any, ...]],
) -> None:
    model = Model()
    now = datetime.now(UTC)
    reports: list[Report] = []
    for step in script:
        if step[0] == "take":
            reports.append(checked(len(reports) + 1, model, now))
        else:
            model.apply(step)
    reports.append(checked(len(reports) + 1, model, now))

    assert sum(r.connections for r in reports) == model.opened
    assert sum(r.request_count for r in reports) == model.ended
    assert sum(r.success_count for r in reports) == model.succeeded
    assert sum(sum(r.latency_buckets) for r in reports) == model.reached
    assert sum(r.bytes_in for r in reports) == model.carried
    assert reports[-1].active_connections == len(model.open)
