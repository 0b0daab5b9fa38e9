"""Every core: the full server with two workers (``TP_WORKERS=2``) against one, on
PostgreSQL and Redis (``make bench``; ``python -m bench.run --only workers``).

The servers are ``python -m server serve`` itself (with ``TP_WORKERS=1``, the plain single
process; with 2, the supervisor and its two workers sharing one gRPC and one HTTP port),
on one migrated PostgreSQL database of the run's own and the bench's Redis, with the same
keys, so one bench user and one access token serve all. Two servers have two workers: one
with ``TP_WORKER_CPU_AFFINITY=auto`` (each worker pinned to a CPU of its own; the
target's), one with ``off`` (the kernel places them; for comparison). Each round loads
GetUser over gRPC with h2load and ``GET /v1/users/me`` with wrk, the servers back to back
(the order reverses every round); the ratios are the medians of the per-round two/one
ratios.

Nothing else is pinned here: the single worker, the load tool and PostgreSQL float over
the machine in every case (the bench process widens its own CPU set while this part runs;
the bench's private Redis keeps the load CPU it was started on). *Server CPU %* is the
serving processes' (for two workers, both and the supervisor), *other CPU %* everything
else the machine did meanwhile: the load tool, PostgreSQL, Redis. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from tunnelplane.v1 import users_pb2

from bench import h2load, probes, wrk
from bench import report as report_module
from bench.errors import LoadError
from bench.processes import ROOT, SERVER_SETTINGS, STARTUP_TIMEOUT, cpu_seconds, migrate, server_env
from bench.server import GET_USER, HTTP_GET_ME
from bench.webhooks import DEFAULT_POSTGRES_URL, Postgres
from bench.workers_report import AFFINITY, CASES, LABELS, TRANSPORTS, Report, Run, render_table
from server.domain.identity.tokens import generate_private_key_pem
from server.storage.sealing import new_key


@dataclass(frozen=True, slots=True)
class Plan:
    """How much load (the sizes of ``bench.run.Plan``), and the machine's CPUs."""

    requests: int = 6000
    warmup_requests: int = 1500
    wrk_seconds: int = 8
    wrk_warmup_seconds: int = 2
    clients: int = 50
    rounds: int = 3
    all_cpus: tuple[int, ...] = ()

    @classmethod
    def on_this_machine(cls, **sizes: int) -> Plan:
        """A plan over every CPU this process may use."""
        return cls(**sizes, all_cpus=tuple(sorted(os.sched_getaffinity(0))))


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a load tool reported (and was checked) for one run."""

    requests: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    command: str
    output: str


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy so far (all CPUs), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class Group:
    """``python -m server serve`` with ``workers`` workers, its log in a file; stopped
    with SIGTERM on leaving the block."""

    def __init__(self, workers: int, env: Mapping[str, str], log_path: Path) -> None:
        self.workers = workers
        self.env = dict(env) | {"TP_WORKERS": str(workers)}
        self.log_path = log_path
        self.serving: dict[str, Any] = {}
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Group:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "server", "serve"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            self.serving = self._wait_serving(self._process)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _wait_serving(self, process: subprocess.Popen[bytes]) -> dict[str, Any]:
        """The supervisor's (or the single process's) ``serving`` line; the workers' own
        carry a ``worker`` field."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            for entry in log_entries(self.log_path):
                if entry.get("message") == "serving" and "worker" not in entry:
                    return entry
            time.sleep(0.1)
        tail = self.log_path.read_text()[-2000:]
        raise RuntimeError(f"the server with {self.workers} workers did not start:\n{tail}")

    @property
    def pids(self) -> list[int]:
        """The serving processes: the supervisor and its workers, or the single process."""
        assert self._process is not None
        return [self._process.pid, *self.serving.get("worker_pids", [])]

    def url(self, transport: str, path: str) -> str:
        """The URL of ``path`` on the gRPC (``grpc``) or HTTP (``json``) port."""
        port = self.serving["grpc_port" if transport == "grpc" else "http_port"]
        return f"http://127.0.0.1:{port}{path}"


