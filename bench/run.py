"""``make bench``: GetUser over gRPC (the full pipeline against a bare grpc.aio server, and
the full server with the rate limiter on, in Redis or in process, against off, with
h2load) and ``GET /v1/users/me`` over HTTP (the embedded gateway, the standalone gateway
and a FastAPI baseline, with wrk), all in one run.

Every server runs in a child process of its own (``python -m bench.server``) on one
migrated SQLite database in a temporary directory; the load tools load them over loopback
in alternating order, and the medians of the measured rounds are compared. Then webhook
delivery throughput on PostgreSQL, one server process dispatching against two
(``bench/webhooks.py``), and the full server with two workers against one on PostgreSQL and
Redis (``bench/workers.py``), and the streaming proxy against ``ssh -R``
(``bench/proxies.py``), and the admin's user search at 100,000 users on PostgreSQL
(``bench/user_search.py``). ``--only getuser|webhooks|workers|sqlite|search|proxy`` runs
one part alone. See
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import grpc
from tunnelplane.v1 import users_pb2

from bench import h2load, limiter, probes, report, webhooks, workers, workers_report, wrk
from bench.errors import LoadError
from bench.probes import Caller, Expected
from bench.processes import SERVER_SETTINGS, ServerProcess, cpu_seconds, migrate, server_env
from bench.report import Measurement, Report, Targets
from bench.server import GET_USER, HTTP_GET_ME

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
TARGETS = Targets()
#: Order of a round (odd rounds; even rounds run it backwards): each compared pair is
#: measured back to back (limiter_redis-limiter_off, full_no_id-limiter_memory, bare-full,
#: full-embedded, embedded-fastapi).
ORDER = (
    "limiter_redis",
    "limiter_off",
    "full_no_id",
    "limiter_memory",
    "bare",
    "full",
    "embedded",
    "fastapi",
    "standalone",
)


@dataclass(frozen=True, slots=True)
class Plan:
    """How much load. The default run takes under three minutes on 2 CPUs."""

    requests: int = 6000
    warmup_requests: int = 1500
    wrk_seconds: int = 8
    wrk_warmup_seconds: int = 2
    clients: int = 50
    rounds: int = 5
    #: The limiter pair's runs of a round are cut into this many slices each, interleaved
    #: (A B B A A B B A ...), of ``requests // limiter_slices`` each (a round's total is
    #: every server's): their target holds in every round, and on this shared machine a
    #: server's throughput drifts by more than the limiter's cost within seconds
    #: (``bench/README.md``).
    limiter_slices: int = 4
    #: CPUs for the servers and for the load tools (and this process); None: not pinned.
    server_cpu: int | None = None
    load_cpu: int | None = None

    @classmethod
    def on_this_machine(cls, **sizes: int) -> Plan:
        """A plan that gives the servers one CPU and the load tools another, if there are two."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(**sizes)
        return cls(**sizes, server_cpu=cpus[0], load_cpu=cpus[1])

    def server_args(self) -> list[str]:
        """The ``bench.server`` arguments that pin a server."""
        return [] if self.server_cpu is None else ["--cpu", str(self.server_cpu)]

    def as_dict(self) -> dict[str, int | None]:
        """The plan, with the load tools' fixed settings, for the report."""
        return {
            "requests": self.requests,
            "warmup_requests": self.warmup_requests,
            "wrk_seconds": self.wrk_seconds,
            "wrk_warmup_seconds": self.wrk_warmup_seconds,
            "clients": self.clients,
            "h2load_max_concurrent_streams": 1,
            "threads": 1,
            "rounds": self.rounds,
            "limiter_slices": self.limiter_slices,
            "limiter_slice_requests": self.requests // self.limiter_slices,
            "server_cpu": self.server_cpu,
            "load_cpu": self.load_cpu,
        }


@dataclass(frozen=True, slots=True)
class Subject:
    """One thing under load: its name, the tool that loads it (h2load or wrk), its URL,
    and the processes that serve it (whose CPU time a run measures)."""

    name: str
    tool: str
    url: str
    pids: tuple[int, ...]
    #: h2load only: the request id every call sends (None: none).
    request_id: str | None = h2load.REQUEST_ID

    def cpu_seconds(self) -> float:
        """CPU time the serving processes have used so far."""
        return sum(cpu_seconds(pid) for pid in self.pids)


