"""Webhook delivery throughput on PostgreSQL: one server process dispatching, against two
dispatching the same queue (``make bench``; ``python -m bench.run --only webhooks``).

Each measurement gets a fresh PostgreSQL database (a copy of one migrated template), filled
directly with one user, one endpoint pointing at a local receiver, and N events with one
pending delivery each, held back (due in a day). Then the server processes start
(``python -m bench.server --mode full``, which serves exactly as ``python -m server serve``
does, dispatcher included), and once every one of them is serving, one ``UPDATE`` makes
every delivery due at the same instant a moment later (the *release*): the idle
dispatchers, which look at the next due time at least every second, all wake at it. The
run ends when the database says all N deliveries ``succeeded``.

The receiver is a process of its own (``python -m bench.webhooks receiver``): a minimal
HTTP/1.1 server on raw asyncio that answers every ``POST`` with ``200`` and an empty body
and counts requests and distinct ``webhook-id`` headers (``GET /stats``). The bench checks
that it received each delivery exactly once.

Throughput is measured from the servers' own records: every recorded delivery gets the
``update_time`` of the transaction that recorded it, so the *steady* rate is the deliveries
recorded after the one at 10 % up to the one at 90 %, divided by the time between the two
(start-up and the tail, where one process may already be idle, are left out); the
*overall* rate is N over the time from the release to the last record. See
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import secrets
import signal
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import redis
import sqlalchemy as sa
from psycopg import sql

from bench.errors import LoadError
from bench.processes import SERVER_SETTINGS, ServerProcess, cpu_seconds, migrate, server_env
from bench.report import (
    Ratio,
    TargetResult,
    measure_alone,
    update_readme,
    write_json_and_text,
)
from server.domain.common.ids import new_id
from server.domain.identity.model import Preferences
from server.domain.webhooks.rules import new_secret
from server.storage import tables
from server.storage.database import normalize_url
from server.storage.identity.users import preferences_to_json
from server.storage.sealing import new_key

#: The PostgreSQL the bench creates its databases in (as the tests do; trust auth).
DEFAULT_POSTGRES_URL = os.environ.get(
    "TP_BENCH_POSTGRES_URL",
    os.environ.get("TP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
)
#: The two measurements of a round: the number of server processes dispatching.
CASES = {"one": 1, "two": 2}
#: Pre-filled deliveries are due this far in the future until released.
HOLD = timedelta(days=1)
#: How far ahead of the ``UPDATE`` the release instant is: more than the dispatchers'
#: longest idle sleep (1 s), so that every one of them has seen it before it comes.
LEAD = timedelta(seconds=1.5)
#: Seconds between two looks at the progress.
POLL = 0.1
#: A run fails when no delivery was recorded for this long.
STALL_SECONDS = 30.0
#: The steady window: from the delivery recorded at this share to the one at the next.
STEADY = (0.10, 0.90)
#: Dispatcher settings, the server defaults, spelled out so the report shows them.
DISPATCH_SETTINGS: Mapping[str, str] = {
    "TP_WEBHOOK_DISPATCH": "true",
    "TP_WEBHOOK_ADDRESSES": "any",
    "TP_WEBHOOK_BATCH": "100",
    "TP_WEBHOOK_CONCURRENCY": "100",
    # One endpoint receives everything here: let it have every request in flight, so the
    # bench measures the dispatcher, not the per-endpoint cap (4 by default).
    "TP_WEBHOOK_ENDPOINT_CONCURRENCY": "100",
}
HOOK_PATH = "/hook"
EVENT_TYPE = "tunnel.updated"


@dataclass(frozen=True, slots=True)
class Targets:
    """What the webhook issue asks."""

    one_process_per_second: float = 500.0
    two_over_one: float = 1.3


@dataclass(frozen=True, slots=True)
class Plan:
    """How much work, and where the processes run.

    ``layout`` says which CPUs the server processes get: ``split`` (the default) pins the
    one process to the servers' CPU and, with two, the second to the load CPU; ``same``
    pins both to the servers' CPU; ``unpinned`` lets them run on every CPU (``all_cpus``).
    The receiver and this process stay on the load CPU whenever there are two CPUs.
    """

    deliveries: int = 12000
    warmup_deliveries: int = 2000
    rounds: int = 3
    layout: str = "split"
    server_cpu: int | None = None
    load_cpu: int | None = None
    all_cpus: tuple[int, ...] = ()

    @classmethod
    def on_this_machine(cls, **values: Any) -> Plan:
        """A plan with the servers' CPU and the load CPU, if there are two."""
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        if len(cpus) < 2:
            return cls(**values, all_cpus=cpus)
        return cls(**values, server_cpu=cpus[0], load_cpu=cpus[1], all_cpus=cpus)

    def cpus(self, processes: int) -> list[int | None]:
        """The CPU of each server process (None: not pinned)."""
        if self.layout == "unpinned" or self.server_cpu is None:
            return [None] * processes
        if self.layout == "same":
            return [self.server_cpu] * processes
        return [self.server_cpu, self.load_cpu, *[None] * (processes - 2)][:processes]

    def as_dict(self) -> dict[str, Any]:
        """The plan, with the CPU of each case, for the report."""
        return dataclasses.asdict(self) | {
            "cpus": {case: self.cpus(n) for case, n in CASES.items()},
            "steady_window": list(STEADY),
            "poll_seconds": POLL,
            "release_lead_seconds": LEAD.total_seconds(),
        }


