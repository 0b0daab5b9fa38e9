"""Results of a benchmark run: medians, the full/bare ratio, targets, and where they go
(the printed table, ``bench/results/`` and the results section of ``bench/README.md``)."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"
SERVERS = ("full", "bare")


@dataclass(frozen=True, slots=True)
class Measurement:
    """One measured h2load run against one server."""

    server: str
    round: int
    requests: int
    seconds: float
    requests_per_second: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    command: str
    h2load_output: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Targets:
    """What the issue asks of the full pipeline."""

    min_ratio: float
    max_p99_ms: float


@dataclass(frozen=True, slots=True)
class Medians:
    """Medians over the measured rounds of one server."""

    requests_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


def medians(runs: Sequence[Measurement]) -> Medians:
    """The median of each number over ``runs``."""
    return Medians(
        requests_per_second=statistics.median(r.requests_per_second for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p95_ms=statistics.median(r.p95_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
    )


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one run of ``make bench`` found, and how."""

    date: str
    machine: Mapping[str, Any]
    server_settings: Mapping[str, str]
    load: Mapping[str, Any]
    targets: Targets
    runs: Sequence[Measurement]
    access_log_codes: Mapping[str, int]

    def runs_of(self, server: str) -> list[Measurement]:
        """The measured runs of one server, in round order."""
        return [r for r in self.runs if r.server == server]

    @property
    def commands(self) -> dict[str, str]:
        """The h2load command line of each server's first measured run."""
        return {s: self.runs_of(s)[0].command for s in SERVERS}

    def medians_of(self, server: str) -> Medians:
        """Medians over the rounds of one server."""
        return medians(self.runs_of(server))

    @property
    def ratio(self) -> float:
        """The median of the per-round full/bare ratios.

        Each round runs the two servers back to back, so a round's ratio cancels most of
        the machine's drift; the median of those paired ratios is steadier than a ratio of
        two independent medians (which mixes rounds that saw different noise).
        """
        ratios = sorted(self.round_ratios)
        middle = len(ratios) // 2
        if len(ratios) % 2:
            return ratios[middle]
        return (ratios[middle - 1] + ratios[middle]) / 2

    @property
    def round_ratios(self) -> list[float]:
        """full/bare throughput of each round (the two ran back to back)."""
        pairs = zip(self.runs_of("full"), self.runs_of("bare"), strict=True)
        return [f.requests_per_second / b.requests_per_second for f, b in pairs]

    @property
    def ratio_met(self) -> bool:
        """Whether the full pipeline keeps enough of the bare throughput."""
        return self.ratio >= self.targets.min_ratio

    @property
    def p99_met(self) -> bool:
        """Whether the full pipeline's median p99 is under the target."""
        return self.medians_of("full").p99_ms < self.targets.max_p99_ms

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data, raw runs included."""
        return {
            "benchmark": "tunnelplane.v1.UserService/GetUser, full pipeline vs bare grpc.aio",
            "date": self.date,
            "machine": dict(self.machine),
            "server_settings": dict(self.server_settings),
            "load": dict(self.load),
            "h2load_commands": dict(self.commands),
            "targets": dataclasses.asdict(self.targets),
            "medians": {s: dataclasses.asdict(self.medians_of(s)) for s in SERVERS},
            "ratio_full_over_bare": round(self.ratio, 4),
            "round_ratios": [round(r, 4) for r in self.round_ratios],
            "ratio_met": self.ratio_met,
            "p99_met": self.p99_met,
            "full_access_log_getuser_codes": dict(self.access_log_codes),
            "runs": [
                {k: v for k, v in dataclasses.asdict(r).items() if k != "h2load_output"}
                for r in self.runs
            ],
        }


def _target_row(target: str, wanted: str, measured: str, met: bool) -> str:
    return f"| {target} | {wanted} | {measured} | {'met' if met else '**missed**'} |"


def render_table(report: Report) -> str:
    """The results as Markdown tables (read as well in a terminal as in the README)."""
    columns = "req/s (median) | p50 ms | p95 ms | p99 ms | req/s per round"
    lines = [f"| server | {columns} |", "|---|---:|---:|---:|---:|---|"]
    for server in SERVERS:
        m = report.medians_of(server)
        rounds = " / ".join(f"{r.requests_per_second:.0f}" for r in report.runs_of(server))
        lines.append(
            f"| {server} | {m.requests_per_second:.0f} | {m.p50_ms:.1f} | {m.p95_ms:.1f} "
            f"| {m.p99_ms:.1f} | {rounds} |"
        )
    targets, full = report.targets, report.medians_of("full")
    per_round = ", ".join(f"{r:.3f}" for r in report.round_ratios)
    lines += [
        "",
        "| target | wanted | measured | |",
        "|---|---:|---:|---|",
        _target_row(
            "full/bare throughput",
            f">= {targets.min_ratio:.2f}",
            f"{report.ratio:.3f} (per round: {per_round})",
            report.ratio_met,
        ),
        _target_row(
            f"full p99 at c={report.load['clients']}",
            f"< {targets.max_p99_ms:.0f} ms",
            f"{full.p99_ms:.1f} ms",
            report.p99_met,
        ),
    ]
    return "\n".join(lines)


def render_readme_block(report: Report, json_name: str) -> str:
    """The generated results section of ``bench/README.md``."""
    machine, load = report.machine, report.load
    where = (
        f"Latest run: {report.date}, {machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"Python {machine['python']}, grpcio {machine['grpcio']}, {machine['h2load']}."
    )
    pinned = (
        f" Servers pinned to CPU {load['server_cpu']}, h2load to CPU {load['h2load_cpu']}."
        if load.get("server_cpu") is not None
        else " Not pinned to CPUs."
    )
    how = (
        f"{load['requests']} requests per run, {load['clients']} clients with one stream "
        f"each, {load['rounds']} rounds, medians; access log at INFO to a file.{pinned} "
        f"Raw numbers: `results/{json_name}`."
    )
    note = (
        "(`bare` ran the same command against its own port and log file; "
        "`$TOKEN` is the bench user's.)"
    )
    return "\n".join(
        [
            README_START,
            f"{where} {how}",
            "",
            render_table(report),
            "",
            "Made by `make bench`; the first measured run of `full` was:",
            "",
            "```",
            report.commands["full"],
            "```",
            "",
            note,
            README_END,
        ]
    )


def update_readme(readme: Path, block: str) -> None:
    """Replace the text between the results markers of ``readme`` with ``block``."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} lacks the {README_START} ... {README_END} markers")
    readme.write_text(text[:start] + block + text[end + len(README_END) :])


def write_results(report: Report, directory: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` (the data) and ``<stem>.txt`` (table and raw h2load output)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, text_path = directory / f"{stem}.json", directory / f"{stem}.txt"
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    sections = [render_table(report), "", "h2load commands:"]
    sections += [f"  {server}: {command}" for server, command in report.commands.items()]
    for run in report.runs:
        sections += ["", f"--- round {run.round}, {run.server} ---", run.h2load_output.strip()]
    text_path.write_text("\n".join(sections) + "\n")
    return json_path, text_path
