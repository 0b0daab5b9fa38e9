"""Database pool and query metrics, and the slow-query log.

Per engine (``role``: ``primary``, or ``replica`` when ``TP_DATABASE_REPLICA_URL`` is set):

- ``tunnelplane_db_pool_size``, ``tunnelplane_db_pool_checked_out``,
  ``tunnelplane_db_pool_overflow``: the pool as it is at scrape time (SQLAlchemy's
  ``QueuePool``: its steady size, the connections lent out, those opened beyond the size);
- ``tunnelplane_db_pool_wait_seconds``: how long a unit of work waited for a connection
  (a pooled one is immediate; a new one includes the connect, a full pool the wait);
- ``tunnelplane_db_query_duration_seconds{statement}``: each statement's time in the
  driver, by statement name;
- ``tunnelplane_db_slow_queries_total{statement}`` and a ``slow query`` log line (warning:
  the statement's name, its duration and the role, never its parameters or text) for a
  statement that took ``TP_SLOW_QUERY_MS`` or more (0: no slow-query log).

A statement's name is its verb and first table, lower case (``select users``, ``insert
webhook_deliveries``, ``update tunnels``, ``begin``), derived once per distinct SQL text:
few enough for a label, and enough to find the repository method that ran it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("tunnelplane.db")
#: Statement texts whose names are remembered (the compiled-statement cache bounds the
#: distinct texts an application sends; this bounds the memory if it did not).
_NAMES_KEPT = 4096
_VERB = re.compile(r"^\s*(?:WITH\b.*?\)\s*)?([A-Za-z]+)", re.DOTALL)
_TABLE = {
    "select": re.compile(r"\bFROM\s+\"?([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE),
    "insert": re.compile(r"\bINTO\s+\"?([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE),
    "update": re.compile(r"\bUPDATE\s+\"?([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE),
    "delete": re.compile(r"\bFROM\s+\"?([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE),
}
_QUERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10)


def statement_name(sql: str) -> str:
    """``<verb> <first table>`` of ``sql`` (``select users``), or the verb alone."""
    match = _VERB.match(sql)
    if match is None:
        return "other"
    verb = match.group(1).lower()
    pattern = _TABLE.get(verb)
    # After a WITH clause's subqueries: the table of the statement itself.
    table = pattern.search(sql, match.start(1)) if pattern is not None else None
    return f"{verb} {table.group(1).lower()}" if table is not None else verb


class DatabaseMetrics:
    """The metrics of every engine it is attached to (:meth:`attach`)."""

    def __init__(self, registry: CollectorRegistry, slow_query_ms: float = 0.0) -> None:
        self._slow_seconds = slow_query_ms / 1000 if slow_query_ms > 0 else None
        self.wait = Histogram(
            "tunnelplane_db_pool_wait_seconds",
            "Time a unit of work waited for a database connection.",
            ["role"],
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.queries = Histogram(
            "tunnelplane_db_query_duration_seconds",
            "Time one SQL statement took in the driver, by statement name.",
            ["role", "statement"],
            buckets=_QUERY_BUCKETS,
            registry=registry,
        )
        self.slow = Counter(
            "tunnelplane_db_slow_queries",
            "Statements that took TP_SLOW_QUERY_MS or more.",
            ["role", "statement"],
            registry=registry,
        )
        self._pools = _PoolCollector()
        registry.register(self._pools)
        self._names: dict[str, str] = {}
        self._observers: dict[tuple[str, str], Any] = {}

    def attach(self, engine: AsyncEngine, role: str) -> None:
        """Time ``engine``'s statements and report its pool as ``role``."""
        self._pools.engines[role] = engine
        sync = engine.sync_engine

        def before(*args: Any) -> None:
            # (connection, cursor, statement, parameters, context, executemany)
            args[4]._tp_started = time.perf_counter()

        def after(*args: Any) -> None:
            sql, context = args[2], args[4]
            started = getattr(context, "_tp_started", None)
            if started is not None:
                self.observe(role, sql, time.perf_counter() - started)

        sa.event.listen(sync, "before_cursor_execute", before)
        sa.event.listen(sync, "after_cursor_execute", after)

    def observe(self, role: str, sql: str, seconds: float) -> None:
        """Record one statement of ``role`` that took ``seconds``."""
        name = self._names.get(sql)
        if name is None:
            if len(self._names) >= _NAMES_KEPT:
                self._names.clear()
            name = self._names[sql] = statement_name(sql)
        observer = self._observers.get((role, name))
        if observer is None:
            observer = self._observers[role, name] = self.queries.labels(role, name)
        observer.observe(seconds)
        if self._slow_seconds is not None and seconds >= self._slow_seconds:
            self.slow.labels(role, name).inc()
            log.warning(
                "slow query",
                extra={"statement": name, "duration_ms": round(seconds * 1000, 1), "role": role},
            )


class _PoolCollector(Collector):
    """The pools' sizes, read at scrape time."""

    def __init__(self) -> None:
        self.engines: dict[str, AsyncEngine] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "size": GaugeMetricFamily(
                "tunnelplane_db_pool_size", "Connections the pool keeps open.", labels=["role"]
            ),
            "checkedout": GaugeMetricFamily(
                "tunnelplane_db_pool_checked_out",
                "Connections lent out to units of work now.",
                labels=["role"],
            ),
            "overflow": GaugeMetricFamily(
                "tunnelplane_db_pool_overflow",
                "Connections open beyond the pool's size now (negative: not all of the "
                "size is open yet).",
                labels=["role"],
            ),
        }
        for role, engine in self.engines.items():
            pool = engine.pool
            for attribute, family in families.items():
                read = getattr(pool, attribute, None)
                if callable(read):
                    family.add_metric([role], float(read()))
        yield from families.values()