# -- the receiver ----------------------------------------------------------------------------


@dataclass
class Counts:
    """What the receiver has seen."""

    requests: int = 0
    ids: set[str] = field(default_factory=set)
    unsigned: int = 0
    connections: int = 0
    refused: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts, for ``GET /stats``."""
        return {
            "requests": self.requests,
            "distinct_ids": len(self.ids),
            "unsigned": self.unsigned,
            "connections": self.connections,
            "refused": self.refused,
        }


_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class _Connection(asyncio.Protocol):
    """One keep-alive connection: requests with a ``content-length`` body, one by one."""

    def __init__(self, counts: Counts) -> None:
        self._counts = counts
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._counts.connections += 1

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "transfer-encoding" in headers:
                self._refuse()
                return
            total = end + 4 + int(headers.get("content-length") or 0)
            if len(self._buffer) < total:
                return
            del self._buffer[:total]
            self._answer(lines[0].split(" "), headers)

    def _answer(self, request_line: list[str], headers: dict[str, str]) -> None:
        assert self._transport is not None
        method, path = [*request_line, "", ""][:2]
        if method == "POST" and path == HOOK_PATH:
            counts = self._counts
            counts.requests += 1
            counts.ids.add(headers.get("webhook-id", ""))
            if "webhook-signature" not in headers:
                counts.unsigned += 1
            self._transport.write(_OK)
        elif method == "GET" and path == "/stats":
            body = json.dumps(self._counts.as_dict()).encode()
            self._transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            self._transport.close()
        else:
            self._refuse()

    def _refuse(self) -> None:
        assert self._transport is not None
        self._counts.refused += 1
        self._transport.write(_BAD)
        self._transport.close()


async def serve_receiver(port: int) -> None:
    """Receive on 127.0.0.1:``port`` (0: a free one) until SIGTERM or SIGINT; print
    ``READY http=<port>`` once listening."""
    counts = Counts()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(counts), "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY http={server.sockets[0].getsockname()[1]}", flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    async with server:
        await stop.wait()
    print(f"receiver stopped: {json.dumps(counts.as_dict())}", file=sys.stderr)


class ReceiverProcess(ServerProcess):
    """The receiver in a child process (on this process's CPUs unless ``cpu`` is given)."""

    def __init__(self, log_path: Path, cpu: int | None = None) -> None:
        super().__init__([], server_env(log_path.parent), log_path)
        pin = [] if cpu is None else ["--cpu", str(cpu)]
        self.args = [sys.executable, "-m", "bench.webhooks", "receiver", "--port", "0", *pin]

    def stats(self) -> dict[str, int]:
        """What it has received so far."""
        with urllib.request.urlopen(self.url("http", "/stats"), timeout=10) as answer:  # noqa: S310 - loopback
            stats: dict[str, int] = json.loads(answer.read())
        return stats


# -- the database ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Postgres:
    """The PostgreSQL server: creates and drops the bench's databases."""

    admin_url: str

    def url(self, name: str) -> str:
        """The URL of database ``name`` on this server."""
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"

    def _admin(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(statement)

    def create(self, name: str, template: str | None = None) -> str:
        """A new database (a copy of ``template``); its URL."""
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        self._admin(statement)
        return self.url(name)

    def drop(self, name: str) -> None:
        """Drop a database, whoever is still connected."""
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def version(self) -> str:
        """``PostgreSQL 15.x ...``, or the error if it does not answer."""
        try:
            with psycopg.connect(self.admin_url, connect_timeout=5) as conn:
                row = conn.execute("SHOW server_version").fetchone()
        except psycopg.Error as exc:
            raise LoadError(
                f"PostgreSQL at {self.admin_url} does not answer ({exc}); the webhook runs "
                "need it: start it or pass --postgres-url"
            ) from exc
        return f"PostgreSQL {row[0] if row else '?'}"

    def backend_pids(self, name: str) -> set[int]:
        """The server processes serving connections to database ``name``."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)
            ).fetchall()
        return {int(r[0]) for r in rows}


def fill(url: str, deliveries: int, hook_url: str) -> str:
    """One user, one endpoint at ``hook_url`` for every event type, ``deliveries`` events
    with one pending delivery each, held back for :data:`HOLD`; the user id."""
    now = datetime.now(UTC)
    stamp = now.timestamp()
    user_id = new_id("usr", stamp)
    webhook_id = new_id("whk", stamp)
    engine = sa.create_engine(normalize_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(
                tables.users.insert().values(
                    id=user_id,
                    email=f"bench-webhooks-{secrets.token_hex(4)}@example.com",
                    display_name="Webhook bench",
                    password_hash=None,
                    role="user",
                    tier="free",
                    state="active",
                    preferences=preferences_to_json(Preferences()),
                    has_avatar=False,
                    version=1,
                    create_time=now,
                    update_time=now,
                )
            )
            conn.execute(
                tables.webhooks.insert().values(
                    id=webhook_id,
                    user_id=user_id,
                    url=hook_url,
                    description="",
                    event_types=[],
                    transform="",
                    rate_limit=0,
                    headers={},
                    disabled_reason="",
                    secret=new_secret(),
                    previous_secret=None,
                    previous_secret_expire_time=None,
                    failing_since=None,
                    request_id=None,
                    version=1,
                    create_time=now,
                    update_time=now,
                )
            )
            events, outbox = _rows(user_id, webhook_id, deliveries, now)
            conn.execute(tables.events.insert(), events)
            conn.execute(tables.webhook_deliveries.insert(), outbox)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE"))
    finally:
        engine.dispose()
    return user_id


def _rows(
    user_id: str, webhook_id: str, count: int, now: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The events (the payload of a ``tunnel.updated``, as the tunnel service writes it)
    and their held-back deliveries."""
    events, outbox = [], []
    stamp = now.timestamp()
    for n in range(count):
        event_id = new_id("evt", stamp)
        tunnel = f"users/{user_id}/tunnels/{new_id('tun', stamp)}"
        endpoint = f"https://backend-{n}.example.com:8443"
        events.append(
            {
                "id": event_id,
                "type": EVENT_TYPE,
                "subject": tunnel,
                "user_id": user_id,
                "actor": f"users/{user_id}",
                "time": now,
                "payload": {
                    "name": tunnel,
                    "display_name": f"bench tunnel {n}",
                    "state": "active",
                    "health": "healthy",
                    "active_endpoint": endpoint,
                    "endpoints": [{"url": endpoint, "health": "healthy"}],
                },
            }
        )
        outbox.append(
            {
                "id": new_id("dlv", stamp),
                "webhook_id": webhook_id,
                "event_id": event_id,
                "event_type": EVENT_TYPE,
                "state": "pending",
                "attempt_count": 0,
                "next_attempt_time": now + HOLD,
                "claim": 0,
                "test": False,
                "create_time": now,
                "update_time": now,
            }
        )
    return events, outbox


_PROGRESS = """
SELECT count(*) FILTER (WHERE state = 'succeeded'),
       count(*) FILTER (WHERE state = 'failed'),
       count(*) FILTER (WHERE state = 'pending' AND attempt_count > 0)
FROM webhook_deliveries
"""


@dataclass(frozen=True, slots=True)
class Recorded:
    """What the database holds once every delivery has succeeded."""

    #: Seconds from the release to each succeeded delivery's record, sorted.
    done_at: list[float]
    #: Transactions that recorded them (distinct ``update_time``).
    record_transactions: int
    attempts: int
    attempts_succeeded: int
    max_attempt_number: int
    #: Seconds from the release to the first request sent.
    first_send: float
    latency_p50_ms: float
    latency_p99_ms: float
    audit_entries: int


def recorded(conn: psycopg.Connection[Any], released: datetime) -> Recorded:
    """Read the outcome of a run from the database."""
    times = [
        r[0]
        for r in conn.execute(
            "SELECT update_time FROM webhook_deliveries WHERE state = 'succeeded' "
            "ORDER BY update_time"
        ).fetchall()
    ]
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE succeeded), coalesce(max(number), 0), "
        "min(time), percentile_cont(0.5) WITHIN GROUP (ORDER BY latency), "
        "percentile_cont(0.99) WITHIN GROUP (ORDER BY latency) FROM webhook_attempts"
    ).fetchone()
    audit = conn.execute(
        "SELECT count(*) FROM audit_log WHERE action = 'webhook.deliver' AND outcome = 'OK'"
    ).fetchone()
    assert row is not None
    assert audit is not None
    return Recorded(
        done_at=[(t - released).total_seconds() for t in times],
        record_transactions=len(set(times)),
        attempts=int(row[0]),
        attempts_succeeded=int(row[1]),
        max_attempt_number=int(row[2]),
        first_send=(row[3] - released).total_seconds() if row[3] else math.nan,
        latency_p50_ms=round(1000 * float(row[4] or 0), 2),
        latency_p99_ms=round(1000 * float(row[5] or 0), 2),
        audit_entries=int(audit[0]),
    )


