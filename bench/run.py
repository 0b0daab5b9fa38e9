"""``make bench``: GetUser over gRPC, the full pipeline against a bare grpc.aio server.

Both servers run in child processes of their own (``python -m bench.server``) on one
migrated SQLite database in a temporary directory; h2load loads them over loopback in
alternating order, and the medians of the measured rounds are compared. See
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
from tunnelplane.v1 import auth_pb2, auth_pb2_grpc, users_pb2, users_pb2_grpc

from bench import h2load, report
from bench.h2load import Load, LoadError
from bench.report import Measurement, Report, Targets
from bench.server import GET_USER

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"

TARGETS = Targets(min_ratio=0.85, max_p99_ms=25.0)
STARTUP_TIMEOUT = 60.0
CALL_TIMEOUT = 30.0
EMAIL = "bench@example.com"

#: Embedded defaults; logs at INFO (the access log is part of the pipeline), to a file.
#: Argon2 is cheap only to make the setup quick: GetUser never hashes.
SERVER_SETTINGS: Mapping[str, str] = {
    "TP_GRPC_HOST": "127.0.0.1",
    "TP_GRPC_PORT": "0",
    "TP_METRICS_PORT": "-1",
    "TP_LOG_LEVEL": "INFO",
    "TP_LOG_FORMAT": "json",
    "TP_OTEL_EXPORTER": "none",
    "TP_ARGON2_TIME_COST": "1",
    "TP_ARGON2_MEMORY_KIB": "1024",
    "TP_ARGON2_PARALLELISM": "1",
    "TP_ACCESS_TOKEN_TTL": "3600",
}


@dataclass(frozen=True, slots=True)
class Plan:
    """How much load. The default run takes 5-10 s per measured run on 2 CPUs."""

    requests: int = 6000
    warmup_requests: int = 1500
    clients: int = 50
    rounds: int = 3
    #: CPUs for the servers and for h2load (and this process); None: not pinned.
    server_cpu: int | None = None
    load_cpu: int | None = None

    @classmethod
    def on_this_machine(cls, **sizes: int) -> Plan:
        """A plan that gives the servers one CPU and h2load another, when there are two."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(**sizes)
        return cls(**sizes, server_cpu=cpus[0], load_cpu=cpus[1])

    def server_args(self) -> list[str]:
        """The ``bench.server`` arguments that pin a server."""
        return [] if self.server_cpu is None else ["--cpu", str(self.server_cpu)]

    @property
    def calls_per_server(self) -> int:
        """GetUser calls each server gets: the stub check, the warm-up and the rounds."""
        return 1 + self.warmup_requests + self.rounds * self.requests

    def as_dict(self) -> dict[str, int | None]:
        """The plan, with h2load's fixed settings, for the report."""
        return {
            "requests": self.requests,
            "warmup_requests": self.warmup_requests,
            "clients": self.clients,
            "max_concurrent_streams": 1,
            "threads": 1,
            "rounds": self.rounds,
            "server_cpu": self.server_cpu,
            "h2load_cpu": self.load_cpu,
        }


class ServerProcess:
    """A server under test in a child process, stopped (SIGTERM) on leaving the block."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args = [sys.executable, "-m", "bench.server", *args]
        self.env = env
        self.log_path = log_path
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Self:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.args,
                cwd=ROOT,
                env=dict(self.env),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.port = self._wait_ready(self._process)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def _wait_ready(self, process: subprocess.Popen[str]) -> int:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT)
        line = process.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            process.kill()
            process.wait()
            tail = self.log_path.read_text()[-2000:]
            raise RuntimeError(f"{' '.join(self.args)} did not start:\n{tail}")
        return int(line.split()[1])

    @property
    def url(self) -> str:
        """The URL h2load posts GetUser to."""
        return f"http://127.0.0.1:{self.port}{GET_USER}"


def server_env(data_dir: Path) -> dict[str, str]:
    """This environment without any ``TP_*`` variable, plus the bench settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    return env | dict(SERVER_SETTINGS) | {"TP_DATA_DIR": str(data_dir)}