@dataclass(frozen=True, slots=True)
class Usage:
    """The serving processes' CPU time over one run, and the run's wall time."""

    cpu_seconds: float
    wall_seconds: float

    def percent(self) -> float:
        """CPU time as a share of wall time (100 = one CPU busy throughout)."""
        return round(100 * self.cpu_seconds / self.wall_seconds, 1)

    def per_request_us(self, requests: int) -> float:
        """CPU microseconds per request."""
        return round(1e6 * self.cpu_seconds / requests, 1)


@dataclass(frozen=True, slots=True)
class Bench:
    """What every run shares: the plan, the caller, the gRPC request and answer size."""

    plan: Plan
    caller: Caller
    body_file: Path
    response_frame_size: int
    work_dir: Path

    def run(self, subject: Subject, round_number: int) -> Measurement:
        """One checked run; round 0 is the (shorter) warm-up."""
        if subject.tool == "h2load":
            return self._h2load(subject, round_number)
        return self._wrk(subject, round_number)

    def run_slice(self, subject: Subject, round_number: int, piece: int) -> Measurement:
        """One checked h2load run, slice ``piece`` of a round (a share of its requests)."""
        return self._h2load(subject, round_number, piece)

    @contextlib.contextmanager
    def _usage(self, subject: Subject) -> Iterator[list[Usage]]:
        """Measure the CPU time ``subject``'s processes use in the block."""
        found: list[Usage] = []
        cpu, wall = subject.cpu_seconds(), time.monotonic()
        yield found
        found.append(Usage(subject.cpu_seconds() - cpu, time.monotonic() - wall))

    def _h2load(self, subject: Subject, round_number: int, piece: int | None = None) -> Measurement:
        plan = self.plan
        requests = plan.requests if round_number else plan.warmup_requests
        suffix = "" if piece is None else f"-{piece}"
        load = h2load.Load(
            url=subject.url,
            token=self.caller.access_token,
            body_file=self.body_file,
            requests=requests if piece is None else plan.requests // plan.limiter_slices,
            clients=plan.clients,
            log_file=self.work_dir / f"{subject.name}-{round_number}{suffix}.h2load.log",
            request_id=subject.request_id,
        )
        with self._usage(subject) as usage:
            output = h2load.run(load)
        summary = h2load.parse_summary(output)
        h2load.check(summary, load.requests, self.response_frame_size)
        latencies = h2load.latencies_ms(load.log_file)
        return Measurement(
            server=subject.name,
            round=round_number,
            tool="h2load",
            requests=summary.total,
            seconds=summary.seconds,
            requests_per_second=summary.requests_per_second,
            **latency_fields(latencies),
            server_cpu_percent=usage[0].percent(),
            cpu_us_per_request=usage[0].per_request_us(summary.total),
            command=shlex.join(load.command(redact=True)),
            output=h2load.trimmed(output),
        )

    def _wrk(self, subject: Subject, round_number: int) -> Measurement:
        plan = self.plan
        seconds = plan.wrk_seconds if round_number else plan.wrk_warmup_seconds
        load = wrk.Load(subject.url, self.caller.access_token, seconds, plan.clients)
        with self._usage(subject) as usage:
            output = wrk.run(load)
        summary = wrk.parse_summary(output)
        wrk.check(summary)
        return Measurement(
            server=subject.name,
            round=round_number,
            tool="wrk",
            requests=summary.requests,
            seconds=summary.seconds,
            requests_per_second=summary.requests_per_second,
            mean_ms=summary.mean_ms,
            p50_ms=summary.p50_ms,
            p90_ms=summary.p90_ms,
            p95_ms=None,
            p99_ms=summary.p99_ms,
            max_ms=summary.max_ms,
            server_cpu_percent=usage[0].percent(),
            cpu_us_per_request=usage[0].per_request_us(summary.requests),
            command=shlex.join(load.command(redact=True)),
            output=output.strip(),
        )