def steady_rate(done_at: Sequence[float], window: tuple[float, float] = STEADY) -> float:
    """Deliveries per second between the record at ``window[0]`` of them and the one at
    ``window[1]``: those recorded after the first, up to and with the second, over the time
    between the two (deliveries are recorded a batch at a time, so this counts whole
    batches over the time they took)."""
    n = len(done_at)
    start = done_at[int(window[0] * n)]
    end = done_at[max(math.ceil(window[1] * n) - 1, 0)]
    if end <= start:
        return n / done_at[-1] if done_at and done_at[-1] > 0 else math.nan
    return sum(1 for t in done_at if start < t <= end) / (end - start)


def _start_together(processes: Sequence[ServerProcess], stack: contextlib.ExitStack) -> None:
    """Start the processes at the same time (each waits for its ``READY``), and have
    ``stack`` stop every one that started."""
    with ThreadPoolExecutor(len(processes)) as pool:
        futures = [pool.submit(p.__enter__) for p in processes]
        wait(futures)
    for process, future in zip(processes, futures, strict=True):
        if future.exception() is None:
            stack.push(process)
    for future in futures:
        future.result()  # the first failure, if any


def _pin_all(pid: int, cpus: set[int]) -> None:
    """Let every thread of process ``pid`` (and those it starts later) run on ``cpus``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def _machine_cpu() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy (all CPUs; not idle, not I/O wait,
    not stolen), and seconds stolen by the hypervisor, from ``/proc/stat``."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _census() -> dict[int, tuple[str, float]]:
    """Every process now: its name and CPU seconds so far."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                found[int(entry.name)] = (name, cpu_seconds(int(entry.name)))
    return found


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU seconds so far (or over a run, by :meth:`minus`) of each server process, the
    database's backends, the receiver, and every process on the machine; wall time."""

    wall: float
    servers: list[float]
    receiver: float
    #: The backends serving the measurement's database, by pid.
    backends: dict[int, float]
    machine: float
    steal: float
    #: Every process: (name, CPU seconds), by pid.
    everyone: dict[int, tuple[str, float]]

    @classmethod
    def now(cls, servers: Sequence[ServerProcess], backends: set[int], receiver: int) -> Usage:
        """The counters now."""
        machine, steal = _machine_cpu()
        everyone = _census()
        return cls(
            wall=time.monotonic(),
            servers=[cpu_seconds(s.pid) for s in servers],
            receiver=cpu_seconds(receiver),
            backends={pid: everyone[pid][1] for pid in backends if pid in everyone},
            machine=machine,
            steal=steal,
            everyone=everyone,
        )

    def minus(self, earlier: Usage) -> Usage:
        """What was used since ``earlier`` (a process that appeared since counts whole)."""

        def since(pid: int, cpu: float) -> float:
            return cpu - earlier.everyone.get(pid, ("", 0.0))[1]

        return Usage(
            wall=self.wall - earlier.wall,
            servers=[a - b for a, b in zip(self.servers, earlier.servers, strict=True)],
            receiver=self.receiver - earlier.receiver,
            backends={pid: since(pid, cpu) for pid, cpu in self.backends.items()},
            machine=self.machine - earlier.machine,
            steal=self.steal - earlier.steal,
            everyone={pid: (name, since(pid, cpu)) for pid, (name, cpu) in self.everyone.items()},
        )

    @property
    def database(self) -> float:
        """CPU seconds of the measurement's database backends."""
        return sum(self.backends.values())

    @property
    def other(self) -> float:
        """Busy CPU time not used by the servers, the backends or the receiver: this
        process's polling, PostgreSQL's own background work, and whatever else runs."""
        return max(self.machine - sum(self.servers) - self.database - self.receiver, 0.0)

    def busiest_others(self, ours: set[int], count: int = 3) -> dict[str, float]:
        """The CPU seconds of the processes outside ``ours`` that used the most, by name
        (processes that ended during the run are not seen)."""
        names: dict[str, float] = {}
        for pid, (name, cpu) in self.everyone.items():
            if pid not in ours and pid not in self.backends:
                names[name] = names.get(name, 0.0) + cpu
        return dict(sorted(names.items(), key=lambda item: -item[1])[:count])