def migrate(env: Mapping[str, str], log_path: Path) -> None:
    """Create the SQLite database with ``python -m server migrate``."""
    with log_path.open("ab") as log:
        subprocess.run(
            [sys.executable, "-m", "server", "migrate"],
            cwd=ROOT,
            env=dict(env),
            stdout=log,
            stderr=log,
            check=True,
        )


@dataclass(frozen=True, slots=True)
class Caller:
    """The bench user and its access token."""

    user_id: str
    access_token: str

    @property
    def metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The call metadata that authenticates as this user."""
        return (("authorization", f"Bearer {self.access_token}"),)


def sign_up(port: int) -> Caller:
    """Register the bench user and log in, over gRPC, through the full pipeline."""
    password = secrets.token_urlsafe(18)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        registered = auth.Register(
            auth_pb2.RegisterRequest(email=EMAIL, password=password), timeout=CALL_TIMEOUT
        )
        login = auth.Login(
            auth_pb2.LoginRequest(email=EMAIL, password=password), timeout=CALL_TIMEOUT
        )
    user_id = registered.user.name.removeprefix("users/")
    return Caller(user_id, login.tokens.access_token)


def get_me(port: int, caller: Caller) -> users_pb2.User:
    """One real GetUser call; fails unless it returns the caller."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        user = users_pb2_grpc.UserServiceStub(channel).GetUser(
            users_pb2.GetUserRequest(name="users/me"),
            metadata=caller.metadata,
            timeout=CALL_TIMEOUT,
        )
    if user.name != f"users/{caller.user_id}":
        raise LoadError(f"GetUser on port {port} returned {user.name}, not the caller")
    return user


def access_log_codes(log_path: Path) -> Counter[str]:
    """Status codes of the GetUser lines in a full server's access log."""
    codes: Counter[str] = Counter()
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if entry.get("logger") == "tunnelplane.access" and entry.get("method") == GET_USER:
                codes[entry["code"]] += 1
    return codes


@dataclass(frozen=True, slots=True)
class Bench:
    """What every run shares: the plan, the caller, the request body, the answer size."""

    plan: Plan
    caller: Caller
    body_file: Path
    response_frame_size: int
    work_dir: Path

    def load(self, server: ServerProcess, requests: int, name: str) -> Load:
        """The h2load run of ``requests`` GetUser calls against ``server``."""
        return Load(
            url=server.url,
            token=self.caller.access_token,
            body_file=self.body_file,
            requests=requests,
            clients=self.plan.clients,
            log_file=self.work_dir / f"{name}.h2load.log",
        )

    def warm_up(self, server: ServerProcess, name: str) -> None:
        """A short, unrecorded run (connection pools, caches, code paths)."""
        load = self.load(server, self.plan.warmup_requests, f"{name}-warmup")
        h2load.check(
            h2load.parse_summary(h2load.run(load)), load.requests, self.response_frame_size
        )

    def measure(self, server: ServerProcess, name: str, round_number: int) -> Measurement:
        """One measured, checked run."""
        load = self.load(server, self.plan.requests, f"{name}-{round_number}")
        output = h2load.run(load)
        summary = h2load.parse_summary(output)
        h2load.check(summary, load.requests, self.response_frame_size)
        latencies = h2load.latencies_ms(load.log_file)
        return Measurement(
            server=name,
            round=round_number,
            requests=summary.total,
            seconds=summary.seconds,
            requests_per_second=summary.requests_per_second,
            mean_ms=round(sum(latencies) / len(latencies), 3),
            p50_ms=h2load.percentile(latencies, 0.50),
            p95_ms=h2load.percentile(latencies, 0.95),
            p99_ms=h2load.percentile(latencies, 0.99),
            max_ms=latencies[-1],
            command=shlex.join(load.command(redact=True)),
            h2load_output=h2load.trimmed(output),
        )


def round_order(round_number: int) -> tuple[str, str]:
    """Alternate which server goes first, so drift does not favour one of them."""
    return ("full", "bare") if round_number % 2 else ("bare", "full")


def measure_all(bench: Bench, servers: Mapping[str, ServerProcess]) -> list[Measurement]:
    """Warm both servers up, then the measured rounds."""
    for name, server in servers.items():
        print(f"warm-up {name}: {bench.plan.warmup_requests} requests")
        bench.warm_up(server, name)
    runs = []
    for round_number in range(1, bench.plan.rounds + 1):
        for name in round_order(round_number):
            run = bench.measure(servers[name], name, round_number)
            print(
                f"round {round_number} {name}: {run.requests_per_second:.0f} req/s, "
                f"p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms ({run.seconds:.1f} s)"
            )
            runs.append(run)
    return runs


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
        "load_average_before": os.getloadavg(),
    }


