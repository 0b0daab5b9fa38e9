"""Report sequencing: numbering, keeping unacknowledged reports, resuming after welcome."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from tunnelplane.v1 import agents_pb2

from agent.counters import Snapshot

log = logging.getLogger("tunnelplane.agent.reports")

#: Most reports kept unacknowledged; past it, traffic accumulates into the next report.
MAX_PENDING = 100


class ReportBook:
    """Numbers reports from 1 and keeps each one until the control plane acknowledges it.

    Reports are idempotent by sequence on the control plane, so a report whose
    acknowledgement was lost is simply sent again after a reconnect. A report the control
    plane refused is dropped: sending it again would be refused again.
    """

    def __init__(self) -> None:
        self._next = 1
        self._pending: dict[int, agents_pb2.AgentReport] = {}
        #: Reports the control plane refused (and that were dropped).
        self.refused = 0

    @property
    def next_sequence(self) -> int:
        """The sequence the next new report gets."""
        return self._next

    @property
    def pending(self) -> list[agents_pb2.AgentReport]:
        """Unacknowledged reports, oldest first."""
        return [self._pending[sequence] for sequence in sorted(self._pending)]

    def can_add(self) -> bool:
        """Whether another report may be made before older ones are acknowledged."""
        return len(self._pending) < MAX_PENDING

    def resume(self, last_sequence: int) -> None:
        """Forget reports the control plane counted already and number new ones after them."""
        for sequence in [s for s in self._pending if s <= last_sequence]:
            del self._pending[sequence]
        self._next = max(self._next, last_sequence + 1)

    def add(self, snapshot: Snapshot) -> agents_pb2.AgentReport:
        """Make the next report from an interval's traffic and keep it until acknowledged."""
        report = to_report(self._next, snapshot, datetime.now(UTC))
        self._pending[self._next] = report
        self._next += 1
        return report

    def acknowledge(self, ack: agents_pb2.ReportAck) -> None:
        """The control plane received a report (counted now or before), or refused it."""
        if self._pending.pop(ack.sequence, None) is None:
            log.debug("ack of an unknown report", extra={"sequence": ack.sequence})
        if ack.refused:
            self.refused += 1
            log.warning(
                "the control plane refused a report; it is dropped",
                extra={"sequence": ack.sequence, "refusal": ack.refusal},
            )


def to_report(sequence: int, snapshot: Snapshot, now: datetime) -> agents_pb2.AgentReport:
    """The ``AgentReport`` of one interval."""
    time = timestamp_pb2.Timestamp()
    time.FromDatetime(now)
    return agents_pb2.AgentReport(
        sequence=sequence,
        time=time,
        request_count=snapshot.requests,
        success_count=snapshot.successes,
        error_count=snapshot.errors,
        latency_buckets=snapshot.latency_buckets,
        connections=snapshot.connections,
        bytes_in=snapshot.bytes_in,
        bytes_out=snapshot.bytes_out,
        peak_concurrency=snapshot.peak,
        stream_milliseconds=snapshot.stream_milliseconds,
        active_connections=snapshot.active,
    )