# -- one measurement -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """One measured delivery of N webhooks by one or two server processes."""

    case: str
    round: int
    processes: int
    cpus: list[int | None]
    deliveries: int
    #: Deliveries per second over the steady window (:data:`STEADY`).
    deliveries_per_second: float
    #: N over the time from the release to the last record.
    overall_per_second: float
    seconds: float
    first_send_seconds: float
    record_transactions: int
    #: CPU time of the server processes from the release to the end, as a share of one
    #: CPU (all processes together), per process, and per delivery.
    server_cpu_percent: float
    server_cpu_percent_each: list[float]
    cpu_us_per_delivery: float
    #: The same for the database's backends (connections to this database).
    db_cpu_percent: float
    db_cpu_us_per_delivery: float
    receiver_cpu_percent: float
    #: Busy CPU time of everything else on the machine (see :attr:`Usage.other`), and
    #: time stolen by the hypervisor, as shares of one CPU.
    other_cpu_percent: float
    #: The other processes that used the most CPU, by name, as shares of one CPU.
    busiest_others: dict[str, float]
    steal_percent: float
    attempt_p50_ms: float
    attempt_p99_ms: float
    checks: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Bench:
    """What every measurement shares."""

    plan: Plan
    postgres: Postgres
    template: str
    run_id: str
    redis_url: str
    redis_prefix: str
    receiver: ReceiverProcess
    work_dir: Path
    #: One sealing key for every server process, as a real deployment must have.
    secrets_key: str = field(default_factory=new_key)

    def settings(self, database_url: str, label: str) -> dict[str, str]:
        """The settings of the server processes of one measurement, on top of the bench's
        (both replicas of a measurement share the database and the Redis prefix)."""
        return dict(DISPATCH_SETTINGS) | {
            "TP_DATABASE_URL": database_url,
            "TP_REDIS_URL": self.redis_url,
            "TP_REDIS_PREFIX": f"{self.redis_prefix}{label}:",
            "TP_SECRETS_KEY": self.secrets_key,
        }

    def measure(self, case: str, round_number: int) -> Run:
        """One checked measurement; round 0 is the (smaller) warm-up."""
        deliveries = self.plan.deliveries if round_number else self.plan.warmup_deliveries
        label = f"{case}-{round_number}"
        name = f"{self.run_id}_{case}_{round_number}"
        url = self.postgres.create(name, self.template)
        try:
            fill(url, deliveries, self.receiver.url("http", HOOK_PATH))
            return self._dispatch(case, round_number, deliveries, url, name, label)
        finally:
            self.postgres.drop(name)

    def _dispatch(
        self, case: str, round_number: int, deliveries: int, url: str, name: str, label: str
    ) -> Run:
        cpus = self.plan.cpus(CASES[case])
        processes = []
        for index, cpu in enumerate(cpus):
            args = ["--mode", "full", *([] if cpu is None else ["--cpu", str(cpu)])]
            env = server_env(self.work_dir / f"webhooks-{label}-{index}", self.settings(url, label))
            log = self.work_dir / f"webhooks-{label}-{index}.log"
            processes.append(ServerProcess(args, env, log))
        with contextlib.ExitStack() as stack:
            _start_together(processes, stack)
            if self.plan.layout == "unpinned" and self.plan.all_cpus:
                for process in processes:  # not the load CPU they inherited from here
                    _pin_all(process.pid, set(self.plan.all_cpus))
            with psycopg.connect(url, autocommit=True) as conn:
                return self._watch(conn, case, round_number, deliveries, name, processes, cpus)

    def _watch(
        self,
        conn: psycopg.Connection[Any],
        case: str,
        round_number: int,
        deliveries: int,
        name: str,
        servers: Sequence[ServerProcess],
        cpus: list[int | None],
    ) -> Run:
        received = self.receiver.stats()
        released = datetime.now(UTC) + LEAD
        conn.execute(
            "UPDATE webhook_deliveries SET next_attempt_time = %s WHERE state = 'pending'",
            (released,),
        )
        time.sleep(max((released - datetime.now(UTC)).total_seconds(), 0.0))
        backends = self.postgres.backend_pids(name)
        before = Usage.now(servers, backends, self.receiver.pid)
        succeeded = self._wait(conn, deliveries)
        used = Usage.now(servers, backends | self.postgres.backend_pids(name), self.receiver.pid)
        used = used.minus(before)
        after = self.receiver.stats()
        found = recorded(conn, released)
        checks = _check(deliveries, succeeded, found, received, after)
        checks["log_errors"] = sum(_errors(s.log_path) for s in servers)

        def percent(seconds: float) -> float:
            return round(100 * seconds / used.wall, 1)

        return Run(
            case=case,
            round=round_number,
            processes=len(servers),
            cpus=cpus,
            deliveries=deliveries,
            deliveries_per_second=round(steady_rate(found.done_at), 1),
            overall_per_second=round(deliveries / found.done_at[-1], 1),
            seconds=round(found.done_at[-1], 3),
            first_send_seconds=round(found.first_send, 3),
            record_transactions=found.record_transactions,
            server_cpu_percent=percent(sum(used.servers)),
            server_cpu_percent_each=[percent(c) for c in used.servers],
            cpu_us_per_delivery=round(1e6 * sum(used.servers) / deliveries, 1),
            db_cpu_percent=percent(used.database),
            db_cpu_us_per_delivery=round(1e6 * used.database / deliveries, 1),
            receiver_cpu_percent=percent(used.receiver),
            other_cpu_percent=percent(used.other),
            busiest_others={
                name: percent(cpu)
                for name, cpu in used.busiest_others(
                    {os.getpid(), self.receiver.pid, *(s.pid for s in servers)}
                ).items()
            },
            steal_percent=percent(used.steal),
            attempt_p50_ms=found.latency_p50_ms,
            attempt_p99_ms=found.latency_p99_ms,
            checks=checks,
        )

    @staticmethod
    def _wait(conn: psycopg.Connection[Any], deliveries: int) -> int:
        """Poll until every delivery succeeded; fail at once on a failed or retried one,
        or when nothing was recorded for :data:`STALL_SECONDS`."""
        last, moved = -1, time.monotonic()
        while True:
            row = conn.execute(_PROGRESS).fetchone()
            assert row is not None
            succeeded, failed, retrying = (int(v) for v in row)
            if failed or retrying:
                raise LoadError(
                    f"webhook bench: {failed} deliveries failed and {retrying} are waiting "
                    "for a retry; the receiver should have accepted every one"
                )
            if succeeded >= deliveries:
                return succeeded
            if succeeded != last:
                last, moved = succeeded, time.monotonic()
            elif time.monotonic() - moved > STALL_SECONDS:
                raise LoadError(
                    f"webhook bench: {succeeded} of {deliveries} deliveries succeeded, then "
                    f"none for {STALL_SECONDS:.0f} s"
                )
            time.sleep(POLL)


