"""The loops that keep this process's own signals current: dependency health
(:class:`server.health.HealthMonitor`) and load (:class:`server.load.LoadMonitor`)."""

from __future__ import annotations

from server.health import HealthMonitor
from server.load import LoadMonitor
from server.workers.supervisor import Loop


def health_loop(monitor: HealthMonitor) -> Loop:
    """Probe every dependency every interval of the monitor."""
    return Loop("health", monitor.check_once, monitor.interval)


def load_loop(load: LoadMonitor) -> Loop:
    """Sample event-loop lag back to back (each sample is a timed sleep)."""
    return Loop("load", load.sample, 0.0)
