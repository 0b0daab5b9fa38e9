"""The results of the workers part of ``make bench`` (``bench/workers.py``): the runs,
the two/one ratios against the target, and where they go (the printed table,
``bench/results/workers-<date>.{json,txt}`` and the README's workers section)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import Ratio, TargetResult, update_readme, write_json_and_text

#: The servers of a round, by their number of workers: one; two pinned, one worker per
#: CPU (``TP_WORKER_CPU_AFFINITY=auto``, the target's); two placed by the kernel (``off``,
#: for comparison, no target).
CASES = {"one": 1, "two": 2, "two_floating": 2}
#: Each case's ``TP_WORKER_CPU_AFFINITY``.
AFFINITY = {"one": "off", "two": "auto", "two_floating": "off"}
LABELS = {"one": "1", "two": "2, pinned", "two_floating": "2, unpinned"}
#: GetUser over gRPC (h2load), ``GET /v1/users/me`` over HTTP/JSON (wrk).
TRANSPORTS = ("grpc", "json")
#: Two workers' throughput over one's, on both transports (from the issue).
TARGET = 1.3


@dataclass(frozen=True, slots=True)
class Run:
    """One load run against one server over one transport."""

    case: str
    transport: str
    round: int
    requests: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    #: The serving processes' CPU time as a share of one CPU, and per request.
    server_cpu_percent: float
    cpu_us_per_request: float
    #: Everything else the machine did meanwhile (load tool, PostgreSQL, Redis, ...).
    other_cpu_percent: float
    command: str
    output: str = dataclasses.field(repr=False)


@dataclass(frozen=True, slots=True)
class Report:
    """What the workers part of one ``make bench`` found, and how."""

    date: str
    machine: Mapping[str, Any]
    server_settings: Mapping[str, str]
    plan: Mapping[str, Any]
    runs: Sequence[Run]
    warmups: Sequence[Run]
    #: Calls each worker of the two-worker server logged (all rounds and probes).
    calls_per_worker: Mapping[str, int]

    def runs_of(self, case: str, transport: str) -> list[Run]:
        """The measured runs of one server over one transport, in round order."""
        return [r for r in self.runs if (r.case, r.transport) == (case, transport)]

    def median(self, case: str, transport: str, name: str) -> float:
        """The median of one number over the rounds."""
        return float(statistics.median(getattr(r, name) for r in self.runs_of(case, transport)))

    def ratio(self, transport: str, case: str = "two") -> Ratio:
        """Two workers' (``case``) throughput over one's, paired by round."""
        pairs = zip(self.runs_of(case, transport), self.runs_of("one", transport), strict=True)
        per_round = [a.requests_per_second / b.requests_per_second for a, b in pairs]
        return Ratio(statistics.median(per_round), per_round)

    def targets(self) -> list[TargetResult]:
        """Two workers against one, over gRPC and over JSON."""
        results = []
        for transport, label in (("grpc", "gRPC GetUser"), ("json", "JSON GET /v1/users/me")):
            ratio = self.ratio(transport)
            per_round = ", ".join(f"{r:.3f}" for r in ratio.per_round)
            results.append(
                TargetResult(
                    f"{label}, 2 workers / 1",
                    f">= {TARGET:.2f}",
                    f"{ratio.median:.3f} (per round: {per_round})",
                    ratio.median >= TARGET,
                )
            )
        return results

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data, raw runs included (without the tools' output)."""

        def bare(run: Run) -> dict[str, Any]:
            return {k: v for k, v in dataclasses.asdict(run).items() if k != "output"}

        return {
            "benchmark": "the full server with 2 workers (TP_WORKERS=2) vs 1, PostgreSQL and "
            "Redis: gRPC GetUser (h2load) and GET /v1/users/me (wrk); two workers pinned "
            "(TP_WORKER_CPU_AFFINITY=auto, the target's) and unpinned",
            "date": self.date,
            "machine": dict(self.machine),
            "server_settings": dict(self.server_settings),
            "plan": dict(self.plan),
            "ratios": {t: dataclasses.asdict(self.ratio(t)) for t in TRANSPORTS},
            "ratios_unpinned": {
                t: dataclasses.asdict(self.ratio(t, "two_floating")) for t in TRANSPORTS
            },
            "target_results": [dataclasses.asdict(t) for t in self.targets()],
            "calls_per_worker": dict(self.calls_per_worker),
            "runs": [bare(r) for r in self.runs],
            "warmups": [bare(r) for r in self.warmups],
        }