def _check(
    deliveries: int,
    succeeded: int,
    found: Recorded,
    before: Mapping[str, int],
    after: Mapping[str, int],
) -> dict[str, Any]:
    """Every delivery succeeded at its first attempt, was received exactly once, and was
    audited; the counts, for the report."""
    requests = after["requests"] - before["requests"]
    distinct = after["distinct_ids"] - before["distinct_ids"]
    checks = {
        "succeeded": succeeded,
        "attempts": found.attempts,
        "attempts_succeeded": found.attempts_succeeded,
        "max_attempt_number": found.max_attempt_number,
        "audit_entries": found.audit_entries,
        "received_requests": requests,
        "received_distinct_ids": distinct,
        "received_unsigned": after["unsigned"] - before["unsigned"],
        "receiver_refused": after["refused"] - before["refused"],
        "receiver_connections": after["connections"] - before["connections"],
    }
    wanted = {
        "succeeded": deliveries,
        "attempts": deliveries,
        "attempts_succeeded": deliveries,
        "max_attempt_number": 1,
        "audit_entries": deliveries,
        "received_requests": deliveries,
        "received_distinct_ids": deliveries,
        "received_unsigned": 0,
        "receiver_refused": 0,
    }
    wrong = {k: f"{checks[k]} (wanted {v})" for k, v in wanted.items() if checks[k] != v}
    if wrong:
        raise LoadError(f"webhook bench: counts do not add up: {wrong}")
    return checks