@contextlib.contextmanager
def servers_under_test(
    plan: Plan, work_dir: Path
) -> Iterator[tuple[Bench, dict[str, ServerProcess]]]:
    """A migrated database, the full server, the bench user, then the bare server."""
    env = server_env(work_dir / "data")
    migrate(env, work_dir / "migrate.log")
    with contextlib.ExitStack() as stack:
        pinned = plan.server_args()
        full = stack.enter_context(
            ServerProcess(["--mode", "full", *pinned], env, work_dir / "full.log")
        )
        caller = sign_up(full.port)
        bare_args = ["--mode", "bare", "--user-id", caller.user_id, *pinned]
        bare = stack.enter_context(ServerProcess(bare_args, env, work_dir / "bare.log"))
        expected = get_me(full.port, caller)
        if get_me(bare.port, caller) != expected:
            raise LoadError("the bare server answers GetUser differently from the full one")
        body_file = work_dir / "get-user-request.bin"
        body_file.write_bytes(h2load.grpc_frame(users_pb2.GetUserRequest(name="users/me")))
        bench = Bench(plan, caller, body_file, len(h2load.grpc_frame(expected)), work_dir)
        yield bench, {"full": full, "bare": bare}


def check_access_log(plan: Plan, work_dir: Path) -> Counter[str]:
    """Every GetUser the full server served (checks, warm-up, rounds) was logged as OK."""
    codes = access_log_codes(work_dir / "full.log")
    expected = plan.calls_per_server
    if codes != Counter({"OK": expected}):
        raise LoadError(f"full server access log: {dict(codes)}, expected {expected} OK")
    return codes


def build_report(
    plan: Plan, machine: dict[str, object], runs: list[Measurement], codes: Counter[str]
) -> Report:
    """The report of this run."""
    return Report(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine,
        server_settings=dict(SERVER_SETTINGS),
        load=plan.as_dict(),
        targets=TARGETS,
        runs=runs,
        access_log_codes=dict(codes),
    )


def publish(result: Report) -> None:
    """Print the table, write ``bench/results/`` and the README results section."""
    stem = f"getuser-{result.date[:10]}"
    json_path, text_path = report.write_results(result, RESULTS_DIR, stem)
    report.update_readme(README, report.render_readme_block(result, json_path.name))
    print()
    print(report.render_table(result))
    print(
        f"\nwrote {json_path.relative_to(ROOT)}, {text_path.relative_to(ROOT)}, "
        f"{README.relative_to(ROOT)}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; the defaults are what ``make bench`` measures."""
    default = Plan()
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--requests", type=int, default=default.requests)
    parser.add_argument("--warmup-requests", type=int, default=default.warmup_requests)
    parser.add_argument("--rounds", type=int, default=default.rounds)
    parser.add_argument(
        "--no-publish", action="store_true", help="print only; leave results/ and README alone"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (targets met or not), 1 when a check failed."""
    args = parse_args(argv)
    plan = Plan.on_this_machine(
        requests=args.requests, warmup_requests=args.warmup_requests, rounds=args.rounds
    )
    if plan.load_cpu is not None:
        os.sched_setaffinity(0, {plan.load_cpu})  # h2load inherits it
    work_dir = Path(tempfile.mkdtemp(prefix="tunnelplane-bench-"))
    try:
        machine = machine_info()
        with servers_under_test(plan, work_dir) as (bench, servers):
            runs = measure_all(bench, servers)
        result = build_report(plan, machine, runs, check_access_log(plan, work_dir))
    except (LoadError, RuntimeError, grpc.RpcError) as exc:
        print(f"bench failed: {exc}\n(work directory kept: {work_dir})", file=sys.stderr)
        return 1
    if args.no_publish:
        print("\n" + report.render_table(result))
    else:
        publish(result)
    if args.keep:
        print(f"work directory kept: {work_dir}")
    else:
        shutil.rmtree(work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
