"""OpenTelemetry: one SERVER span per call, continuing the caller's traceparent."""

from __future__ import annotations

from pathlib import Path

import grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from tunnelplane.v1 import users_pb2

from server.app import App
from tests.conftest import make_settings, migrate
from tests.helpers import Client, fails

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