def _errors(log_path: Path) -> int:
    """ERROR (and worse) records in a server's JSON log."""
    count = 0
    with log_path.open(errors="replace") as log:
        for line in log:
            with contextlib.suppress(ValueError):
                if json.loads(line).get("level") in {"ERROR", "CRITICAL"}:
                    count += 1
    return count


def _say(run: Run) -> None:
    others = ", ".join(f"{name} {cpu:.0f} %" for name, cpu in run.busiest_others.items())
    what = "warm-up" if run.round == 0 else f"round {run.round}"
    each = " + ".join(f"{c:.0f}" for c in run.server_cpu_percent_each)
    print(
        f"{what} webhooks/{run.case}: {run.deliveries_per_second:.0f} deliveries/s steady, "
        f"{run.overall_per_second:.0f} overall ({run.deliveries} in {run.seconds:.1f} s); "
        f"server CPU {each} %, database {run.db_cpu_percent:.0f} %, receiver "
        f"{run.receiver_cpu_percent:.0f} %, other {run.other_cpu_percent:.0f} % ({others})",
        flush=True,
    )


# -- the whole measurement -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Medians:
    """Medians over the measured rounds of one case."""

    deliveries_per_second: float
    overall_per_second: float
    server_cpu_percent: float
    cpu_us_per_delivery: float
    db_cpu_percent: float
    db_cpu_us_per_delivery: float
    receiver_cpu_percent: float
    other_cpu_percent: float
    attempt_p50_ms: float
    attempt_p99_ms: float


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the webhook part of one ``make bench`` found, and how."""

    date: str
    machine: Mapping[str, Any]
    server_settings: Mapping[str, str]
    plan: Mapping[str, Any]
    targets: Targets
    runs: Sequence[Run]
    warmups: Sequence[Run]

    def runs_of(self, case: str) -> list[Run]:
        """The measured runs of one case, in round order."""
        return [r for r in self.runs if r.case == case]

    def medians_of(self, case: str) -> Medians:
        """Medians over the rounds of one case."""
        runs = self.runs_of(case)
        return Medians(
            **{
                f.name: statistics.median(getattr(r, f.name) for r in runs)
                for f in dataclasses.fields(Medians)
            }
        )

    def ratio(self) -> Ratio:
        """Steady throughput of two processes over one, paired by round."""
        pairs = zip(self.runs_of("two"), self.runs_of("one"), strict=True)
        per_round = [a.deliveries_per_second / b.deliveries_per_second for a, b in pairs]
        return Ratio(statistics.median(per_round), per_round)

    def target_results(self) -> list[TargetResult]:
        """One process's throughput, and what the second adds."""
        one = self.medians_of("one").deliveries_per_second
        ratio = self.ratio()
        per_round = ", ".join(f"{r:.3f}" for r in ratio.per_round)
        return [
            TargetResult(
                "one process, deliveries/s",
                f">= {self.targets.one_process_per_second:.0f}",
                f"{one:.0f}",
                one >= self.targets.one_process_per_second,
            ),
            TargetResult(
                "two processes / one",
                f">= {self.targets.two_over_one:.2f}",
                f"{ratio.median:.3f} (per round: {per_round})",
                ratio.median >= self.targets.two_over_one,
            ),
        ]

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data, raw runs included."""
        return {
            "benchmark": "webhook delivery throughput on PostgreSQL: one server process "
            "dispatching vs two dispatching the same queue",
            "date": self.date,
            "machine": dict(self.machine),
            "server_settings": dict(self.server_settings),
            "plan": dict(self.plan),
            "targets": dataclasses.asdict(self.targets),
            "medians": {case: dataclasses.asdict(self.medians_of(case)) for case in CASES},
            "ratio_two_over_one": dataclasses.asdict(self.ratio()),
            "target_results": [dataclasses.asdict(t) for t in self.target_results()],
            "runs": [dataclasses.asdict(r) for r in self.runs],
            "warmups": [dataclasses.asdict(r) for r in self.warmups],
        }


def render_table(report: Report) -> str:
    """The results as Markdown tables."""
    lines = [
        (
            "| processes | CPUs | deliveries/s (steady, median) | overall/s | server CPU % | "
            "CPU µs/delivery | database CPU % | DB µs/delivery | receiver CPU % | "
            "other CPU % | attempt p50 / p99 ms | steady/s per round |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in CASES:
        m, runs = report.medians_of(case), report.runs_of(case)
        cpus = ", ".join("-" if c is None else str(c) for c in runs[0].cpus)
        rounds = " / ".join(f"{r.deliveries_per_second:.0f}" for r in runs)
        lines.append(
            f"| {case} | {cpus} | {m.deliveries_per_second:.0f} | {m.overall_per_second:.0f} "
            f"| {m.server_cpu_percent:.0f} | {m.cpu_us_per_delivery:.0f} "
            f"| {m.db_cpu_percent:.0f} | {m.db_cpu_us_per_delivery:.0f} "
            f"| {m.receiver_cpu_percent:.0f} | {m.other_cpu_percent:.0f} "
            f"| {m.attempt_p50_ms:.1f} / {m.attempt_p99_ms:.1f} "
            f"| {rounds} |"
        )
    lines += ["", "| target | wanted | measured | |", "|---|---:|---:|---|"]
    lines += [
        f"| {t.label} | {t.wanted} | {t.measured} | {'met' if t.met else '**missed**'} |"
        for t in report.target_results()
    ]
    return "\n".join(lines)


#: A run whose *other CPU %* is above this was measured on a busy machine.
BUSY_PERCENT = 20.0


def _busy(report: Report) -> str:
    """A warning naming the runs measured on a busy machine, if any."""
    busy = [r for r in report.runs if r.other_cpu_percent > BUSY_PERCENT]
    if not busy:
        return ""
    said = "; ".join(
        f"round {r.round} {r.case}: other {r.other_cpu_percent:.0f} % ("
        + ", ".join(f"{n} {c:.0f} %" for n, c in r.busiest_others.items())
        + ")"
        for r in busy
    )
    return (
        f" **The machine was busy with other work during {len(busy)} of the "
        f"{len(report.runs)} runs**: {said}."
    )


def render_block(report: Report, json_name: str) -> str:
    """The generated results section of ``bench/README.md``."""
    machine, plan = report.machine, report.plan
    source = machine.get("source", {})
    dirty = source.get("uncommitted") or []
    code = f"Server code: commit {str(source.get('commit', 'unknown'))[:12]}" + (
        f", with uncommitted changes to {', '.join(dirty)}." if dirty else " (clean)."
    )
    each = "; ".join(
        f"{case}: "
        + " / ".join(
            " + ".join(f"{c:.0f}" for c in r.server_cpu_percent_each) for r in report.runs_of(case)
        )
        for case in CASES
    )
    where = (
        f"Latest run: {report.date}, {machine.get('cpus')} CPUs "
        f"({machine.get('cpu_model')}), Python {machine.get('python')}, "
        f"{machine.get('postgres')}, aiohttp {machine.get('aiohttp')}. "
        f"{plan['rounds']} rounds, medians; {plan['deliveries']} deliveries per run, "
        f"layout `{plan['layout']}` (receiver and bench on CPU {plan['load_cpu']}). "
        f"{code} Raw numbers: `results/{json_name}`."
    )
    return "\n".join(
        [
            where,
            "",
            render_table(report),
            "",
            f"Server CPU % of each process, per round: {each}.{_busy(report)}",
            "",
            "Made by `make bench` (or `.venv/bin/python -m bench.run --only webhooks`).",
        ]
    )


def write_results(report: Report, directory: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` (the data) and ``<stem>.txt`` (the tables and every run)."""
    sections = [render_table(report), "", "settings (on top of the bench's):"]
    sections += [f"  {k}={v}" for k, v in DISPATCH_SETTINGS.items()]
    for run in [*report.warmups, *report.runs]:
        what = "warm-up" if run.round == 0 else f"round {run.round}"
        sections += ["", f"--- {what}, {run.case} ---"]
        sections += [
            f"  {k}: {v}" for k, v in dataclasses.asdict(run).items() if k not in {"case", "round"}
        ]
    return write_json_and_text(directory, stem, report.to_json(), sections)


