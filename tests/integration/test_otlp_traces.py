"""Traces end to end over OTLP to a real collector endpoint: an OTLP/gRPC receiver in the
test (opentelemetry-proto's TraceService) gets, for one HTTP request, the call's server
span and, under it, the SQL statements it ran (placeholders, never parameters); on
PostgreSQL with Redis, the Redis commands too (command names, never arguments)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import Backend, own_server
from tests.helpers import Client

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def Export(  # noqa: N802 - the proto's name
        self, request: trace_service_pb2.ExportTraceServiceRequest, _context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    """A collector on threads of its own: the server flushes its spans while it stops,
    from the test's event loop, which could not serve them at that moment."""
    found = Collector()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield found, port
    finally:
        server.stop(0)


def attributes(span: Any) -> dict[str, Any]:
    return {a.key: a.value.string_value or a.value.int_value for a in span.attributes}


async def test_one_http_request_is_one_trace_down_to_sql(
    backend: Backend, tmp_path: Path, collector: tuple[Collector, int]
) -> None:
    found, port = collector
    async with own_server(
        backend, tmp_path, otel_exporter="otlp", otel_endpoint=f"127.0.0.1:{port}"
    ) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            user = await Client(app, channel).new_user()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
            answer = await http.get(
                "/v1/users/me",
                headers={
                    "authorization": f"Bearer {user.access_token}",
                    "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
                },
            )
        assert answer.status_code == 200
    # Stopping the server flushed its spans to the collector.
    mine = [s for s in found.spans if s.trace_id.hex() == TRACE_ID]
    (call,) = [s for s in mine if s.name == "tunnelplane.v1.UserService/GetUser"]
    sql = [s for s in mine if s.parent_span_id == call.span_id and "db.system" in attributes(s)]
    assert sql, [s.name for s in mine]
    for span in sql:
        statement = str(attributes(span).get("db.statement", ""))
        assert user.email not in statement
        assert user.id not in statement
    if backend.name == "postgres":
        commands = [
            attributes(s)
            for s in mine
            if s.parent_span_id == call.span_id and attributes(s).get("db.system") == "redis"
        ]
        assert commands, [s.name for s in mine]
        assert all(" " not in str(c.get("db.statement", "")).replace(" ?", "") for c in commands)
