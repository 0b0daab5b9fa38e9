"""Results of a benchmark run: medians, paired ratios, targets, and where they go (the
printed tables, ``bench/results/`` and the two results sections of ``bench/README.md``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.errors import LoadError

R = TypeVar("R")

#: The gRPC comparison, its README section and the server that carries the h2load command.
GRPC_SERVERS = ("full", "bare")
#: The HTTP comparison (``full`` is the gRPC path of the same server).
HTTP_SERVERS = ("embedded", "full", "standalone", "fastapi")
#: The rate limiter's cost over gRPC: in Redis against off, and (for information) in process
#: against the same ``full`` server loaded the same way (no request id).
LIMITER_SERVERS = ("limiter_off", "limiter_redis", "full_no_id", "limiter_memory")
SERVERS = (
    "full",
    "bare",
    "embedded",
    "standalone",
    "fastapi",
    "limiter_off",
    "limiter_redis",
    "full_no_id",
    "limiter_memory",
)
LABELS = {
    "full": "gRPC, full pipeline, limiter off, no Redis (h2load)",
    "bare": "gRPC, bare grpc.aio (h2load)",
    "embedded": "embedded gateway, full pipeline (wrk)",
    "standalone": "standalone gateway -> gRPC (wrk)",
    "fastapi": "FastAPI baseline (wrk)",
    "limiter_off": "gRPC, full pipeline, Redis, limiter off (h2load, no request id)",
    "limiter_redis": "gRPC, full pipeline, Redis, limiter on in Redis (h2load, no request id)",
    "full_no_id": "the `full` server, no request id (h2load)",
    "limiter_memory": "gRPC, full pipeline, no Redis, limiter on in process (h2load, "
    "no request id)",
}


@dataclass(frozen=True, slots=True)
class Measurement:
    """One measured load run against one server (h2load for gRPC, wrk for HTTP)."""

    server: str
    round: int
    tool: str
    requests: int
    seconds: float
    requests_per_second: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    #: None for wrk, which prints 50/75/90/99% only.
    p95_ms: float | None
    p99_ms: float
    max_ms: float
    #: CPU time of the serving processes over the run, as a share of one CPU; and per request.
    server_cpu_percent: float
    cpu_us_per_request: float
    command: str
    output: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Targets:
    """What the issues ask: of the pipeline over gRPC, and of the embedded gateway."""

    full_over_bare: float = 0.85
    limiter_redis_over_off: float = 0.95
    embedded_over_fastapi: float = 2.0
    embedded_over_grpc: float = 1.5
    max_p99_ms: float = 25.0


@dataclass(frozen=True, slots=True)
class Medians:
    """Medians over the measured rounds of one server."""

    requests_per_second: float
    p50_ms: float
    p90_ms: float
    p95_ms: float | None
    p99_ms: float
    server_cpu_percent: float
    cpu_us_per_request: float


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(runs: Sequence[Measurement]) -> Medians:
    """The median of each number over ``runs``."""
    return Medians(
        requests_per_second=statistics.median(r.requests_per_second for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p90_ms=statistics.median(r.p90_ms for r in runs),
        p95_ms=_median([r.p95_ms for r in runs]),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        server_cpu_percent=statistics.median(r.server_cpu_percent for r in runs),
        cpu_us_per_request=statistics.median(r.cpu_us_per_request for r in runs),
    )


@dataclass(frozen=True, slots=True)
class Ratio:
    """A throughput ratio: the median of the per-round ratios, and those ratios.

    The servers of a round run close together, so a round's ratio cancels most of the
    machine's drift; the median of the paired ratios is steadier than a ratio of two
    independent medians (which mixes rounds that saw different noise).
    """

    median: float
    per_round: list[float]


@dataclass(frozen=True, slots=True)
class TargetResult:
    """One target: what is wanted, what was measured, whether it was met."""

    label: str
    wanted: str
    measured: str
    met: bool


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one run of ``make bench`` found, and how."""

    date: str
    machine: Mapping[str, Any]
    server_settings: Mapping[str, str]
    load: Mapping[str, Any]
    targets: Targets
    runs: Sequence[Measurement]
    log_checks: Mapping[str, Any]
    #: The limiter servers' settings on top of ``server_settings``.
    limiter_settings: Mapping[str, Mapping[str, str]]
    #: What showed that the limiter decided (and counted) every call where it should.
    limiter_checks: Mapping[str, Any]

    def runs_of(self, server: str) -> list[Measurement]:
        """The measured runs of one server, in round order."""
        return [r for r in self.runs if r.server == server]

    @property
    def commands(self) -> dict[str, str]:
        """The load command line of each server's first measured run."""
        return {s: self.runs_of(s)[0].command for s in SERVERS}

    def medians_of(self, server: str) -> Medians:
        """Medians over the rounds of one server."""
        return medians(self.runs_of(server))

    def ratio(self, numerator: str, denominator: str) -> Ratio:
        """Throughput of ``numerator`` over ``denominator``, paired by round."""
        pairs = zip(self.runs_of(numerator), self.runs_of(denominator), strict=True)
        per_round = [a.requests_per_second / b.requests_per_second for a, b in pairs]
        return Ratio(statistics.median(per_round), per_round)

    def grpc_targets(self) -> list[TargetResult]:
        """The pipeline's cost over gRPC: full/bare throughput and full's p99."""
        return [
            self._ratio_target("full/bare throughput", "full", "bare", self.targets.full_over_bare),
            self._p99_target("full"),
        ]

    def http_targets(self) -> list[TargetResult]:
        """The embedded gateway against FastAPI and against the gRPC path, and its p99."""
        t = self.targets
        return [
            self._ratio_target(
                "embedded/FastAPI throughput", "embedded", "fastapi", t.embedded_over_fastapi
            ),
            self._ratio_target(
                "embedded/gRPC throughput", "embedded", "full", t.embedded_over_grpc
            ),
            self._p99_target("embedded"),
        ]

    def capacity_ratio(self, numerator: str, denominator: str) -> Ratio:
        """Requests per second of server CPU time (the inverse of CPU per request) of
        ``numerator`` over ``denominator``, paired by round: the throughput each would
        have with a whole CPU to itself."""
        pairs = zip(self.runs_of(numerator), self.runs_of(denominator), strict=True)
        per_round = [b.cpu_us_per_request / a.cpu_us_per_request for a, b in pairs]
        return Ratio(statistics.median(per_round), per_round)

    def limiter_targets(self) -> list[TargetResult]:
        """The limiter in Redis against the same server with it off, in every round: in
        throughput, and in throughput per CPU second (which the machine's other tenants
        move far less)."""
        wanted = self.targets.limiter_redis_over_off
        results = []
        for label, ratio in (
            ("throughput", self.ratio("limiter_redis", "limiter_off")),
            ("requests per CPU second", self.capacity_ratio("limiter_redis", "limiter_off")),
        ):
            per_round = ", ".join(f"{r:.3f}" for r in ratio.per_round)
            results.append(
                TargetResult(
                    f"limiter_redis/limiter_off {label}, every round",
                    f">= {wanted:.2f}",
                    f"{ratio.median:.3f} (per round: {per_round})",
                    min(ratio.per_round) >= wanted,
                )
            )
        return results

    def limiter_informative(self) -> dict[str, Any]:
        """Ratios and costs without a target: the in-process limiter, Redis as the
        shared store, and the CPU each limiter adds per call."""

        def cpu(server: str) -> float:
            return self.medians_of(server).cpu_us_per_request

        return {
            "limiter_memory_over_full_no_id": dataclasses.asdict(
                self.ratio("limiter_memory", "full_no_id")
            ),
            "limiter_off_over_full_no_id": dataclasses.asdict(
                self.ratio("limiter_off", "full_no_id")
            ),
            "full_no_id_over_full": dataclasses.asdict(self.ratio("full_no_id", "full")),
            "added_cpu_us_per_request_redis": round(cpu("limiter_redis") - cpu("limiter_off"), 1),
            "added_cpu_us_per_request_memory": round(cpu("limiter_memory") - cpu("full_no_id"), 1),
        }

    def _ratio_target(
        self, label: str, numerator: str, denominator: str, wanted: float
    ) -> TargetResult:
        ratio = self.ratio(numerator, denominator)
        per_round = ", ".join(f"{r:.3f}" for r in ratio.per_round)
        measured = f"{ratio.median:.3f} (per round: {per_round})"
        return TargetResult(label, f">= {wanted:.2f}", measured, ratio.median >= wanted)

    def _p99_target(self, server: str) -> TargetResult:
        p99 = self.medians_of(server).p99_ms
        return TargetResult(
            f"{server} p99 at c={self.load['clients']}",
            f"< {self.targets.max_p99_ms:.0f} ms",
            f"{p99:.1f} ms",
            p99 < self.targets.max_p99_ms,
        )

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data, raw runs included."""
        informative = self.ratio("standalone", "embedded")
        return {
            "benchmark": "tunnelplane.v1.UserService/GetUser (GET /v1/users/me): gRPC full "
            "pipeline vs bare grpc.aio; rate limiter in Redis vs off; embedded gateway vs gRPC, "
            "standalone gateway, FastAPI",
            "date": self.date,
            "machine": dict(self.machine),
            "server_settings": dict(self.server_settings),
            "limiter_settings": {s: dict(v) for s, v in self.limiter_settings.items()},
            "load": dict(self.load),
            "commands": self.commands,
            "targets": dataclasses.asdict(self.targets),
            "medians": {s: dataclasses.asdict(self.medians_of(s)) for s in SERVERS},
            "grpc_targets": [dataclasses.asdict(t) for t in self.grpc_targets()],
            "http_targets": [dataclasses.asdict(t) for t in self.http_targets()],
            "limiter_targets": [dataclasses.asdict(t) for t in self.limiter_targets()],
            "ratio_standalone_over_embedded": dataclasses.asdict(informative),
            "limiter_informative": self.limiter_informative(),
            "log_checks": dict(self.log_checks),
            "limiter_checks": dict(self.limiter_checks),
            "runs": [
                {k: v for k, v in dataclasses.asdict(r).items() if k != "output"} for r in self.runs
            ],
        }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _server_rows(report: Report, servers: Sequence[str], latencies: Sequence[str]) -> list[str]:
    """One row per server; ``latencies`` name :class:`Medians` fields (``p50_ms``)."""
    header = " | ".join(name.replace("_", " ") for name in latencies)
    lines = [
        f"| server | req/s (median) | {header} | server CPU % | CPU µs/req | req/s per round |",
        "|---|---:|" + "---:|" * (len(latencies) + 2) + "---|",
    ]
    for server in servers:
        m = report.medians_of(server)
        rounds = " / ".join(f"{r.requests_per_second:.0f}" for r in report.runs_of(server))
        values = " | ".join(_ms(getattr(m, name)) for name in latencies)
        lines.append(
            f"| {server} | {m.requests_per_second:.0f} | {values} | {m.server_cpu_percent:.0f} "
            f"| {m.cpu_us_per_request:.0f} | {rounds} |"
        )
    return lines


def _target_rows(targets: Sequence[TargetResult]) -> list[str]:
    header = ["| target | wanted | measured | |", "|---|---:|---:|---|"]
    return header + [
        f"| {t.label} | {t.wanted} | {t.measured} | {'met' if t.met else '**missed**'} |"
        for t in targets
    ]


def render_grpc_table(report: Report) -> str:
    """The gRPC results as Markdown tables (read as well in a terminal as in the README)."""
    rows = _server_rows(report, GRPC_SERVERS, ("p50_ms", "p95_ms", "p99_ms"))
    return "\n".join([*rows, "", *_target_rows(report.grpc_targets())])


def render_http_table(report: Report) -> str:
    """The HTTP results: the four ways to serve ``GET /v1/users/me``, and the targets."""
    rows = _server_rows(report, HTTP_SERVERS, ("p50_ms", "p90_ms", "p99_ms"))
    informative = report.ratio("standalone", "embedded")
    legend = ", ".join(f"`{s}`: {LABELS[s]}" for s in HTTP_SERVERS)
    return "\n".join(
        [
            *rows,
            "",
            f"({legend}.)",
            "",
            *_target_rows(report.http_targets()),
            "",
            f"Standalone/embedded throughput (no target): {informative.median:.3f}.",
        ]
    )


def render_limiter_table(report: Report) -> str:
    """The rate limiter's results: limiter in Redis, off, in process, and the target."""
    rows = _server_rows(report, LIMITER_SERVERS, ("p50_ms", "p95_ms", "p99_ms"))
    legend = ", ".join(f"`{s}`: {LABELS[s]}" for s in LIMITER_SERVERS)
    info = report.limiter_informative()
    checks = report.limiter_checks
    no_target = (
        "No target: limiter_memory/full_no_id throughput (the in-process limiter) "
        f"{info['limiter_memory_over_full_no_id']['median']:.3f}; limiter_off/full_no_id "
        f"(Redis as the shared store, limiter off) "
        f"{info['limiter_off_over_full_no_id']['median']:.3f}; full_no_id/full (no request "
        f"id from the caller) {info['full_no_id_over_full']['median']:.3f}. CPU the "
        "limiter adds per call (difference of the medians): in Redis "
        f"{info['added_cpu_us_per_request_redis']:+.0f} µs (the server process only; Redis's "
        f"own CPU is not counted), in process {info['added_cpu_us_per_request_memory']:+.0f} µs."
    )
    itself = (
        " and the GetUsage call itself"
        if checks.get("limiter_memory_getusage_counts_itself")
        else ""
    )
    ran = (
        "The limiter ran: `limiter_redis`'s monthly request counter in Redis is "
        f"{checks.get('limiter_redis_quota_counter')}, the number of GetUser calls sent to it "
        f"({checks.get('limiter_redis_getuser_calls')}); `limiter_memory`'s, read by GetUsage, "
        f"{checks.get('limiter_memory_getusage_requests')} (its "
        f"{checks.get('limiter_memory_getuser_calls')} GetUser calls{itself}); `limiter_off` "
        "left no limiter key in Redis."
    )
    legend_line = f"({legend}.)"
    return "\n".join(
        [
            *rows,
            "",
            legend_line,
            "",
            *_target_rows(report.limiter_targets()),
            "",
            no_target,
            "",
            ran,
        ]
    )