def log_entries(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON lines of a server log (anything else skipped)."""
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                yield entry


@dataclass(frozen=True, slots=True)
class Bench:
    """The two servers, the bench user, and how to load them."""

    plan: Plan
    groups: Mapping[str, Group]
    caller: probes.Caller
    body_file: Path
    response_frame_size: int
    work_dir: Path

    def run(self, case: str, transport: str, round_number: int) -> Run:
        """One checked load run; round 0 is the (shorter) warm-up."""
        group = self.groups[case]
        server_cpu = sum(cpu_seconds(pid) for pid in group.pids)
        busy, wall = _machine_busy(), time.monotonic()
        if transport == "grpc":
            load = self._h2load(group, case, round_number)
        else:
            load = self._wrk(group, round_number)
        wall = time.monotonic() - wall
        server_cpu = sum(cpu_seconds(pid) for pid in group.pids) - server_cpu
        other = max(_machine_busy() - busy - server_cpu, 0.0)
        return Run(
            case=case,
            transport=transport,
            round=round_number,
            requests=load.requests,
            seconds=load.seconds,
            requests_per_second=load.requests_per_second,
            p50_ms=load.p50_ms,
            p99_ms=load.p99_ms,
            server_cpu_percent=round(100 * server_cpu / wall, 1),
            cpu_us_per_request=round(1e6 * server_cpu / load.requests, 1),
            other_cpu_percent=round(100 * other / wall, 1),
            command=load.command,
            output=load.output,
        )

    def _h2load(self, group: Group, case: str, round_number: int) -> Loaded:
        plan = self.plan
        load = h2load.Load(
            url=group.url("grpc", GET_USER),
            token=self.caller.access_token,
            body_file=self.body_file,
            requests=plan.requests if round_number else plan.warmup_requests,
            clients=plan.clients,
            log_file=self.work_dir / f"workers-{case}-{round_number}.h2load.log",
        )
        output = h2load.run(load)
        summary = h2load.parse_summary(output)
        h2load.check(summary, load.requests, self.response_frame_size)
        latencies = h2load.latencies_ms(load.log_file)
        return Loaded(
            summary.total,
            summary.seconds,
            summary.requests_per_second,
            h2load.percentile(latencies, 0.50),
            h2load.percentile(latencies, 0.99),
            shlex.join(load.command(redact=True)),
            h2load.trimmed(output),
        )

    def _wrk(self, group: Group, round_number: int) -> Loaded:
        plan = self.plan
        seconds = plan.wrk_seconds if round_number else plan.wrk_warmup_seconds
        load = wrk.Load(
            group.url("json", HTTP_GET_ME), self.caller.access_token, seconds, plan.clients
        )
        output = wrk.run(load)
        summary = wrk.parse_summary(output)
        wrk.check(summary)
        return Loaded(
            summary.requests,
            summary.seconds,
            summary.requests_per_second,
            summary.p50_ms,
            summary.p99_ms,
            shlex.join(load.command(redact=True)),
            output.strip(),
        )


def _say(run: Run) -> None:
    what = "warm-up" if run.round == 0 else f"round {run.round}"
    print(
        f"{what} workers {run.case} {run.transport}: {run.requests_per_second:.0f} req/s, "
        f"server CPU {run.server_cpu_percent:.0f} %, other {run.other_cpu_percent:.0f} %",
        flush=True,
    )


def order(round_number: int) -> list[tuple[str, str]]:
    """A round's runs: per transport, the two servers back to back; reversed every round."""
    runs = [(case, transport) for transport in TRANSPORTS for case in CASES]
    return runs if round_number % 2 else runs[::-1]


# -- the whole measurement -------------------------------------------------------------------


@contextlib.contextmanager
def every_cpu(cpus: Sequence[int]) -> Iterator[None]:
    """Let this process, and what it starts meanwhile, run on every CPU in ``cpus``."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def shared_env(work_dir: Path, database_url: str, redis_url: str, prefix: str) -> dict[str, str]:
    """The settings of both servers, on top of the bench's: one database, one Redis prefix
    and one set of keys, as replicas of one deployment have."""
    key_file = work_dir / "workers-jwt.pem"
    key_file.write_bytes(generate_private_key_pem())
    return server_env(
        work_dir / "workers-data",
        {
            "TP_DATABASE_URL": database_url,
            "TP_REDIS_URL": redis_url,
            "TP_REDIS_PREFIX": prefix,
            "TP_JWT_PRIVATE_KEY_FILE": str(key_file),
            "TP_PAGE_TOKEN_SECRET": secrets.token_hex(24),
            "TP_SECRETS_KEY": new_key(),
        },
    )


def check_answers(groups: Mapping[str, Group], caller: probes.Caller) -> users_pb2.User:
    """One real call to each server over each transport: all return the bench user."""
    expected = probes.get_me(groups["one"].serving["grpc_port"], caller)
    for case in CASES.keys() - {"one"}:
        if probes.get_me(groups[case].serving["grpc_port"], caller) != expected:
            raise LoadError(f"the {LABELS[case]} worker(s) server answers GetUser differently")
    documents = {
        f"{case} worker(s)": probes.http_get_me(case, group.serving["http_port"], caller)
        for case, group in groups.items()
    }
    probes.check_same_user(documents, expected)
    return expected


def check_logs(groups: Mapping[str, Group], runs: Sequence[Run], clients: int) -> dict[str, int]:
    """Every GetUser call each server logged succeeded (but the forged-token probe), as
    many as were sent; the calls of each worker of the two-worker server."""
    per_worker: Counter[str] = Counter()
    for case, group in groups.items():
        codes: dict[str, Counter[str]] = {"grpc": Counter(), "http": Counter()}
        for entry in log_entries(group.log_path):
            if entry.get("logger") == "tunnelplane.access" and entry.get("method") == GET_USER:
                codes[entry["transport"]][entry["code"]] += 1
                if case == "two":
                    per_worker[str(entry.get("worker"))] += 1
        mine = [r for r in runs if r.case == case]
        sent_grpc = sum(r.requests for r in mine if r.transport == "grpc")
        wrk_runs = [r for r in mine if r.transport == "json"]
        probe = probes.Expected(exact=1)
        grpc_calls = probes.Expected(exact=sent_grpc) + probe
        http_calls = probes.Expected(
            at_least=sum(r.requests for r in wrk_runs), in_flight=clients * len(wrk_runs)
        )
        where = f"{LABELS[case]} worker(s)"
        probes.check_codes(f"{where}, gRPC", codes["grpc"], "OK", grpc_calls, {})
        probes.check_codes(
            f"{where}, HTTP", codes["http"], "OK", http_calls + probe, {"UNAUTHENTICATED": 1}
        )
    if len(per_worker) != CASES["two"]:
        raise LoadError(f"calls reached workers {sorted(per_worker)} only, not both")
    return dict(sorted(per_worker.items()))


def _rounds(bench: Bench, rounds: int) -> tuple[list[Run], list[Run]]:
    warmups = [bench.run(case, transport, 0) for case, transport in order(1)]
    for run in warmups:
        _say(run)
    runs = []
    for round_number in range(1, rounds + 1):
        for case, transport in order(round_number):
            runs.append(bench.run(case, transport, round_number))
            _say(runs[-1])
    return warmups, runs


def measure(
    plan: Plan, work_dir: Path, redis_url: str, postgres_url: str, machine: Mapping[str, Any]
) -> Report:
    """Start both servers on a fresh database, load them round after round, stop them and
    check their logs; the report."""
    postgres = Postgres(postgres_url)
    info = {**machine, "postgres": postgres.version()}
    run_id = secrets.token_hex(4)
    name = f"tp_bench_workers_{run_id}"
    url = postgres.create(name)
    prefix = f"tpbench-{run_id}:workers:"
    try:
        env = shared_env(work_dir, url, redis_url, prefix)
        migrate(env, work_dir / "workers-migrate.log")
        with every_cpu(plan.all_cpus), contextlib.ExitStack() as stack:
            groups = {
                case: stack.enter_context(
                    Group(
                        n,
                        env | {"TP_WORKER_CPU_AFFINITY": AFFINITY[case]},
                        work_dir / f"workers-{case}.log",
                    )
                )
                for case, n in CASES.items()
            }
            caller = probes.sign_up(groups["one"].serving["grpc_port"])
            expected = check_answers(groups, caller)
            body_file = work_dir / "workers-request.bin"
            body_file.write_bytes(h2load.grpc_frame(users_pb2.GetUserRequest(name="users/me")))
            frame = len(h2load.grpc_frame(expected))
            bench = Bench(plan, groups, caller, body_file, frame, work_dir)
            warmups, runs = _rounds(bench, plan.rounds)
        per_worker = check_logs(groups, [*warmups, *runs], plan.clients)
    finally:
        postgres.drop(name)
        _delete_keys(redis_url, prefix)
    return Report(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=info,
        server_settings=dict(SERVER_SETTINGS),
        plan=dataclasses.asdict(plan),
        runs=runs,
        warmups=warmups,
        calls_per_worker=per_worker,
    )


def _delete_keys(redis_url: str, prefix: str) -> None:
    """Delete what the servers left in Redis under ``prefix``."""
    with (
        contextlib.suppress(redis.RedisError, OSError),
        redis.Redis.from_url(redis_url, socket_timeout=5) as client,
    ):
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])


def main(argv: list[str] | None = None) -> int:
    """This part alone, printed only (``python -m bench.run --only workers`` publishes)."""
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    default = Plan()
    parser.add_argument("--requests", type=int, default=default.requests)
    parser.add_argument("--wrk-seconds", type=int, default=default.wrk_seconds)
    parser.add_argument("--rounds", type=int, default=default.rounds)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/3")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    plan = Plan.on_this_machine(
        requests=args.requests, wrk_seconds=args.wrk_seconds, rounds=args.rounds
    )
    return report_module.measure_alone(
        "workers",
        lambda work_dir: measure(plan, work_dir, args.redis_url, args.postgres_url, {}),
        render_table,
        keep=args.keep,
    )


if __name__ == "__main__":
    sys.exit(main())
