"""The processes under test: their environment, the database they share, and a context
manager that starts one (``python -m bench.server``), waits for its ``READY`` line and
stops it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 60.0

#: Embedded defaults; logs at INFO (the access log is part of the pipeline), to a file.
#: Argon2 is cheap only to make the setup quick: GetUser never hashes. The rate limiter is
#: off: these servers measure what they measured before it existed (the ``limiter_*``
#: servers of ``bench/limiter.py`` measure it, with settings of their own on top of these).
SERVER_SETTINGS: Mapping[str, str] = {
    "TP_GRPC_HOST": "127.0.0.1",
    "TP_GRPC_PORT": "0",
    "TP_HTTP_HOST": "127.0.0.1",
    "TP_HTTP_PORT": "0",
    "TP_METRICS_PORT": "-1",
    "TP_LOG_LEVEL": "INFO",
    "TP_LOG_FORMAT": "json",
    "TP_OTEL_EXPORTER": "none",
    "TP_ARGON2_TIME_COST": "1",
    "TP_ARGON2_MEMORY_KIB": "1024",
    "TP_ARGON2_PARALLELISM": "1",
    "TP_ACCESS_TOKEN_TTL": "3600",
    "TP_RATE_LIMIT_ENABLED": "false",
    # No embedded streaming proxy: the bench runs many servers at once, and each would
    # start one on the same ports (the streaming proxy has a part of its own).
    "TP_PROXY_PORT": "0",
}


def server_env(data_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any ``TP_*`` variable, plus the bench settings (and
    ``extra``, which override them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    return env | dict(SERVER_SETTINGS) | {"TP_DATA_DIR": str(data_dir)} | dict(extra or {})


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


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command name: state is field 3 of stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_ready(line: str) -> dict[str, int]:
    """``READY grpc=1 http=2`` -> ``{"grpc": 1, "http": 2}``; ValueError otherwise."""
    word, *pairs = line.split()
    if word != "READY" or not pairs:
        raise ValueError(line)
    ports = {}
    for pair in pairs:
        name, _, port = pair.partition("=")
        ports[name] = int(port)
    return ports


class ServerProcess:
    """A server under test in a child process, stopped (SIGTERM) on leaving the block."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args = [sys.executable, "-m", "bench.server", *args]
        self.env = env
        self.log_path = log_path
        self.ports: dict[str, int] = {}
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
        self.ports = self._wait_ready(self._process)
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

    def _wait_ready(self, process: subprocess.Popen[str]) -> dict[str, int]:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT)
        line = process.stdout.readline() if ready else ""
        try:
            return parse_ready(line)
        except ValueError:
            process.kill()
            process.wait()
            tail = self.log_path.read_text()[-2000:]
            raise RuntimeError(f"{' '.join(self.args)} did not start:\n{tail}") from None

    @property
    def pid(self) -> int:
        """The process id."""
        assert self._process is not None
        return self._process.pid

    def url(self, protocol: str, path: str) -> str:
        """``http://127.0.0.1:<port>/<path>`` on the port of ``protocol`` (grpc or http)."""
        return f"http://127.0.0.1:{self.ports[protocol]}{path}"
