"""Traffic counters of a relay, read as deltas once per report."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

#: Upper bounds (inclusive, milliseconds) of the latency buckets of ``AgentReport``; one
#: more bucket holds anything slower.
LATENCY_BUCKETS_MS: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
#: Number of latency buckets, the overflow bucket included.
BUCKET_COUNT = len(LATENCY_BUCKETS_MS) + 1


def bucket_of(milliseconds: float) -> int:
    """Index of the bucket holding a latency: the first whose bound is not below it."""
    return bisect.bisect_left(LATENCY_BUCKETS_MS, milliseconds)


def _zero_buckets() -> list[int]:
    return [0] * BUCKET_COUNT


@dataclass(frozen=True)
class Snapshot:
    """Traffic since the previous snapshot.

    For a TCP tunnel a request is a connection: ``requests`` counts the connections that
    ended in the interval (``successes + errors``), ``connections`` those opened in it, and
    the latency is the time it took to connect to the target. A connection's latency is
    recorded when it ends, with its outcome, so a snapshot never holds a latency whose
    request is in another snapshot: the buckets count at most ``requests``, whatever
    connections are still open (the control plane refuses a report that breaks this).
    """

    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    successes: int = 0
    errors: int = 0
    latency_buckets: tuple[int, ...] = (0,) * BUCKET_COUNT
    peak: int = 0
    active: int = 0
    #: How long the connections that ended in the interval were open, added up.
    stream_milliseconds: int = 0

    @property
    def requests(self) -> int:
        """Connections that ended in the interval."""
        return self.successes + self.errors

    def has_traffic(self) -> bool:
        """Whether anything happened in the interval."""
        return any(
            (self.connections, self.bytes_in, self.bytes_out, self.successes, self.errors)
        ) or any(self.latency_buckets)


@dataclass
class Counters:
    """What a relay carried. Updated from the event loop only, so no lock is needed.

    ``active`` is a gauge; everything else accumulates until :meth:`take` returns it and
    starts a new interval. ``peak`` is the most connections open at once in the interval.
    """

    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    active: int = 0
    peak: int = 0
    successes: int = 0
    errors: int = 0
    latency_buckets: list[int] = field(default_factory=_zero_buckets)
    stream_milliseconds: int = 0

    def opened(self) -> None:
        """A client connection was accepted and is being relayed."""
        self.connections += 1
        self.active += 1
        self.peak = max(self.peak, self.active)

    def closed(
        self, *, ok: bool, connect_seconds: float | None = None, open_seconds: float = 0.0
    ) -> None:
        """A relayed connection ended, normally or not; ``connect_seconds`` is the time it
        took to connect to the target (None: it never got that far), ``open_seconds`` how
        long it was open."""
        self.active -= 1
        self.ended(ok=ok)
        self.stream_milliseconds += max(0, round(open_seconds * 1000.0))
        if connect_seconds is not None:
            self.latency_buckets[bucket_of(connect_seconds * 1000.0)] += 1

    def ended(self, *, ok: bool) -> None:
        """Count the outcome of a connection."""
        if ok:
            self.successes += 1
        else:
            self.errors += 1

    def rejected(self) -> None:
        """A client connection was refused at once (the connection limit was hit)."""
        self.connections += 1
        self.errors += 1

    def take(self) -> Snapshot:
        """Return the interval's traffic and start a new interval."""
        snapshot = Snapshot(
            connections=self.connections,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            successes=self.successes,
            errors=self.errors,
            latency_buckets=tuple(self.latency_buckets),
            peak=self.peak,
            active=self.active,
            stream_milliseconds=self.stream_milliseconds,
        )
        self.connections = self.bytes_in = self.bytes_out = self.stream_milliseconds = 0
        self.successes = self.errors = 0
        self.latency_buckets = _zero_buckets()
        self.peak = self.active
        return snapshot