def round_order(round_number: int) -> Sequence[str]:
    """Alternate the direction, so drift does not favour one server."""
    return ORDER if round_number % 2 else ORDER[::-1]


def _say(run: Measurement) -> None:
    what = "warm-up" if run.round == 0 else f"round {run.round}"
    print(
        f"{what} {run.server}: {run.requests_per_second:.0f} req/s, "
        f"p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms ({run.seconds:.1f} s)",
        flush=True,
    )


#: The pair whose rounds are interleaved slices (``Plan.limiter_slices``).
SLICED = ("limiter_redis", "limiter_off")


def interleaved(
    bench: Bench, subjects: Mapping[str, Subject], round_number: int
) -> list[Measurement]:
    """The sliced pair's runs of one round: A B B A A B B A ..., each server's slices
    merged into one measurement (requests, time, CPU and latencies of all of them)."""
    first, second = SLICED if round_number % 2 else SLICED[::-1]
    slices: dict[str, list[Measurement]] = {first: [], second: []}
    for piece in range(bench.plan.limiter_slices):
        for name in (first, second) if piece % 2 == 0 else (second, first):
            slices[name].append(bench.run_slice(subjects[name], round_number, piece))
    latencies = {
        name: sorted(
            value
            for piece in range(bench.plan.limiter_slices)
            for value in h2load.latencies_ms(
                bench.work_dir / f"{name}-{round_number}-{piece}.h2load.log"
            )
        )
        for name in slices
    }
    return [merged(slices[name], latencies[name]) for name in (first, second)]


class Latencies(TypedDict):
    """A measurement's latency fields, ms."""

    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


def latency_fields(latencies: Sequence[float]) -> Latencies:
    """A measurement's latency fields from every request's latency, sorted, in ms."""
    return {
        "mean_ms": round(sum(latencies) / len(latencies), 3),
        "p50_ms": h2load.percentile(latencies, 0.50),
        "p90_ms": h2load.percentile(latencies, 0.90),
        "p95_ms": h2load.percentile(latencies, 0.95),
        "p99_ms": h2load.percentile(latencies, 0.99),
        "max_ms": latencies[-1],
    }


def merged(runs: Sequence[Measurement], latencies: Sequence[float]) -> Measurement:
    """One measurement of several runs of one server: throughput over their summed time,
    CPU over their summed CPU time, percentiles over every request's latency."""
    requests = sum(r.requests for r in runs)
    seconds = sum(r.seconds for r in runs)
    cpu = sum(r.cpu_us_per_request * r.requests / 1e6 for r in runs)
    wall = sum(r.cpu_us_per_request * r.requests / 1e4 / r.server_cpu_percent for r in runs)
    return replace(
        runs[0],
        requests=requests,
        seconds=round(seconds, 3),
        requests_per_second=round(requests / seconds, 2),
        **latency_fields(latencies),
        server_cpu_percent=round(100 * cpu / wall, 1),
        cpu_us_per_request=round(1e6 * cpu / requests, 1),
        output="\n\n".join(r.output for r in runs),
    )


