"""``python -m agent`` as a person runs it: a child process against a test control plane."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.identity import derived_agent_id
from tests.agent.fakes import (
    EchoServer,
    FakeControlPlane,
    connect,
    desired,
    next_item,
    round_trip,
)

ROOT = Path(__file__).resolve().parents[2]
KEY = "tpk_agent_process_secret_42"
TUNNEL = "users/u7/tunnels/t9"

pytestmark = pytest.mark.slow


def agent_env(home: Path, **extra: str) -> dict[str, str]:
    """The test's environment without TP_ variables, with a home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    env.pop("XDG_CONFIG_HOME", None)
    env.update(HOME=str(home), **extra)
    return env


async def start_agent(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def log_until(
    process: asyncio.subprocess.Process, lines: list[bytes], message: str
) -> dict[str, Any]:
    """Read the agent's log until an entry with ``message``; keep every line read."""
    assert process.stderr is not None
    async with asyncio.timeout(30):
        while line := await process.stderr.readline():
            lines.append(line)
            entry: dict[str, Any] = json.loads(line)
            if entry["message"] == message:
                return entry
    raise AssertionError(f"the agent exited before logging {message!r}: {lines}")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_agent_connects_relays_and_stops_cleanly(
    plane: FakeControlPlane, echo: EchoServer, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    plane.push(desired(1, listen="0.0.0.0:0"))
    args = ["--control-plane", plane.address, "--tunnel", TUNNEL, "--target", echo.address]
    args += ["--listen-host", "127.0.0.1", "--heartbeat", "0.2", "--report-interval", "0.2"]
    process = await start_agent(agent_env(tmp_path, TP_AGENT_KEY=KEY), *args)
    lines: list[bytes] = []
    try:
        metadata = await next_item(plane.metadata, 30)
        hello = await next_item(plane.hellos)
        listening = await log_until(process, lines, "relay listening")
        async with connect(int(listening["listen_port"])) as client:
            assert await round_trip(*client, b"through the agent") == b"through the agent"
        while (await next_item(plane.reports)).bytes_in == 0:
            pass
        process.send_signal(stop_signal)
        async with asyncio.timeout(30):
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    lines.extend((await process.stderr.read()).splitlines(keepends=True))

    assert code == 0
    assert metadata["authorization"] == f"Bearer {KEY}"
    assert hello.agent_id == derived_agent_id(socket.gethostname(), TUNNEL)
    log = b"".join(lines).decode()
    assert KEY not in log
    messages = [json.loads(line)["message"] for line in lines]
    assert messages[-2:] == ["session stopped", "agent stopped"]
    assert "relay stopped" in messages


async def test_agent_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    process = await start_agent(
        agent_env(tmp_path), "--control-plane", "127.0.0.1:1", "--tunnel", TUNNEL
    )
    assert process.stderr is not None
    async with asyncio.timeout(30):
        err = await process.stderr.read()
        code = await process.wait()
    assert code == 2
    entry = json.loads(err.splitlines()[-1])
    assert entry["level"] == "error"
    assert "TP_AGENT_KEY" in entry["reason"]
