"""Read replica routing: lag-tolerant reads go to the replica while it is up and close
enough behind the primary, else to the primary.

- **Lag.** The health monitor probes the replica every ``TP_HEALTH_INTERVAL``
  (:meth:`ReplicaRouter.probe`): ``0`` while it has replayed all the WAL it received,
  else the time since the last transaction it replayed. The second measure overstates
  the lag just after a long idle spell (a replica that was idle for a minute reads as a
  minute behind until it replays the new WAL), which errs towards the primary. A replica
  more than ``TP_REPLICA_MAX_LAG`` seconds behind, or one that does not answer, is
  skipped until a probe finds it back; ``tunnelplane_db_replica_lag_seconds`` and
  ``tunnelplane_db_replica_in_use`` show it, and ``GetSystemStatus`` and ``/readyz``
  show the dependency ``database_replica`` down (the server is DEGRADED, still serving).
- **A replica that fails between probes.** A read whose connection to the replica
  cannot be made is taken to the primary at once, and the replica is skipped until a
  probe finds it back: no call fails because the replica went away.
- **Read-your-writes.** A caller (``server.consistency.reader_var``: the user) whose
  write committed on this server reads from the primary for ``TP_REPLICA_MAX_LAG`` plus
  one probe interval after it; within that time the replica has caught up or is
  skipped. This holds per server process: a caller who writes through one replica of
  the service and reads through another sees its write after at most
  ``TP_REPLICA_MAX_LAG`` (clients that need more send both calls to one replica).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncEngine

from server.consistency import reader_var

log = logging.getLogger("tunnelplane.db")
#: Callers remembered as recent writers (the oldest are forgotten first).
MAX_WRITERS = 100_000
LAG = sa.text(
    "SELECT CASE WHEN NOT pg_is_in_recovery()"
    " OR pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0"
    " ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END"
)


class ReplicaLaggingError(Exception):
    """The replica answers but is further behind than the routing tolerates."""


class ReplicaMetrics:
    """The replica's lag, whether reads go to it, and where reads went."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Gauge(
            "tunnelplane_db_replica_lag_seconds",
            "How far the read replica was behind the primary at its last probe.",
            registry=registry,
        )
        self.in_use = Gauge(
            "tunnelplane_db_replica_in_use",
            "1 while lag-tolerant reads go to the read replica, 0 while they go to the primary.",
            registry=registry,
        )
        self.reads = Counter(
            "tunnelplane_db_reads_total",
            "Read-only units of work by where they ran: replica, or primary and why.",
            ["target"],
            registry=registry,
        )


class ReplicaRouter:
    """Chooses the engine of each read-only unit of work."""

    def __init__(
        self,
        primary: AsyncEngine,
        replica: AsyncEngine,
        *,
        max_lag: float,
        probe_interval: float,
        metrics: ReplicaMetrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.primary = primary
        self.replica = replica
        self.max_lag = max_lag
        #: How long a writer's reads stay on the primary after its write.
        self.sticky = max_lag + probe_interval
        self._now = monotonic
        self._usable = False  # until the first probe finds the replica
        self._failed_at = -float("inf")  # when a read last failed to connect to it
        self._writers: OrderedDict[str, float] = OrderedDict()
        self._metrics = metrics
        if metrics is not None:
            metrics.in_use.set(0)
            self._to_replica = metrics.reads.labels("replica")
            self._down = metrics.reads.labels("primary_replica_unusable")
            self._own = metrics.reads.labels("primary_own_write")

    @property
    def usable(self) -> bool:
        """Whether lag-tolerant reads go to the replica now."""
        return self._usable

    def engine_for_read(self) -> tuple[AsyncEngine, bool]:
        """The engine of a read-only unit of work, and whether it is the replica."""
        if not self._usable:
            if self._metrics is not None:
                self._down.inc()
            return self.primary, False
        reader = reader_var.get()
        if reader:
            wrote = self._writers.get(reader)
            if wrote is not None:
                if self._now() - wrote < self.sticky:
                    if self._metrics is not None:
                        self._own.inc()
                    return self.primary, False
                del self._writers[reader]
        if self._metrics is not None:
            self._to_replica.inc()
        return self.replica, True

    def wrote(self) -> None:
        """The caller of this task committed a write: its reads go to the primary for a
        while (read-your-writes)."""
        reader = reader_var.get()
        if not reader:
            return
        writers = self._writers
        writers[reader] = self._now()
        writers.move_to_end(reader)
        if len(writers) > MAX_WRITERS:
            writers.popitem(last=False)

    def connect_failed(self) -> None:
        """A read could not connect to the replica: skip it until a probe finds it back."""
        if self._usable:
            log.warning("the read replica does not answer; reads go to the primary")
        self._failed_at = self._now()
        self._set(usable=False)

    async def probe(self) -> None:
        """Measure the replica's lag (the health monitor's check): raise unless it answers
        and is at most ``max_lag`` behind."""
        async with self.replica.connect() as conn:
            lag = float((await conn.execute(LAG)).scalar_one())
        if self._metrics is not None:
            self._metrics.lag.set(lag)
        if lag > self.max_lag:
            raise ReplicaLaggingError(f"{lag:.1f} s behind, more than {self.max_lag:g} s")

    def set_available(self, up: bool, probed_at: float) -> None:
        """The health monitor's listener: route to the replica while its probes pass. A
        connect failure seen after the probe started wins over the probe's "up"."""
        if up and self._failed_at > probed_at:
            return
        if up != self._usable:
            log.log(
                logging.INFO if up else logging.WARNING,
                "lag-tolerant reads go to the %s",
                "read replica" if up else "primary",
            )
        self._set(usable=up)

    def _set(self, *, usable: bool) -> None:
        self._usable = usable
        if self._metrics is not None:
            self._metrics.in_use.set(1 if usable else 0)
