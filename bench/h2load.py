"""h2load as a gRPC load generator: the request, the command line, and reading its output.

h2load speaks plain HTTP/2, which is all a unary gRPC call is: a POST with
``content-type: application/grpc`` and ``te: trailers`` whose body is one length-prefixed
message. h2load only sees HTTP statuses, and a failed gRPC call is still HTTP 200, so a
run also checks the DATA bytes it received: every successful GetUser answers with the
same framed message, a failed one without it.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from bench.errors import LoadError

EXECUTABLE = "h2load"
#: Shown instead of the bearer token in recorded command lines.
REDACTED = "$TOKEN"
#: The request id of every call. Callers that send their own request id (the gateway, a
#: service mesh) are not sent it back; a server-made id costs grpc.aio a second batch per
#: call. The rate limiter takes a caller's id as a retry key: calls that repeat one are
#: not counted again against the monthly quota, so the limiter runs send none.
REQUEST_ID = "bench-h2load"


def grpc_frame(message: Message) -> bytes:
    """``message`` as one gRPC length-prefixed message: flag 0, 4-byte length, bytes."""
    payload = message.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


@dataclass(frozen=True, slots=True)
class Load:
    """One h2load run against one gRPC method."""

    url: str
    token: str
    body_file: Path
    requests: int
    clients: int
    log_file: Path
    #: The ``x-request-id`` every call sends, or None to send none (see :data:`REQUEST_ID`).
    request_id: str | None = REQUEST_ID

    def command(self, *, redact: bool = False) -> list[str]:
        """The h2load argument list; ``redact`` hides the bearer token."""
        token = REDACTED if redact else self.token
        request_id = (
            [] if self.request_id is None else [f"--header=x-request-id: {self.request_id}"]
        )
        return [
            EXECUTABLE,
            f"--requests={self.requests}",
            f"--clients={self.clients}",
            "--max-concurrent-streams=1",
            "--threads=1",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            f"--header=authorization: Bearer {token}",
            *request_id,
            f"--data={self.body_file}",
            f"--log-file={self.log_file}",
            self.url,
        ]


@dataclass(frozen=True, slots=True)
class Summary:
    """The totals h2load prints at the end of a run."""

    seconds: float
    requests_per_second: float
    total: int
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    data_bytes: int


_PATTERNS = {
    "finished": re.compile(r"^finished in ([\d.]+)(m?s), ([\d.]+) req/s", re.MULTILINE),
    "requests": re.compile(
        r"^requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored",
        re.MULTILINE,
    ),
    "status": re.compile(r"^status codes: (\d+) 2xx", re.MULTILINE),
    "data": re.compile(r"^traffic: .* \((\d+)\) data$", re.MULTILINE),
}


def _match(name: str, output: str) -> re.Match[str]:
    found = _PATTERNS[name].search(output)
    if found is None:
        raise LoadError(f"h2load printed no {name!r} line:\n{output}")
    return found


def parse_summary(output: str) -> Summary:
    """The totals from h2load's standard output."""
    finished = _match("finished", output)
    elapsed = float(finished[1]) / (1000 if finished[2] == "ms" else 1)
    requests = _match("requests", output)
    return Summary(
        seconds=elapsed,
        requests_per_second=float(finished[3]),
        total=int(requests[1]),
        succeeded=int(requests[2]),
        failed=int(requests[3]),
        errored=int(requests[4]),
        status_2xx=int(_match("status", output)[1]),
        data_bytes=int(_match("data", output)[1]),
    )


def check(summary: Summary, requests: int, response_frame_size: int) -> None:
    """Raise :class:`LoadError` unless all ``requests`` got HTTP 200 and the full answer."""
    expected_data = requests * response_frame_size
    problems = [
        f"{label} {got} != {requests}"
        for label, got in (
            ("total", summary.total),
            ("succeeded", summary.succeeded),
            ("2xx", summary.status_2xx),
        )
        if got != requests
    ]
    if summary.data_bytes != expected_data:
        problems.append(
            f"data {summary.data_bytes} bytes != {expected_data} "
            f"({requests} x {response_frame_size}): some calls answered without a message"
        )
    if problems:
        raise LoadError("not every call succeeded: " + "; ".join(problems))


def latencies_ms(log_file: Path) -> list[float]:
    """Per-request latencies (milliseconds, sorted) from an h2load ``--log-file``.

    Columns: start time (us since epoch), HTTP status (-1 for a failed stream), elapsed
    microseconds until the end of the response.
    """
    values = []
    for line in log_file.read_text().splitlines():
        _start, status, elapsed_us = line.split("\t")[:3]
        if status != "200":
            raise LoadError(f"{log_file}: a request ended with status {status}")
        values.append(int(elapsed_us) / 1000)
    return sorted(values)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (``fraction`` in (0, 1])."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(math.ceil(fraction * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def trimmed(output: str) -> str:
    """h2load's output without its progress lines."""
    return "\n".join(line for line in output.splitlines() if not line.startswith("progress:"))


def run(load: Load) -> str:
    """Run h2load to completion; its standard output."""
    result = subprocess.run(load.command(), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LoadError(f"h2load exited with {result.returncode}:\n{result.stderr}")
    return result.stdout


def version() -> str:
    """``h2load nghttp2/1.52.0``, or the error if it is not installed."""
    try:
        result = subprocess.run(
            [EXECUTABLE, "--version"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise LoadError(f"{EXECUTABLE} is not usable ({exc}); install nghttp2-client") from exc
    return result.stdout.strip()