def render_table(report: Report) -> str:
    """The results as Markdown tables."""
    lines = [
        (
            "| transport | workers | req/s (median) | p50 ms | p99 ms | server CPU % "
            "| CPU µs/req | other CPU % | req/s per round |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for transport in TRANSPORTS:
        for case in CASES:
            runs = report.runs_of(case, transport)

            def m(name: str, case: str = case, transport: str = transport) -> float:
                return report.median(case, transport, name)

            rounds = " / ".join(f"{r.requests_per_second:.0f}" for r in runs)
            lines.append(
                f"| {'gRPC (h2load)' if transport == 'grpc' else 'JSON (wrk)'} | {LABELS[case]} "
                f"| {m('requests_per_second'):.0f} | {m('p50_ms'):.1f} | {m('p99_ms'):.1f} "
                f"| {m('server_cpu_percent'):.0f} | {m('cpu_us_per_request'):.0f} "
                f"| {m('other_cpu_percent'):.0f} | {rounds} |"
            )
    lines += ["", "| target | wanted | measured | |", "|---|---:|---:|---|"]
    lines += [
        f"| {t.label} | {t.wanted} | {t.measured} | {'met' if t.met else '**missed**'} |"
        for t in report.targets()
    ]
    unpinned = ", ".join(
        f"{transport} {report.ratio(transport, 'two_floating').median:.3f}"
        for transport in TRANSPORTS
    )
    lines += ["", f"No target: two unpinned workers / one: {unpinned}."]
    return "\n".join(lines)


def render_block(report: Report, json_name: str) -> str:
    """The generated results section of ``bench/README.md``."""
    machine, plan = report.machine, report.plan
    source = machine.get("source", {})
    dirty = source.get("uncommitted") or []
    code = f"Server code: commit {str(source.get('commit', 'unknown'))[:12]}" + (
        f", with uncommitted changes to {', '.join(dirty)}." if dirty else " (clean)."
    )
    total = sum(report.calls_per_worker.values()) or 1
    shares = ", ".join(
        f"worker {w}: {n} ({100 * n / total:.0f} %)" for w, n in report.calls_per_worker.items()
    )
    return "\n".join(
        [
            (
                f"Latest run: {report.date}, {machine.get('cpus')} CPUs "
                f"({machine.get('cpu_model')}), Python {machine.get('python')}, "
                f"{machine.get('postgres')}. {plan['rounds']} rounds, medians; the load tool, "
                "PostgreSQL and Redis unpinned. "
                f"{plan['requests']} requests per h2load run, wrk {plan['wrk_seconds']} s per "
                f"run, {plan['clients']} clients (connections) each. {code} "
                f"Raw numbers: `results/{json_name}`."
            ),
            "",
            render_table(report),
            "",
            f"Calls served by each worker of the two-worker server (every run): {shares}.",
            "",
            "Made by `make bench` (or `.venv/bin/python -m bench.run --only workers`).",
        ]
    )


def write_results(report: Report, directory: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` (the data) and ``<stem>.txt`` (the tables and the tools' output)."""
    sections = [render_table(report)]
    for run in report.runs:
        what = f"{LABELS[run.case]} worker(s), {run.transport}"
        sections += ["", f"--- round {run.round}, {what} ---"]
        sections += [run.command, run.output]
    return write_json_and_text(directory, stem, report.to_json(), sections)


def publish(report: Report, results_dir: Path, readme: Path) -> list[Path]:
    """Print the table, write ``results/workers-<date>.{json,txt}`` and the README
    section; the files written."""
    json_path, text_path = write_results(report, results_dir, f"workers-{report.date[:10]}")
    update_readme(readme, {"workers-results": render_block(report, json_path.name)})
    print(f"\n{render_table(report)}")
    return [json_path, text_path, readme]
