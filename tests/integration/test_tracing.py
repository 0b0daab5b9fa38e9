"""OpenTelemetry: one SERVER span per call, continuing the caller's traceparent."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import httpx
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from tunnelplane.v1 import users_pb2, users_pb2_grpc

from server.app import App
from tests.conftest import make_settings, migrate
from tests.helpers import Client, fails
from tests.processes import child_env, serving

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def test_spans_carry_rpc_attributes_and_the_callers_trace(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await migrate(url)
    server = App(make_settings(tmp_path, database_url=url, otel_exporter="console"))
    exporter = InMemorySpanExporter()
    server.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            client = Client(server, channel)
            traceparent = (("traceparent", f"00-{TRACE_ID}-{PARENT}-01"),)
            await fails(
                client.users.GetUser(
                    users_pb2.GetUserRequest(name="users/me"), metadata=traceparent
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
            await client.register()
    finally:
        await server.stop(grace=0)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    get_user = spans["tunnelplane.v1.UserService/GetUser"]
    assert get_user.kind == SpanKind.SERVER
    assert format(get_user.context.trace_id, "032x") == TRACE_ID
    assert get_user.parent is not None
    assert format(get_user.parent.span_id, "016x") == PARENT
    assert get_user.attributes["rpc.system"] == "grpc"
    assert get_user.attributes["rpc.grpc.status_code"] == 16
    register = spans["tunnelplane.v1.AuthService/Register"]
    assert register.attributes["rpc.grpc.status_code"] == 0
    assert register.parent is None


async def test_every_log_line_of_a_call_carries_a_trace_id_with_default_settings(
    tmp_path: Path,
) -> None:
    """No exporter configured (the default): a caller's traceparent still names the trace
    in the logs, and a call without one gets a trace id of its own, over both transports."""
    env = child_env(tmp_path)
    assert "TP_OTEL_EXPORTER" not in env
    async with serving(env) as server:
        http_port = next(int(e["http_port"]) for e in server.log if e.get("message") == "serving")  # type: ignore[call-overload]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            users = users_pb2_grpc.UserServiceStub(channel)
            traced = (("traceparent", f"00-{TRACE_ID}-{PARENT}-01"),)
            for metadata in (traced, ()):
                await fails(
                    users.GetUser(users_pb2.GetUserRequest(name="users/me"), metadata=metadata),
                    grpc.StatusCode.UNAUTHENTICATED,
                )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
            assert (await http.get("/v1/users/me")).status_code == 401
        calls: list[dict[str, object]] = []
        async with asyncio.timeout(10):
            while len(calls) < 3:
                entry = await server.next_log_entry()
                if entry.get("message") == "call":
                    calls.append(entry)
    assert [c["transport"] for c in calls] == ["grpc", "grpc", "http"]
    assert calls[0]["trace_id"] == TRACE_ID
    made = [str(c["trace_id"]) for c in calls[1:]]
    assert all(re.fullmatch("[0-9a-f]{32}", t) and t != "0" * 32 for t in made), made
    assert len({TRACE_ID, *made}) == 3, "each call its own trace"
    assert all(c["request_id"] for c in calls)
