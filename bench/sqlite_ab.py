"""The SQLite driver, inline against aiosqlite, in one run:
``python -m bench.sqlite_ab [--rounds N]``.

Two sets of the GetUser servers of ``make bench`` on one migrated SQLite database: ``full``
and ``bare`` (``bench.server --mode full|bare``) with the server's own driver
(``--sqlite-driver inline``: ``server/storage/sqlite_inline.py``, SQLite on the event loop's
thread) and with SQLAlchemy's ``sqlite+aiosqlite`` dialect over aiosqlite
(``--sqlite-driver aiosqlite``: a thread per connection), and the FastAPI baseline once
(it always uses aiosqlite). Each round loads every case with ``make bench``'s h2load and
wrk commands, the order reversed every other round, and the report gives, per driver, the
bench's ratios (full/bare, embedded/FastAPI, embedded/gRPC) and p99s against their targets,
and the server CPU per request. ``make bench`` runs it after the GetUser servers and
writes its section of ``bench/README.md`` ("Hand-written pieces and why"); run alone, it
prints the tables (``--publish`` writes them too).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import grpc
from tunnelplane.v1 import users_pb2

from bench import h2load, probes, report, run
from bench.errors import LoadError
from bench.processes import ServerProcess, migrate, server_env
from bench.report import Measurement, Targets, medians
from bench.run import Bench, Plan, Subject
from bench.server import GET_USER, HTTP_GET_ME

DRIVERS = ("inline", "aiosqlite")
#: Rounds in ``make bench`` (each takes about 50 s on 2 CPUs).
ROUNDS = 3
TARGETS = Targets()
#: One round, per driver: bare-full back to back, full-embedded, embedded-fastapi.
CASES = ("bare", "full", "embedded")


def order() -> tuple[str, ...]:
    """The first round's order; fastapi sits between the two drivers' embedded runs."""
    inline = [f"{case}_inline" for case in CASES]
    aio = [f"{case}_aiosqlite" for case in reversed(CASES)]
    return (*inline, "fastapi", *aio)


def start(
    plan: Plan, work_dir: Path, stack: contextlib.ExitStack
) -> tuple[probes.Caller, dict[str, Subject]]:
    """Migrate, start both drivers' servers and FastAPI; sign the bench user up."""
    env = server_env(work_dir / "data")
    migrate(env, work_dir / "migrate.log")

    def server(name: str, *args: str) -> ServerProcess:
        process = ServerProcess([*args, *plan.server_args()], env, work_dir / f"{name}.log")
        return stack.enter_context(process)

    full = {d: server(f"full_{d}", "--mode", "full", "--sqlite-driver", d) for d in DRIVERS}
    caller = probes.sign_up(full["inline"].ports["grpc"])
    subjects: dict[str, Subject] = {}
    for driver in DRIVERS:
        bare = server(
            f"bare_{driver}",
            *("--mode", "bare", "--user-id", caller.user_id, "--sqlite-driver", driver),
        )
        f = full[driver]
        subjects[f"full_{driver}"] = Subject(
            f"full_{driver}", "h2load", f.url("grpc", GET_USER), (f.pid,)
        )
        subjects[f"bare_{driver}"] = Subject(
            f"bare_{driver}", "h2load", bare.url("grpc", GET_USER), (bare.pid,)
        )
        subjects[f"embedded_{driver}"] = Subject(
            f"embedded_{driver}", "wrk", f.url("http", HTTP_GET_ME), (f.pid,)
        )
    jwks = full["inline"].url("http", "/.well-known/jwks.json")
    fastapi = server("fastapi", "--mode", "fastapi", "--jwks-url", jwks)
    subjects["fastapi"] = Subject(
        "fastapi", "wrk", fastapi.url("http", HTTP_GET_ME), (fastapi.pid,)
    )
    return caller, subjects


def check_answers(subjects: Mapping[str, Subject], caller: probes.Caller) -> users_pb2.User:
    """One real call to every server before any load: all return the same user."""
    expected: users_pb2.User | None = None
    documents = {}
    for name, subject in subjects.items():
        port = int(subject.url.split(":")[2].split("/")[0])
        if subject.tool == "h2load":
            user = probes.get_me(port, caller)
            if expected is not None and user != expected:
                raise LoadError(f"{name} answers GetUser differently")
            expected = user
        else:
            documents[name] = probes.http_get_me(name, port, caller)
    assert expected is not None
    probes.check_same_user(documents, expected)
    return expected