def publish(report: Report, results_dir: Path, readme: Path) -> list[Path]:
    """Print the table, write ``results/webhooks-<date>.{json,txt}`` and the README
    section; the files written."""
    json_path, text_path = write_results(report, results_dir, f"webhooks-{report.date[:10]}")
    update_readme(readme, {"webhook-results": render_block(report, json_path.name)})
    print(f"\n{render_table(report)}")
    return [json_path, text_path, readme]


def machine_info(postgres: Postgres, base: Mapping[str, Any]) -> dict[str, Any]:
    """Where the numbers were measured: ``base`` plus PostgreSQL's and aiohttp's versions."""
    return {**base, "postgres": postgres.version(), "aiohttp": aiohttp.__version__}


@contextlib.contextmanager
def _bench(plan: Plan, work_dir: Path, redis_url: str, postgres: Postgres) -> Iterator[Bench]:
    run_id = f"tp_bench_wh_{secrets.token_hex(4)}"
    template = f"{run_id}_template"
    prefix = f"tpbench-{run_id.rsplit('_', 1)[1]}:webhooks-"
    url = postgres.create(template)
    try:
        migrate(server_env(work_dir, {"TP_DATABASE_URL": url}), work_dir / "webhooks-migrate.log")
        with ReceiverProcess(work_dir / "webhooks-receiver.log") as receiver:
            yield Bench(plan, postgres, template, run_id, redis_url, prefix, receiver, work_dir)
    finally:
        postgres.drop(template)
        _delete_keys(redis_url, prefix)