def render_all_tables(report: Report) -> str:
    """The three results tables, one after the other."""
    return "\n\n".join(
        [render_grpc_table(report), render_limiter_table(report), render_http_table(report)]
    )


def _where(report: Report) -> str:
    machine, load = report.machine, report.load
    pinned = (
        f" Servers pinned to CPU {load['server_cpu']}, the load tool to CPU {load['load_cpu']}."
        if load.get("server_cpu") is not None
        else " Not pinned to CPUs."
    )
    source = machine.get("source", {})
    dirty = source.get("uncommitted") or []
    code = f" Server code: commit {str(source.get('commit', 'unknown'))[:12]}" + (
        f", with uncommitted changes to {', '.join(dirty)}." if dirty else " (clean)."
    )
    return (
        f"Latest run: {report.date}, {machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"Python {machine['python']}, grpcio {machine['grpcio']}, {machine['h2load']}, "
        f"{machine['wrk']}. {load['rounds']} rounds, medians; access logs at INFO to a "
        f"file.{pinned}{code}"
    )


def render_grpc_block(report: Report, json_name: str) -> str:
    """The generated gRPC results section of ``bench/README.md``."""
    load = report.load
    how = (
        f"{load['requests']} requests per h2load run, {load['clients']} clients with one "
        f"stream each. Raw numbers: `results/{json_name}`."
    )
    return "\n".join(
        [
            f"{_where(report)} {how}",
            "",
            render_grpc_table(report),
            "",
            "Made by `make bench`; the first measured run of `full` was:",
            "",
            "```",
            report.commands["full"],
            "```",
            "",
            (
                "(`bare` ran the same command against its own port and log file; "
                "`$TOKEN` is the bench user's.)"
            ),
        ]
    )


