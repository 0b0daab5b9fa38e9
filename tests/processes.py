"""Child processes running the real server and CLI, for tests that need them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.conftest import FAST_HASHING, redis_prefix

ROOT = Path(__file__).resolve().parents[1]


def child_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    env.update(
        TP_DATA_DIR=str(data_dir),
        TP_GRPC_PORT="0",
        TP_HTTP_PORT="0",
        TP_METRICS_PORT="0",
        TP_LOG_LEVEL="INFO",
        TP_PROXY_PORT="0",
        # No fleet loop in children (a round a second): the fleet's own tests turn it on.
        TP_PROXY_PROVISIONER="off",
        **{f"TP_{k.upper()}": str(v) for k, v in FAST_HASHING.items()},
    )
    env.update(extra)
    return env


def replica_envs(
    database_url: str, redis_url: str, tmp_path: Path, names: tuple[str, ...] = ("a", "b")
) -> tuple[dict[str, str], ...]:
    """Environments of replicas (two unless ``names`` says otherwise) sharing one database,
    one Redis and the same keys."""
    from server.domain.identity.tokens import generate_private_key_pem
    from server.storage.sealing import new_key

    key = tmp_path / "jwt.pem"
    key.write_bytes(generate_private_key_pem())
    shared = {
        "TP_DATABASE_URL": database_url,
        "TP_REDIS_URL": redis_url,
        "TP_REDIS_PREFIX": redis_prefix(),
        "TP_JWT_PRIVATE_KEY_FILE": str(key),
        "TP_PAGE_TOKEN_SECRET": "p" * 40,
        "TP_SECRETS_KEY": new_key(),
    }
    envs = []
    for name in names:
        (tmp_path / name).mkdir()
        envs.append(child_env(tmp_path / name, **shared))
    return tuple(envs)


def run_cli(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        env=env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class ServerProcess:
    """``python -m server serve`` in a child process, with its ports read from its log."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self.log: list[dict[str, object]] = []
        #: The supervisor's (or the single process's) "serving" line.
        self.serving: dict[str, object] = {}

    async def wait_until_serving(self) -> None:
        """Until the server serves: with ``--workers``, the supervisor's line (each worker
        also writes one, with its ``worker`` index)."""
        async with asyncio.timeout(30):
            while True:
                entry = await self.next_log_entry()
                if entry.get("message") == "serving" and "worker" not in entry:
                    self.serving = entry
                    self.grpc_port = int(entry["grpc_port"])  # type: ignore[call-overload]
                    self.http_port = int(entry["http_port"])  # type: ignore[call-overload]
                    self.metrics_port = int(entry.get("metrics_port", -1))  # type: ignore[call-overload]
                    return

    async def next_log_entry(self) -> dict[str, object]:
        assert self.process.stderr is not None
        line = await self.process.stderr.readline()
        if not line:
            raise AssertionError(f"server exited: {self.log}")
        entry: dict[str, object] = json.loads(line)
        self.log.append(entry)
        return entry

    async def follow_log(self) -> None:
        """Read the log as it is written, until the process closes it (run it in a task:
        a server whose log pipe is full blocks)."""
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.log.append(json.loads(line))

    async def drain_log(self) -> None:
        assert self.process.stderr is not None
        for line in (await self.process.stderr.read()).splitlines():
            self.log.append(json.loads(line))


@asynccontextmanager
async def serving(env: dict[str, str], *args: str) -> AsyncIterator[ServerProcess]:
    """``python -m server serve [args]`` with ``env``, killed on exit if still running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "serve",
        *args,
        env=env,
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    server = ServerProcess(process)
    try:
        await server.wait_until_serving()
        yield server
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


_GATEWAY_LISTENING = re.compile(r"gateway listening on [\d.]+:(\d+)")


class GatewayProcess:
    """``python -m gateway`` in a child process, with the port it listens on."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.port = 0

    async def wait_until_listening(self) -> None:
        assert self.process.stderr is not None
        async with asyncio.timeout(30):
            while line := (await self.process.stderr.readline()).decode():
                if match := _GATEWAY_LISTENING.search(line):
                    self.port = int(match.group(1))
                    return
        raise AssertionError("the gateway exited before listening")


@asynccontextmanager
async def gateway_serving(
    descriptor_set: str | Path, upstream_port: int, *flags: str
) -> AsyncIterator[GatewayProcess]:
    """``python -m gateway`` on a free port in front of 127.0.0.1:``upstream_port``; sent
    SIGTERM at the end of the block and awaited (its exit status in ``process.returncode``)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway",
        "--descriptor-set", str(descriptor_set),
        "--upstream", f"127.0.0.1:{upstream_port}",
        "--port", "0",
        *flags,
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    gateway = GatewayProcess(process)
    try:
        await gateway.wait_until_listening()
        yield gateway
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)


@asynccontextmanager
async def redis_server(port: int, *extra: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A throwaway ``redis-server`` on ``port``, ready when entered."""
    process = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--loglevel", "notice", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(15):
            while b"Ready to accept connections" not in await process.stdout.readline():
                pass
        drain = asyncio.create_task(process.stdout.read())
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        drain.cancel()