@contextlib.contextmanager
def under_test(plan: Plan, work_dir: Path) -> Iterator[tuple[Bench, dict[str, Subject]]]:
    """Every server started and checked, and the bench that loads them."""
    with contextlib.ExitStack() as stack:
        caller, subjects = start(plan, work_dir, stack)
        expected = check_answers(subjects, caller)
        body_file = work_dir / "get-user-request.bin"
        body_file.write_bytes(h2load.grpc_frame(users_pb2.GetUserRequest(name="users/me")))
        frame = len(h2load.grpc_frame(expected))
        yield Bench(plan, caller, body_file, frame, work_dir), subjects


def _busy_seconds() -> float:
    """CPU time the whole machine has spent busy so far (every CPU, ``/proc/stat``)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU time of this process and of its finished children (the load tools)."""
    own, tools = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + tools.ru_utime + tools.ru_stime


def loaded(bench: Bench, subject: Subject, round_number: int) -> tuple[Measurement, float]:
    """One run, and the CPU everything else on the machine used meanwhile (% of one CPU:
    not the server, not the load tool, not this process)."""
    busy, own, wall = _busy_seconds(), _own_seconds(), time.monotonic()
    measured = bench.run(subject, round_number)
    server = measured.cpu_us_per_request * measured.requests / 1e6
    other = _busy_seconds() - busy - (_own_seconds() - own) - server
    return measured, round(100 * max(other, 0.0) / (time.monotonic() - wall), 1)


def measure(plan: Plan, work_dir: Path) -> tuple[list[Measurement], dict[str, float]]:
    """A warm-up of every case, then the measured rounds: the runs, and the other CPU %
    of each (by ``server/round``)."""
    first = order()
    runs, others = [], {}
    with under_test(plan, work_dir) as (bench, subjects):
        for name in first:
            bench.run(subjects[name], 0)
        for round_number in range(1, plan.rounds + 1):
            for name in first if round_number % 2 else first[::-1]:
                last, other = loaded(bench, subjects[name], round_number)
                runs.append(last)
                others[f"{name}/{round_number}"] = other
                print(
                    f"round {round_number} {name}: {last.requests_per_second:.0f} req/s, "
                    f"{last.cpu_us_per_request:.0f} µs/req, p99 {last.p99_ms:.1f} ms, "
                    f"other CPU {other:.0f} %",
                    flush=True,
                )
    return runs, others


@dataclass(frozen=True, slots=True)
class Pair:
    """A throughput ratio of two cases, its target, and the per-round ratios."""

    label: str
    top: str
    bottom: str
    wanted: float


PAIRS = (
    Pair("full/bare", "full", "bare", TARGETS.full_over_bare),
    Pair("embedded/FastAPI", "embedded", "fastapi", TARGETS.embedded_over_fastapi),
    Pair("embedded/gRPC", "embedded", "full", TARGETS.embedded_over_grpc),
)


def _rate(runs: Sequence[Measurement], server: str, round_number: int) -> float:
    return next(
        r.requests_per_second for r in runs if r.server == server and r.round == round_number
    )


def _named(case: str, driver: str) -> str:
    return case if case == "fastapi" else f"{case}_{driver}"


