"""W3C trace context through the standalone gateway: a caller's ``traceparent`` reaches the
upstream unchanged when no exporter is set, and continues as the parent of a CLIENT span
(opentelemetry-instrumentation-grpc) whose own ``traceparent`` reaches it when one is."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway import headers
from gateway.app import Gateway
from gateway.bindings import Catalog, load_descriptor_set
from gateway.forward import ChannelDispatcher
from gateway.serve import HttpServer
from gateway.telemetry import client_interceptors, exporting_to
from tests.gateway.conftest import Running
from tests.gateway.echo_proto import DESCRIPTOR_SET
from tests.gateway.upstream import SERVICE
from tests.processes import ROOT, GatewayProcess

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT}-01"
TRACESTATE = "vendor=opaque,other=x"
SAMPLED = 0x01


async def upstream_saw(http: httpx.AsyncClient, sent: dict[str, str]) -> dict[str, str]:
    """The metadata the echo upstream received for a request with ``sent`` headers."""
    response = await http.post("/v1/headers", json={}, headers=sent)
    assert response.status_code == 200, response.text
    metadata: dict[str, str] = response.json()["received"]
    return metadata


def fields(traceparent: str) -> tuple[str, str, str]:
    """Trace id, parent id and flags of a version-00 ``traceparent``."""
    version, trace_id, parent_id, flags = traceparent.split("-")
    assert version == "00"
    return trace_id, parent_id, flags


# --- without an exporter: passed through as sent ------------------------------------------


async def test_trace_context_reaches_the_upstream_as_sent(gw: Running) -> None:
    saw = await upstream_saw(gw.http, {"traceparent": TRACEPARENT, "tracestate": TRACESTATE})
    assert saw["traceparent"] == TRACEPARENT
    assert saw["tracestate"] == TRACESTATE


async def test_a_later_version_of_traceparent_is_passed_through(gw: Running) -> None:
    later = f"01-{TRACE_ID}-{PARENT}-01-what-comes-next"
    assert (await upstream_saw(gw.http, {"traceparent": later}))["traceparent"] == later


async def test_no_trace_context_is_made_up_without_an_exporter(gw: Running) -> None:
    saw = await upstream_saw(gw.http, {"tracestate": TRACESTATE})
    assert "traceparent" not in saw
    assert "tracestate" not in saw  # it means nothing without its traceparent


@pytest.mark.parametrize(
    "traceparent",
    [
        f"00-{'0' * 32}-{PARENT}-01",  # the all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # the all-zero parent id
        f"ff-{TRACE_ID}-{PARENT}-01",  # a forbidden version
        f"00-{TRACE_ID.upper()}-{PARENT}-01",  # upper-case hex
        f"00-{TRACE_ID}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"01-{TRACE_ID}-{PARENT}-01extra",  # a later version still separates fields
        f"00-{TRACE_ID[:-1]}-{PARENT}-01",
        f"{TRACEPARENT}, 00-{'1' * 32}-{PARENT}-01",  # two of them: which one?
        "not a traceparent",
    ],
)
async def test_a_malformed_traceparent_is_not_forwarded(gw: Running, traceparent: str) -> None:
    saw = await upstream_saw(gw.http, {"traceparent": traceparent, "tracestate": TRACESTATE})
    assert "traceparent" not in saw
    assert "tracestate" not in saw


@given(
    trace_id=st.binary(min_size=16, max_size=16).filter(any),
    parent_id=st.binary(min_size=8, max_size=8).filter(any),
    flags=st.integers(0, 255),
)
def test_every_well_formed_traceparent_and_only_those_become_metadata(
    trace_id: bytes, parent_id: bytes, flags: int
) -> None:
    value = f"00-{trace_id.hex()}-{parent_id.hex()}-{flags:02x}"
    sent = [(b"traceparent", value.encode()), (b"tracestate", TRACESTATE.encode())]
    metadata = headers.inbound(sent, "127.0.0.1").metadata
    assert [(k, v) for k, v in metadata if k.startswith("trace")] == [
        ("traceparent", value),
        ("tracestate", TRACESTATE),
    ]
    if value != value.upper():
        shouted = headers.inbound([(b"traceparent", value.upper().encode())], "127.0.0.1")
        assert all(k != "traceparent" for k, _ in shouted.metadata)


# --- with an exporter: a CLIENT span per upstream call -------------------------------------


@dataclass
class Traced:
    """A standalone gateway whose upstream channel is traced, and the spans it ended."""

    http: httpx.AsyncClient
    spans: InMemorySpanExporter

    def client_spans(self) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.kind == SpanKind.CLIENT]


@pytest_asyncio.fixture(scope="module")
async def traced(echo_upstream: int) -> AsyncIterator[Traced]:
    """The gateway as ``python -m gateway --otel-exporter ...`` builds it, its spans kept
    in memory."""
    spans = InMemorySpanExporter()
    provider = exporting_to(SimpleSpanProcessor(spans), "gateway")
    catalog = Catalog.build(load_descriptor_set(DESCRIPTOR_SET))
    interceptors = client_interceptors(provider)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{echo_upstream}", interceptors=interceptors
    ) as channel:
        app = Gateway(catalog, ChannelDispatcher(channel, traced=True))
        server = HttpServer(app, "127.0.0.1", 0)
        await server.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            yield Traced(client, spans)
        await server.stop()
    provider.shutdown()


async def test_the_client_span_continues_the_callers_trace(traced: Traced) -> None:
    traced.spans.clear()
    saw = await upstream_saw(traced.http, {"traceparent": TRACEPARENT, "tracestate": TRACESTATE})
    trace_id, parent_id, flags = fields(saw["traceparent"])
    (span,) = traced.client_spans()
    assert span.name == f"/{SERVICE}/Headers"
    assert span.attributes is not None
    assert span.attributes["rpc.system"] == "grpc"
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == PARENT
    assert (trace_id, flags) == (TRACE_ID, "01")
    assert parent_id == format(span.context.span_id, "016x")  # the upstream's parent: it
    assert saw["tracestate"] == TRACESTATE


async def test_a_call_without_trace_context_starts_a_trace(traced: Traced) -> None:
    traced.spans.clear()
    saw = await upstream_saw(traced.http, {})
    trace_id, parent_id, flags = fields(saw["traceparent"])
    (span,) = traced.client_spans()
    assert span.parent is None
    assert trace_id == format(span.context.trace_id, "032x")
    assert parent_id == format(span.context.span_id, "016x")
    assert int(flags, 16) & SAMPLED


async def test_an_unsampled_caller_is_not_sampled_here_either(traced: Traced) -> None:
    traced.spans.clear()
    unsampled = f"00-{TRACE_ID}-{PARENT}-00"
    saw = await upstream_saw(traced.http, {"traceparent": unsampled})
    trace_id, _, flags = fields(saw["traceparent"])
    assert (trace_id, flags) == (TRACE_ID, "00")
    assert traced.client_spans() == []


async def test_a_failed_call_and_a_stream_are_spans_too(traced: Traced) -> None:
    traced.spans.clear()
    sent = {"traceparent": TRACEPARENT}
    assert (await traced.http.get("/v1/fail/7", headers=sent)).status_code == 403
    streamed = await traced.http.get("/v1/things:stream", params={"count": 3}, headers=sent)
    assert streamed.status_code == 200
    assert len(streamed.text.splitlines()) == 3
    spans = {s.name: s for s in traced.client_spans()}
    failed, stream = spans[f"/{SERVICE}/Fail"], spans[f"/{SERVICE}/Stream"]
    assert failed.attributes is not None
    assert failed.attributes["rpc.grpc.status_code"] == 7
    assert {format(s.context.trace_id, "032x") for s in (failed, stream)} == {TRACE_ID}


async def test_health_checks_are_not_traced(traced: Traced) -> None:
    traced.spans.clear()
    assert (await traced.http.get("/healthz")).status_code in {200, 503}
    assert traced.client_spans() == []


# --- the command line -------------------------------------------------------------------


@pytest.mark.slow
async def test_python_m_gateway_exports_its_client_spans(echo_upstream: int) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway",
        "--descriptor-set", str(DESCRIPTOR_SET),
        "--upstream", f"127.0.0.1:{echo_upstream}",
        "--port", "0",
        "--otel-exporter", "console",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    gateway = GatewayProcess(process)
    try:
        await gateway.wait_until_listening()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}") as http:
            saw = await upstream_saw(http, {"traceparent": TRACEPARENT})
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    (span,) = [s for s in exported(out.decode()) if s["kind"] == "SpanKind.CLIENT"]
    trace_id, parent_id, _ = fields(saw["traceparent"])
    assert span["name"] == f"/{SERVICE}/Headers"
    assert span["context"]["trace_id"] == f"0x{TRACE_ID}" == f"0x{trace_id}"
    assert span["context"]["span_id"] == f"0x{parent_id}"
    assert span["parent_id"] == f"0x{PARENT}"


async def test_otlp_needs_an_endpoint() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway",
        "--descriptor-set", str(DESCRIPTOR_SET), "--upstream", "127.0.0.1:1", "--port", "0",
        "--otel-exporter", "otlp",
        cwd=ROOT, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"--otel-endpoint" in err


def exported(text: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed: JSON objects, one after another."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (at := _skip_space(text, at)) < len(text):
        span, at = decoder.raw_decode(text, at)
        spans.append(span)
    return spans


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at
