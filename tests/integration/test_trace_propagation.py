"""One trace id from the caller to the server's log lines, whichever way the call arrives:
an HTTP ``traceparent`` through the embedded gateway or the standalone one (with and
without an exporter of its own), and the reference agent's Connect stream when the agent
exports spans."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
from tunnelplane.v1 import tunnels_pb2

from tests.helpers import Client
from tests.processes import ROOT, ServerProcess, child_env, gateway_serving, run_cli, serving

pytestmark = pytest.mark.slow
DESCRIPTORS = ROOT / "generated" / "tunnelplane" / "descriptors.binpb"
CONNECT = "/tunnelplane.v1.AgentService/Connect"


def traceparent(trace_id: str) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}


async def next_call(server: ServerProcess, method_suffix: str = "") -> dict[str, Any]:
    """The server's next access-log line (of a method ending with ``method_suffix``)."""
    async with asyncio.timeout(30):
        while True:
            entry = await server.next_log_entry()
            if entry.get("message") == "call" and str(entry["method"]).endswith(method_suffix):
                return entry


async def test_an_http_callers_trace_id_is_the_servers(tmp_path: Path) -> None:
    async with serving(child_env(tmp_path)) as server:
        http_port = next(int(e["http_port"]) for e in server.log if e.get("message") == "serving")  # type: ignore[call-overload]
        async with (
            gateway_serving(DESCRIPTORS, server.grpc_port) as plain,
            gateway_serving(DESCRIPTORS, server.grpc_port, "--otel-exporter", "console") as traced,
        ):
            for port, trace_id, transport in (
                (http_port, "1" * 32, "http"),  # the embedded gateway
                (plain.port, "2" * 32, "grpc"),  # standalone, passed through
                (traced.port, "3" * 32, "grpc"),  # standalone, its client span's child
            ):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    response = await http.get("/v1/users/me", headers=traceparent(trace_id))
                assert response.status_code == 401
                call = await next_call(server)
                assert (call["trace_id"], call["transport"]) == (trace_id, transport)


async def test_the_agents_connect_carries_its_trace_to_the_server(tmp_path: Path) -> None:
    env = child_env(tmp_path)
    assert run_cli("migrate", env=env).returncode == 0
    async with serving(env) as server:
        key, tunnel = await agent_key_and_tunnel(server.grpc_port)
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent",
            "--control-plane", f"127.0.0.1:{server.grpc_port}", "--tunnel", tunnel,
            "--agent-id", "traced", "--target", "127.0.0.1:9", "--otel-exporter", "console",
            cwd=ROOT, env=child_env(tmp_path / "agent", TP_AGENT_KEY=key),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await logged(agent, "connected")
        finally:
            agent.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(agent.communicate(), 30)
        call = await next_call(server, "Connect")
    assert agent.returncode == 0
    (span,) = [s for s in exported(out.decode()) if s["name"] == CONNECT]
    assert span["kind"] == "SpanKind.CLIENT"
    assert span["context"]["trace_id"] == f"0x{call['trace_id']}"


async def agent_key_and_tunnel(grpc_port: int) -> tuple[str, str]:
    """A new user's agent key and tunnel, on the server at ``grpc_port``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        client = Client(cast(Any, None), channel)  # no App: only the calls over the wire
        owner = await client.new_user()
        made = await client.tunnel(
            owner, endpoints=[tunnels_pb2.TunnelEndpoint(url="tcp://127.0.0.1:9")]
        )
        return await client.api_key(owner, ["agent.connect"]), made.name


async def logged(process: asyncio.subprocess.Process, message: str) -> dict[str, Any]:
    """Read the agent's JSON log until an entry with ``message``."""
    assert process.stderr is not None
    async with asyncio.timeout(30):
        while line := await process.stderr.readline():
            entry: dict[str, Any] = json.loads(line)
            if entry["message"] == message:
                return entry
    raise AssertionError(f"the agent exited before logging {message!r}")


def exported(text: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed: JSON objects, one after another."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while True:
        at = len(text) - len(text[at:].lstrip())
        if at == len(text):
            return spans
        span, at = decoder.raw_decode(text, at)
        spans.append(span)