def _delete_keys(redis_url: str, prefix: str) -> None:
    """Delete what the servers left in Redis under ``prefix``."""
    with (
        contextlib.suppress(redis.RedisError, OSError),
        redis.Redis.from_url(redis_url, socket_timeout=5) as client,
    ):
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])


def measure(
    plan: Plan, work_dir: Path, redis_url: str, postgres_url: str, machine: Mapping[str, Any]
) -> Report:
    """Warm up, then the measured rounds (the order of the two cases reverses every round);
    the report."""
    postgres = Postgres(postgres_url)
    info = machine_info(postgres, machine)
    try:
        with _bench(plan, work_dir, redis_url, postgres) as bench:
            warmups = [bench.measure(case, 0) for case in CASES]
            for run in warmups:
                _say(run)
            runs = []
            for round_number in range(1, plan.rounds + 1):
                order = list(CASES) if round_number % 2 else list(CASES)[::-1]
                for case in order:
                    runs.append(bench.measure(case, round_number))
                    _say(runs[-1])
    except (psycopg.Error, sa.exc.SQLAlchemyError, OSError) as exc:
        raise LoadError(f"webhook bench: {type(exc).__name__}: {exc}") from exc
    return Report(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=info,
        server_settings=dict(SERVER_SETTINGS) | dict(DISPATCH_SETTINGS),
        plan=plan.as_dict(),
        targets=Targets(),
        runs=runs,
        warmups=warmups,
    )


# -- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``receiver``: the receiver process; ``run``: the webhook bench alone, printed only
    (for trying layouts and sizes; ``python -m bench.run --only webhooks`` publishes)."""
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    receiver = commands.add_parser("receiver", help="serve the receiver")
    receiver.add_argument("--port", type=int, default=0)
    receiver.add_argument("--cpu", type=int, help="run on this CPU only")
    trial = commands.add_parser("run", help="measure, print, publish nothing")
    default = Plan()
    trial.add_argument("--deliveries", type=int, default=default.deliveries)
    trial.add_argument("--warmup-deliveries", type=int, default=default.warmup_deliveries)
    trial.add_argument("--rounds", type=int, default=default.rounds)
    trial.add_argument("--layout", choices=("split", "same", "unpinned"), default=default.layout)
    trial.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    trial.add_argument("--redis-url", default="redis://127.0.0.1:6379/3")
    trial.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.command == "receiver":
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        asyncio.run(serve_receiver(args.port))
        return 0
    plan = Plan.on_this_machine(
        deliveries=args.deliveries,
        warmup_deliveries=args.warmup_deliveries,
        rounds=args.rounds,
        layout=args.layout,
    )
    if plan.load_cpu is not None:
        os.sched_setaffinity(0, {plan.load_cpu})
    return measure_alone(
        "webhooks",
        lambda work_dir: measure(plan, work_dir, args.redis_url, args.postgres_url, {}),
        render_table,
        keep=args.keep,
    )


if __name__ == "__main__":
    sys.exit(main())