def render(runs: Sequence[Measurement], others: Mapping[str, float], rounds: int) -> str:
    """The servers' medians, then each driver's ratios and p99s against the targets."""
    header = "| server | req/s (median) | p99 ms | server CPU % | CPU µs/req | other CPU % |"
    lines = [f"{header} req/s per round |", "|---|---:|---:|---:|---:|---:|---|"]
    for name in (*(f"{c}_{d}" for d in DRIVERS for c in CASES), "fastapi"):
        mine = [r for r in runs if r.server == name]
        m = medians(mine)
        other = statistics.median(others[f"{name}/{r.round}"] for r in mine)
        per_round = " / ".join(f"{r.requests_per_second:.0f}" for r in mine)
        lines.append(
            f"| {name} | {m.requests_per_second:.0f} | {m.p99_ms:.1f} | "
            f"{m.server_cpu_percent:.0f} | {m.cpu_us_per_request:.0f} | {other:.0f} "
            f"| {per_round} |"
        )
    lines += ["", "| target | wanted | inline | aiosqlite |", "|---|---:|---:|---:|"]
    for pair in PAIRS:
        cells = []
        for driver in DRIVERS:
            top, bottom = _named(pair.top, driver), _named(pair.bottom, driver)
            ratios = [_rate(runs, top, n) / _rate(runs, bottom, n) for n in range(1, rounds + 1)]
            median = statistics.median(ratios)
            met = "met" if median >= pair.wanted else "**missed**"
            each = ", ".join(f"{r:.3f}" for r in ratios)
            cells.append(f"{median:.3f} ({each}) {met}")
        lines.append(f"| {pair.label} | >= {pair.wanted:.2f} | {' | '.join(cells)} |")
    for case in ("full", "embedded"):
        cells = []
        for driver in DRIVERS:
            p99 = medians([r for r in runs if r.server == f"{case}_{driver}"]).p99_ms
            cells.append(f"{p99:.1f} ms {'met' if p99 < TARGETS.max_p99_ms else '**missed**'}")
        lines.append(
            f"| {case} p99 at c=50 | < {TARGETS.max_p99_ms:.0f} ms | {' | '.join(cells)} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Result:
    """What one comparison found, and where."""

    date: str
    machine: Mapping[str, object]
    load: Mapping[str, int | None]
    runs: list[Measurement]
    #: CPU % of everything else on the machine during each run, by ``server/round``.
    others: dict[str, float]

    def to_json(self) -> dict[str, object]:
        """The raw numbers (the load tools' output left out)."""
        runs = [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "output"} for r in self.runs
        ]
        return {
            "date": self.date,
            "machine": self.machine,
            "load": self.load,
            "runs": runs,
            "other_cpu_percent": self.others,
        }


def compare(plan: Plan) -> Result:
    """Run the comparison in a work directory of its own (kept if a check fails)."""
    machine = run.machine_info()
    work_dir = Path(tempfile.mkdtemp(prefix="tunnelplane-sqlite-"))
    try:
        runs, others = measure(plan, work_dir)
    except (LoadError, RuntimeError, grpc.RpcError) as exc:
        raise LoadError(f"{exc} (work directory kept: {work_dir})") from exc
    shutil.rmtree(work_dir)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    return Result(date, machine, plan.as_dict(), runs, others)


def render_block(result: Result, json_name: str) -> str:
    """The generated section of ``bench/README.md``."""
    machine, load = result.machine, result.load
    source = cast(dict[str, Any], machine.get("source", {}))
    dirty = source.get("uncommitted") or []
    code = f"commit {str(source.get('commit', 'unknown'))[:12]}" + (
        f", with uncommitted changes to {', '.join(dirty)}" if dirty else " (clean)"
    )
    averages = cast(Sequence[float], machine["load_average_before"])
    where = (
        f"Latest run: {result.date}, {machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"Python {machine['python']}, load average before "
        f"{' / '.join(f'{x:.2f}' for x in averages)}. {load['rounds']} rounds, medians; "
        f"servers on CPU {load['server_cpu']}, the load tools on CPU {load['load_cpu']}; "
        f"{load['requests']} requests per h2load run, {load['wrk_seconds']} s per wrk run, "
        f"{load['clients']} clients. Server code: {code}. Raw numbers: `results/{json_name}`."
    )
    return f"{where}\n\n{render(result.runs, result.others, int(load['rounds'] or 0))}"


def publish(result: Result, results_dir: Path, readme: Path) -> list[Path]:
    """Write ``results/sqlite-<date>.json`` and the README section; the files written."""
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"sqlite-{result.date[:10]}.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    report.update_readme(readme, {"sqlite-results": render_block(result, json_path.name)})
    return [json_path, readme]


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; 0 when it ran, 1 when a check failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.sqlite_ab", description=__doc__)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--requests", type=int, default=Plan().requests)
    parser.add_argument("--wrk-seconds", type=int, default=Plan().wrk_seconds)
    parser.add_argument(
        "--publish", action="store_true", help="write results/ and the README section"
    )
    args = parser.parse_args(argv)
    plan = Plan.on_this_machine(
        rounds=args.rounds, requests=args.requests, wrk_seconds=args.wrk_seconds
    )
    if plan.load_cpu is not None:
        os.sched_setaffinity(0, {plan.load_cpu})  # h2load and wrk inherit it
    try:
        result = compare(plan)
    except LoadError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    print(f"\n{render(result.runs, result.others, plan.rounds)}")
    if args.publish:
        written = publish(result, run.RESULTS_DIR, run.README)
        print(f"\nwrote {', '.join(str(p.relative_to(run.ROOT)) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
