"""The agent's control link traced (``--otel-exporter``): the Connect stream is a CLIENT
span whose ``traceparent`` the control plane receives; without an exporter none is sent."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from agent import telemetry
from agent.session import Session
from tests.agent.fakes import EchoServer, FakeControlPlane, connect, desired, next_item, round_trip
from tests.agent.test_process import KEY, ROOT, agent_env
from tests.agent.test_session import KEY as SESSION_KEY
from tests.agent.test_session import settings_for

CONNECT = "/tunnelplane.v1.AgentService/Connect"


async def test_connect_carries_the_traceparent_of_its_client_span(
    plane: FakeControlPlane, echo: EchoServer
) -> None:
    spans = InMemorySpanExporter()
    provider = telemetry.exporting_to(SimpleSpanProcessor(spans))
    plane.push(desired(1, target=echo.address))
    session = Session(settings_for(plane), interceptors=telemetry.client_interceptors(provider))
    task = asyncio.create_task(session.run())
    try:
        metadata = await next_item(plane.metadata)
        await session.wait_applied(1)
        relay = session.controller.relay
        assert relay is not None
        async with connect(relay.port) as (reader, writer):  # the stream works both ways
            assert await round_trip(reader, writer, b"traced") == b"traced"
        assert (await next_item(plane.reports)).sequence == 1
    finally:
        session.stop()
        async with asyncio.timeout(10):
            await task
    (span,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT]
    _, trace_id, span_id, flags = metadata["traceparent"].split("-")
    assert span.name == CONNECT
    assert trace_id == format(span.context.trace_id, "032x")
    assert span_id == format(span.context.span_id, "016x")
    assert int(flags, 16) & 0x01  # sampled: the control plane may record its side too
    assert metadata["authorization"] == f"Bearer {SESSION_KEY}"  # the rest goes too


async def test_without_an_exporter_no_trace_context_is_sent(plane: FakeControlPlane) -> None:
    session = Session(settings_for(plane))
    task = asyncio.create_task(session.run())
    try:
        metadata = await next_item(plane.metadata)
    finally:
        session.stop()
        async with asyncio.timeout(10):
            await task
    assert "traceparent" not in metadata
    assert telemetry.client_interceptors(telemetry.tracer_provider("none", "")) == []


async def test_otlp_without_an_endpoint_is_a_usage_error(tmp_path: Path) -> None:
    args = ["--control-plane", "127.0.0.1:1", "--tunnel", "users/u/tunnels/t"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, "--otel-exporter", "otlp",
        cwd=ROOT, env=agent_env(tmp_path, TP_AGENT_KEY=KEY),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    entry = json.loads(err.splitlines()[-1])
    assert entry["message"] == "cannot start"
    assert "--otel-endpoint" in entry["reason"]
