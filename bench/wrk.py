"""wrk (Debian package ``wrk``): the HTTP/1.1 load, and what its output says.

One thread, ``connections`` keep-alive connections with one request in flight each, for a
fixed duration. wrk counts a response whatever its status and reports the others only in
a ``Non-2xx or 3xx responses`` line, and socket errors in a ``Socket errors`` line: a run
with either fails. ``--latency`` adds the 50/75/90/99% latencies.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from bench.errors import LoadError

EXECUTABLE = "wrk"
#: Shown instead of the bearer token in recorded command lines.
REDACTED = "$TOKEN"
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclass(frozen=True, slots=True)
class Load:
    """One wrk run against one URL."""

    url: str
    token: str
    seconds: int
    connections: int

    def command(self, *, redact: bool = False) -> list[str]:
        """The wrk argument list; ``redact`` hides the bearer token."""
        token = REDACTED if redact else self.token
        auth = ["-H", f"Authorization: Bearer {token}"] if self.token else []
        return [
            EXECUTABLE,
            "-t1",
            f"-c{self.connections}",
            f"-d{self.seconds}s",
            "--latency",
            *auth,
            self.url,
        ]


@dataclass(frozen=True, slots=True)
class Summary:
    """What wrk prints at the end of a run (latencies in milliseconds)."""

    requests: int
    seconds: float
    requests_per_second: float
    mean_ms: float
    max_ms: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: dict[str, int]


_LATENCY = r"([\d.]+)(us|ms|s|m|h)"
_PATTERNS = {
    "thread": re.compile(rf"^\s+Latency\s+{_LATENCY}\s+{_LATENCY}\s+{_LATENCY}", re.MULTILINE),
    "total": re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.MULTILINE),
    "rate": re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE),
    **{
        f"p{p}": re.compile(rf"^\s+{p}%\s+{_LATENCY}", re.MULTILINE)
        for p in ("50", "75", "90", "99")
    },
}
_NON_2XX = re.compile(r"^\s+Non-2xx or 3xx responses: (\d+)", re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"^\s+Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)


def to_ms(value: str, unit: str) -> float:
    """A wrk duration (``850.00us``, ``43.97ms``, ``1.20s``) in milliseconds."""
    return round(float(value) * _UNITS_MS[unit], 3)


def _match(name: str, output: str) -> re.Match[str]:
    found = _PATTERNS[name].search(output)
    if found is None:
        raise LoadError(f"wrk printed no {name!r} line:\n{output}")
    return found


def _percentile(output: str, percent: str) -> float:
    found = _match(f"p{percent}", output)
    return to_ms(found[1], found[2])


def _socket_errors(output: str) -> dict[str, int]:
    found = _SOCKET_ERRORS.search(output)
    counts = [0, 0, 0, 0] if found is None else [int(n) for n in found.groups()]
    return dict(zip(("connect", "read", "write", "timeout"), counts, strict=True))


def parse_summary(output: str) -> Summary:
    """The totals and latencies from wrk's standard output."""
    thread, total = _match("thread", output), _match("total", output)
    non_2xx = _NON_2XX.search(output)
    return Summary(
        requests=int(total[1]),
        seconds=to_ms(total[2], total[3]) / 1000,
        requests_per_second=float(_match("rate", output)[1]),
        mean_ms=to_ms(thread[1], thread[2]),
        max_ms=to_ms(thread[5], thread[6]),
        p50_ms=_percentile(output, "50"),
        p75_ms=_percentile(output, "75"),
        p90_ms=_percentile(output, "90"),
        p99_ms=_percentile(output, "99"),
        non_2xx=0 if non_2xx is None else int(non_2xx[1]),
        socket_errors=_socket_errors(output),
    )


def check(summary: Summary) -> None:
    """Raise :class:`LoadError` unless every response was 2xx and no socket failed."""
    problems = []
    if summary.requests == 0:
        problems.append("no request completed")
    if summary.non_2xx:
        problems.append(f"{summary.non_2xx} non-2xx responses")
    errors = {kind: n for kind, n in summary.socket_errors.items() if n}
    if errors:
        problems.append(f"socket errors {errors}")
    if problems:
        raise LoadError("not every request succeeded: " + "; ".join(problems))


def run(load: Load) -> str:
    """Run wrk to completion; its standard output."""
    result = subprocess.run(load.command(), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LoadError(f"wrk exited with {result.returncode}:\n{result.stderr}")
    return result.stdout


def version() -> str:
    """``wrk debian/4.1.0-3+b2 [epoll]``, or the error if it is not installed."""
    try:
        # wrk -v prints its version and usage, and exits with 1.
        result = subprocess.run([EXECUTABLE, "-v"], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise LoadError(f"{EXECUTABLE} is not usable ({exc}); install wrk") from exc
    first = result.stdout.splitlines()[0] if result.stdout else ""
    if not first.startswith("wrk "):
        raise LoadError(f"{EXECUTABLE} -v printed {result.stdout!r}{result.stderr!r}")
    return first.partition(" Copyright")[0].strip()