def render_http_block(report: Report, json_name: str) -> str:
    """The generated HTTP results section of ``bench/README.md``."""
    load = report.load
    how = (
        f"wrk: {load['wrk_seconds']} s per run, {load['clients']} keep-alive connections, "
        f"one thread; the gRPC row is the h2load run above. Raw numbers: `results/{json_name}`."
    )
    commands = [f"{s}: {report.commands[s]}" for s in ("embedded", "standalone", "fastapi")]
    return "\n".join(
        [
            f"{_where(report)} {how}",
            "",
            render_http_table(report),
            "",
            "The first measured wrk runs were (`$TOKEN` is the bench user's access token):",
            "",
            "```",
            *commands,
            "```",
        ]
    )


def render_limiter_block(report: Report, json_name: str) -> str:
    """The generated rate limiter results section of ``bench/README.md``."""
    load = report.load
    how = (
        f"{load['requests']} requests per h2load run, {load['clients']} clients with one "
        f"stream each, no request id. Raw numbers: `results/{json_name}`."
    )
    return "\n".join(
        [
            f"{_where(report)} {how}",
            "",
            render_limiter_table(report),
            "",
            "Made by `make bench`; the first measured run of `limiter_redis` was:",
            "",
            "```",
            report.commands["limiter_redis"],
            "```",
            "",
            (
                "(`limiter_off` and `limiter_memory` ran the same command against their own "
                "ports and log files; `$TOKEN` is the bench user's.)"
            ),
        ]
    )