def measure_all(
    bench: Bench, subjects: Mapping[str, Subject]
) -> tuple[list[Measurement], list[Measurement]]:
    """Warm every server up, then the measured rounds: (warm-ups, measured runs)."""
    warmups = [bench.run(subjects[name], 0) for name in ORDER]
    for run in warmups:
        _say(run)
    runs: list[Measurement] = []
    for round_number in range(1, bench.plan.rounds + 1):
        for name in round_order(round_number):
            if name in SLICED and any(r.round == round_number and r.server == name for r in runs):
                continue  # ran with its pair
            done = (
                interleaved(bench, subjects, round_number)
                if name in SLICED
                else [bench.run(subjects[name], round_number)]
            )
            for run in done:
                runs.append(run)
                _say(run)
    return warmups, runs


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, if there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    """Where the numbers were measured."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "h2load": h2load.version(),
        "wrk": wrk.version(),
        "load_average_before": os.getloadavg(),
        "source": source_info(),
    }


#: What the servers run: a change here, uncommitted, makes the numbers someone else's.
SOURCE_PATHS = ("server", "gateway", "generated", "proto", "migrations", "pyproject.toml")


def _git(*args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )
    return result.stdout if result.returncode == 0 else ""


def source_info() -> dict[str, object]:
    """The commit measured, and any uncommitted change to what the servers run."""
    changed = _git("status", "--porcelain", "--", *SOURCE_PATHS)
    return {
        "commit": _git("rev-parse", "HEAD").strip() or "unknown",
        # Each line is "XY path": the status's two columns (either may be a space).
        "uncommitted": [line[3:] for line in changed.splitlines() if line.strip()],
    }


def start_servers(
    plan: Plan, work_dir: Path, setup: limiter.Setup, stack: contextlib.ExitStack
) -> tuple[Caller, dict[str, ServerProcess]]:
    """Migrate, start the full server, sign the bench user up, then start the others."""
    data_dir = work_dir / "data"
    env = server_env(data_dir)
    migrate(env, work_dir / "migrate.log")

    def start(name: str, *args: str, settings: Mapping[str, str] | None = None) -> ServerProcess:
        process = ServerProcess(
            [*args, *plan.server_args()],
            env if settings is None else server_env(data_dir, settings),
            work_dir / f"{name}.log",
        )
        return stack.enter_context(process)

    full = start("full", "--mode", "full")
    caller = probes.sign_up(full.ports["grpc"])
    upstream = f"127.0.0.1:{full.ports['grpc']}"
    jwks = full.url("http", "/.well-known/jwks.json")
    servers = {
        "full": full,
        "bare": start("bare", "--mode", "bare", "--user-id", caller.user_id),
        "standalone": start("standalone", "--mode", "gateway", "--upstream", upstream),
        "fastapi": start("fastapi", "--mode", "fastapi", "--jwks-url", jwks),
    }
    for name in limiter.SERVERS:
        servers[name] = start(name, "--mode", "full", settings=setup.settings(name))
    return caller, servers


def subjects_of(servers: Mapping[str, ServerProcess]) -> dict[str, Subject]:
    """What the load tools load: gRPC on full and bare, HTTP on the other three."""
    full, bare = servers["full"], servers["bare"]
    standalone, fastapi = servers["standalone"], servers["fastapi"]
    return {
        "full": Subject("full", "h2load", full.url("grpc", GET_USER), (full.pid,)),
        "bare": Subject("bare", "h2load", bare.url("grpc", GET_USER), (bare.pid,)),
        "embedded": Subject("embedded", "wrk", full.url("http", HTTP_GET_ME), (full.pid,)),
        # The standalone gateway's calls are served by full: both processes do the work.
        "standalone": Subject(
            "standalone", "wrk", standalone.url("http", HTTP_GET_ME), (standalone.pid, full.pid)
        ),
        "fastapi": Subject("fastapi", "wrk", fastapi.url("http", HTTP_GET_ME), (fastapi.pid,)),
        # The limiter runs send no request id: the limiter would take a repeated one for
        # retries of one call, and count only the first against the monthly quota. So that
        # limiter_memory has a baseline that differs only in the limiter, full is also
        # loaded without one.
        "full_no_id": Subject(
            "full_no_id", "h2load", full.url("grpc", GET_USER), (full.pid,), None
        ),
        **{
            name: Subject(
                name, "h2load", servers[name].url("grpc", GET_USER), (servers[name].pid,), None
            )
            for name in limiter.SERVERS
        },
    }


def check_answers(servers: Mapping[str, ServerProcess], caller: Caller) -> users_pb2.User:
    """One real call to every server before any load: all return the same user."""
    expected = probes.get_me(servers["full"].ports["grpc"], caller)
    if probes.get_me(servers["bare"].ports["grpc"], caller) != expected:
        raise LoadError("the bare server answers GetUser differently from the full one")
    http_ports = {
        "embedded": servers["full"].ports["http"],
        "standalone": servers["standalone"].ports["http"],
        "fastapi": servers["fastapi"].ports["http"],
    }
    documents = {name: probes.http_get_me(name, port, caller) for name, port in http_ports.items()}
    probes.check_same_user(documents, expected)
    for name in limiter.SERVERS:
        user, trailers = limiter.get_me_trailers(servers[name].ports["grpc"], caller)
        if user != expected:
            raise LoadError(f"{name} answers GetUser differently from full")
        limiter.check_trailers(name, trailers)
    return expected


@dataclass(frozen=True, slots=True)
class UnderTest:
    """The started and checked servers, what loads them, and the bench."""

    bench: Bench
    subjects: dict[str, Subject]
    servers: dict[str, ServerProcess]


def _clean_up(setup: limiter.Setup) -> None:
    with contextlib.suppress(Exception):
        print(f"deleted {setup.clean_up()} Redis keys under {setup.run_prefix}", flush=True)


@contextlib.contextmanager
def servers_under_test(plan: Plan, work_dir: Path, setup: limiter.Setup) -> Iterator[UnderTest]:
    """Every server started and checked, and the bench that loads them; afterwards, the
    servers stopped and their Redis keys deleted."""
    setup.require_redis()
    with contextlib.ExitStack() as stack:
        stack.callback(_clean_up, setup)  # runs last, once every server has stopped
        caller, servers = start_servers(plan, work_dir, setup, stack)
        expected = check_answers(servers, caller)
        body_file = work_dir / "get-user-request.bin"
        body_file.write_bytes(h2load.grpc_frame(users_pb2.GetUserRequest(name="users/me")))
        bench = Bench(plan, caller, body_file, len(h2load.grpc_frame(expected)), work_dir)
        yield UnderTest(bench, subjects_of(servers), servers)


def sent(runs: Sequence[Measurement], server: str, clients: int) -> Expected:
    """The calls the load tools sent to ``server`` (exact for h2load, a range for wrk)."""
    mine = [r for r in runs if r.server == server]
    total = sum(r.requests for r in mine)
    if all(r.tool == "h2load" for r in mine):
        return Expected(exact=total)
    return Expected(at_least=total, in_flight=clients * len(mine))


def check_logs(plan: Plan, work_dir: Path, runs: Sequence[Measurement]) -> dict[str, Any]:
    """Every call the servers logged succeeded, except the forged-token probes, and the
    counts fit what was sent (the probes of :func:`check_answers` included)."""
    probe = Expected(exact=1)
    # full's gRPC port got h2load (with and without a request id), the standalone gateway,
    # and one probe from each of them; its HTTP port got wrk and one probe. Each HTTP server
    # also refused one forged token.
    grpc_calls = sent(runs, "full", plan.clients) + sent(runs, "full_no_id", plan.clients)
    grpc_calls += sent(runs, "standalone", plan.clients)
    grpc_calls += probe + probe
    http_calls = sent(runs, "embedded", plan.clients) + probe
    fastapi_calls = sent(runs, "fastapi", plan.clients) + probe
    codes = probes.access_log_codes(work_dir / "full.log")
    fastapi = probes.uvicorn_statuses(work_dir / "fastapi.log")
    refused = {"UNAUTHENTICATED": 1}
    probes.check_codes("full server, gRPC", codes["grpc"], "OK", grpc_calls, refused)
    probes.check_codes("full server, HTTP", codes["http"], "OK", http_calls, refused)
    probes.check_codes("FastAPI", fastapi, "200", fastapi_calls, {"401": 1})
    found: dict[str, Any] = {
        "full_getuser_codes": {transport: dict(c) for transport, c in codes.items()},
        "fastapi_statuses": dict(fastapi),
    }
    # Each limiter server got h2load and one probe, over gRPC only.
    for name in limiter.SERVERS:
        theirs = probes.access_log_codes(work_dir / f"{name}.log")
        calls = sent(runs, name, plan.clients) + probe
        probes.check_codes(f"{name}, gRPC", theirs["grpc"], "OK", calls, {})
        probes.check_codes(f"{name}, HTTP", theirs["http"], "OK", Expected(), {})
        found[f"{name}_getuser_codes"] = dict(theirs["grpc"])
    return found


def limiter_calls(runs: Sequence[Measurement]) -> dict[str, int]:
    """The GetUser calls each limiter server got: h2load's and the probe's."""
    return {name: sent(runs, name, 0).exact + 1 for name in limiter.SERVERS}


def build_report(
    plan: Plan,
    machine: dict[str, object],
    runs: list[Measurement],
    logs: dict[str, Any],
    setup: limiter.Setup,
    limiter_checks: dict[str, Any],
) -> Report:
    """The report of this run."""
    return Report(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine,
        server_settings=dict(SERVER_SETTINGS),
        load=plan.as_dict(),
        targets=TARGETS,
        runs=runs,
        log_checks=logs,
        limiter_settings=setup.all_settings(),
        limiter_checks=limiter_checks,
    )


def publish(result: Report) -> None:
    """Print the tables, write ``bench/results/`` and the README results sections."""
    stem = f"getuser-{result.date[:10]}"
    json_path, text_path = report.write_results(result, RESULTS_DIR, stem)
    report.update_readme(README, report.readme_blocks(result, json_path.name))
    print(f"\n{report.render_all_tables(result)}")
    print(
        f"\nwrote {json_path.relative_to(ROOT)}, {text_path.relative_to(ROOT)}, "
        f"{README.relative_to(ROOT)}"
    )


def webhook_machine() -> dict[str, object]:
    """Where the webhook numbers were measured (they need neither h2load nor wrk)."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_before": os.getloadavg(),
        "source": source_info(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; the defaults are what ``make bench`` measures."""
    default = Plan()
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--requests", type=int, default=default.requests)
    parser.add_argument("--warmup-requests", type=int, default=default.warmup_requests)
    parser.add_argument("--wrk-seconds", type=int, default=default.wrk_seconds)
    parser.add_argument("--rounds", type=int, default=default.rounds)
    parser.add_argument(
        "--no-publish", action="store_true", help="print only; leave results/ and README alone"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--only",
        choices=("getuser", "webhooks", "workers", "sqlite", "search", "proxy"),
        help="run one part only: the GetUser servers, webhook delivery, two workers "
        "against one, the SQLite drivers, the admin's user search at 100,000 users, or the "
        "streaming proxy against ssh -R (default: all six)",
    )
    hooks = webhooks.Plan()
    parser.add_argument("--webhook-deliveries", type=int, default=hooks.deliveries)
    parser.add_argument("--webhook-rounds", type=int, default=hooks.rounds)
    parser.add_argument("--workers-rounds", type=int, default=workers.Plan().rounds)
    parser.add_argument("--sqlite-rounds", type=int, default=3)
    parser.add_argument(
        "--postgres-url",
        default=webhooks.DEFAULT_POSTGRES_URL,
        help="the PostgreSQL the webhook runs create their databases in (dropped after)",
    )
    parser.add_argument(
        "--redis-url",
        default=limiter.DEFAULT_REDIS_URL,
        help="the Redis of the limiter runs (keys under a fresh prefix, deleted after); "
        "default: a redis-server of the bench's own, on the load tools' CPU",
    )
    return parser.parse_args(argv)


def measure(plan: Plan, work_dir: Path, redis_url: str) -> Report:
    """Start, check, load and stop every server; check their logs and the limiter's
    counts; the report."""
    machine = machine_info()
    setup = limiter.Setup.new(redis_url)
    with servers_under_test(plan, work_dir, setup) as under_test:
        warmups, runs = measure_all(under_test.bench, under_test.subjects)
        limiter_checks = limiter.check_counts(
            setup,
            under_test.bench.caller,
            limiter_calls([*warmups, *runs]),
            under_test.servers["limiter_memory"].ports["grpc"],
        )
    logs = check_logs(plan, work_dir, [*warmups, *runs])
    return build_report(plan, machine, runs, logs, setup, limiter_checks)


def publish_workers(scaled: workers_report.Report | None, *, publish: bool) -> None:
    """Print the workers part's tables, and unless told not to, write its results (if
    the part ran)."""
    if scaled is None:
        return
    if not publish:
        print(f"\n{workers_report.render_table(scaled)}")
        return
    written = workers_report.publish(scaled, RESULTS_DIR, README)
    print(f"\nwrote {', '.join(str(p.relative_to(ROOT)) for p in written)}")


def publish_parts(
    result: Report | None,
    hooks: Any,
    scaled: workers_report.Report | None,
    drivers: Any,
    args: argparse.Namespace,
) -> None:
    """Print each part that ran, and unless told not to, write its results."""
    if result is not None and args.no_publish:
        print(f"\n{report.render_all_tables(result)}")
    elif result is not None:
        publish(result)
    if hooks is not None and args.no_publish:
        print(f"\n{webhooks.render_table(hooks)}")
    elif hooks is not None:
        written = webhooks.publish(hooks, RESULTS_DIR, README)
        print(f"\nwrote {', '.join(str(p.relative_to(ROOT)) for p in written)}")
    publish_workers(scaled, publish=not args.no_publish)
    if drivers is not None:
        from bench import sqlite_ab

        print(f"\n{sqlite_ab.render(drivers.runs, drivers.others, args.sqlite_rounds)}")
        if not args.no_publish:
            written = sqlite_ab.publish(drivers, RESULTS_DIR, README)
            print(f"\nwrote {', '.join(str(p.relative_to(ROOT)) for p in written)}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (targets met or not), 1 when a check failed."""
    args = parse_args(argv)
    plan = Plan.on_this_machine(
        requests=args.requests,
        warmup_requests=args.warmup_requests,
        wrk_seconds=args.wrk_seconds,
        rounds=args.rounds,
    )
    hooks_plan = webhooks.Plan.on_this_machine(
        deliveries=args.webhook_deliveries, rounds=args.webhook_rounds
    )
    # Before this process is pinned to the load CPU: two workers run on every CPU.
    workers_plan = workers.Plan.on_this_machine(
        requests=args.requests,
        warmup_requests=args.warmup_requests,
        wrk_seconds=args.wrk_seconds,
        rounds=args.workers_rounds,
    )
    if plan.load_cpu is not None:
        os.sched_setaffinity(0, {plan.load_cpu})  # h2load, wrk and the receiver inherit it
    work_dir = Path(tempfile.mkdtemp(prefix="tunnelplane-bench-"))
    result, hooks, scaled, drivers = None, None, None, None
    try:
        with contextlib.ExitStack() as stack:
            redis_url = args.redis_url
            if redis_url == "private":
                redis_url = stack.enter_context(limiter.private_redis())
            if args.only in (None, "getuser"):
                result = measure(plan, work_dir, redis_url)
            if args.only in (None, "webhooks"):
                hooks = webhooks.measure(
                    hooks_plan, work_dir, redis_url, args.postgres_url, webhook_machine()
                )
            if args.only in (None, "workers"):
                scaled = workers.measure(
                    workers_plan, work_dir, redis_url, args.postgres_url, webhook_machine()
                )
            if args.only in (None, "sqlite"):
                from bench import sqlite_ab  # it imports this module

                drivers = sqlite_ab.compare(replace(plan, rounds=args.sqlite_rounds))
    except (LoadError, RuntimeError, grpc.RpcError) as exc:
        print(f"bench failed: {exc}\n(work directory kept: {work_dir})", file=sys.stderr)
        return 1
    publish_parts(result, hooks, scaled, drivers, args)
    if args.only in (None, "search"):
        from bench import user_search

        searched = user_search.measure(args.postgres_url, work_dir)
        print(f"\n{user_search.render(searched)}")
        if not args.no_publish:
            written = user_search.publish(searched, RESULTS_DIR, README)
            print(f"\nwrote {', '.join(str(p.relative_to(ROOT)) for p in written)}")
    if args.only in (None, "proxy"):
        from bench import proxies

        proxies.main(["--no-publish"] if args.no_publish else [])
    if args.keep:
        print(f"work directory kept: {work_dir}")
    else:
        shutil.rmtree(work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