def update_readme(readme: Path, blocks: Mapping[str, str]) -> None:
    """Replace the text between each pair of ``<!-- NAME:start/end -->`` markers."""
    text = readme.read_text()
    for name, block in blocks.items():
        start_marker, end_marker = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        start, end = text.find(start_marker), text.find(end_marker)
        if start < 0 or end < start:
            raise ValueError(f"{readme} lacks the {start_marker} ... {end_marker} markers")
        text = text[: start + len(start_marker)] + "\n" + block + "\n" + text[end:]
    readme.write_text(text)


def readme_blocks(report: Report, json_name: str) -> dict[str, str]:
    """The README sections this run rewrites, by marker name."""
    return {
        "results": render_grpc_block(report, json_name),
        "limiter-results": render_limiter_block(report, json_name),
        "http-results": render_http_block(report, json_name),
    }


def write_results(report: Report, directory: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` (the data) and ``<stem>.txt`` (tables and the tools' raw output)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, text_path = directory / f"{stem}.json", directory / f"{stem}.txt"
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    sections = [render_all_tables(report), "", "commands:"]
    sections += [f"  {server}: {command}" for server, command in report.commands.items()]
    for run in report.runs:
        sections += ["", f"--- round {run.round}, {run.server} ---", run.output.strip()]
    text_path.write_text("\n".join(sections) + "\n")
    return json_path, text_path


def measure_alone(
    name: str, measure: Callable[[Path], R], render: Callable[[R], str], *, keep: bool
) -> int:
    """One part of the bench run on its own (``python -m bench.<part>``): measure in a work
    directory of its own (kept when a check fails, or with ``keep``), print the table;
    0 when it ran, 1 when a check failed."""
    work_dir = Path(tempfile.mkdtemp(prefix=f"tunnelplane-{name}-"))
    try:
        result = measure(work_dir)
    except (LoadError, RuntimeError) as exc:
        print(f"{name} bench failed: {exc}\n(work directory kept: {work_dir})", file=sys.stderr)
        return 1
    print(f"\n{render(result)}")
    if keep:
        print(f"work directory kept: {work_dir}")
    else:
        shutil.rmtree(work_dir)
    return 0


def write_json_and_text(
    directory: Path, stem: str, data: Mapping[str, Any], sections: Sequence[str]
) -> tuple[Path, Path]:
    """``<stem>.json`` (``data``) and ``<stem>.txt`` (``sections``, one per line) in
    ``directory``; the two paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, text_path = directory / f"{stem}.json", directory / f"{stem}.txt"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    text_path.write_text("\n".join(sections) + "\n")
    return json_path, text_path
