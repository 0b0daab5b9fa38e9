"""Server streaming (TRANSCODING.md "Streaming"): newline-delimited JSON, one message per
line and per write; a failure after the first message as a last ``{"error": ...}`` line, a
failure before it as the mapped HTTP status; Server-Sent Events on request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import grpc
import orjson
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import streaming
from gateway.app import GatewayOptions
from tests.gateway.conftest import Running, running
from tests.gateway.echo_proto import echo_pb2
from tests.gateway.upstream import SERVICE
from tests.helpers import sse_blocks

FAIL_DETAILS = [
    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "TEST_REASON",
     "domain": "echo.test"},
    {"@type": "type.googleapis.com/google.rpc.BadRequest",
     "fieldViolations": [{"field": "code"}]},
]  # fmt: skip
SSE_HEADERS = {"Accept": "text/event-stream"}


def thing(i: int) -> dict[str, Any]:
    """The i-th message of the upstream's Stream, zero values emitted."""
    return {"name": f"things/{i}", "tags": [], "note": "", "size": str(i)}


async def ndjson_lines(gw: Running, query: str) -> tuple[int, dict[str, str], list[Any]]:
    """Status, headers and the parsed lines of GET /v1/things:stream?<query>, read as a
    stream line by line."""
    async with gw.http.stream("GET", f"/v1/things:stream?{query}") as response:
        lines = [orjson.loads(line) async for line in response.aiter_lines() if line]
        return response.status_code, dict(response.headers), lines


async def sse_events(gw: Running, query: str) -> tuple[int, dict[str, str], list[str]]:
    """Status, headers and the raw events (blank-line separated) of an SSE stream."""
    async with gw.http.stream("GET", f"/v1/things:stream?{query}", headers=SSE_HEADERS) as response:
        text = (await response.aread()).decode()
        return response.status_code, dict(response.headers), text.split("\n\n")


# --- NDJSON -----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 3, 25])
async def test_ndjson_one_result_line_per_message(gw: Running, count: int) -> None:
    status, headers, lines = await ndjson_lines(gw, f"count={count}")
    assert status == 200
    assert headers["content-type"] == "application/x-ndjson"
    assert headers["cache-control"] == "no-cache"
    assert lines == [{"result": thing(i)} for i in range(count)]


async def test_ndjson_zero_values_follow_the_setting(strict_gw: Running) -> None:
    status, _, lines = await ndjson_lines(strict_gw, "count=2")
    assert status == 200
    assert lines == [
        {"result": {"name": "things/0"}},
        {"result": {"name": "things/1", "size": "1"}},
    ]


@pytest.mark.parametrize(("count", "code"), [(1, 9), (3, 14), (2, 16)])
async def test_ndjson_error_after_first_message_is_the_last_line(
    gw: Running, count: int, code: int
) -> None:
    async with gw.http.stream(
        "GET",
        f"/v1/things:stream?count={count}&fail_code={code}",
        headers={"X-Request-Id": "stream-1"},
    ) as response:
        raw = await response.aread()
        status = response.status_code
    assert status == 200  # the status line went out with the first message
    assert raw.endswith(b"\n")
    lines = [orjson.loads(line) for line in raw.splitlines()]
    assert lines[:-1] == [{"result": thing(i)} for i in range(count)]
    assert lines[-1] == {
        "error": {
            "code": code,
            "message": "stream failed",
            "details": FAIL_DETAILS,
            "requestId": "stream-1",
        }
    }


@pytest.mark.parametrize(("code", "status"), [(5, 404), (9, 400), (14, 503), (16, 401)])
@pytest.mark.parametrize("accept", [{}, SSE_HEADERS])
async def test_error_before_first_message_gets_the_http_status(
    gw: Running, code: int, status: int, accept: dict[str, str]
) -> None:
    response = await gw.http.get(f"/v1/things:stream?count=0&fail_code={code}", headers=accept)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "code": code,
        "message": "stream failed",
        "details": FAIL_DETAILS,
        "requestId": response.headers["x-request-id"],
    }
    assert response.headers["retry-after"] == "7"  # allowlisted trailer, as for unary calls


async def test_error_before_first_message_forwards_trailers_on_request(gw: Running) -> None:
    url = "/v1/things:stream?count=0&fail_code=14"
    assert "grpc-trailer-retry-after" not in (await gw.http.get(url)).headers
    response = await gw.http.get(url, headers={"TE": "trailers"})
    assert response.status_code == 503
    assert response.headers["grpc-trailer-retry-after"] == "7"


async def test_stream_request_that_does_not_parse_is_400(gw: Running) -> None:
    response = await gw.http.get("/v1/things:stream?count=many")
    assert response.status_code == 400
    assert response.json()["details"][1]["fieldViolations"][0]["field"] == "count"


# --- One write per message (flushed) ----------------------------------------------------


async def test_each_message_is_its_own_write(gw: Running) -> None:
    """Called as ASGI directly: every message leaves the app in its own body event, which
    the server writes out at once; the error line, too, is its own last event."""
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/things:stream",
        "raw_path": b"/v1/things:stream",
        "query_string": b"count=3&fail_code=10",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 5000),
        "scheme": "http",
    }
    await gw.gateway(scope, receive, send)
    start, *bodies = sent
    assert (start["type"], start["status"]) == ("http.response.start", 200)
    assert [b.get("more_body", False) for b in bodies] == [True, True, True, True, False]
    frames = [b["body"] for b in bodies]
    assert frames[-1] == b""
    for i, frame in enumerate(frames[:3]):
        assert frame.count(b"\n") == 1
        assert orjson.loads(frame) == {"result": thing(i)}
    assert orjson.loads(frames[3])["error"]["code"] == 10


# --- Server-Sent Events -----------------------------------------------------------------


async def test_sse_one_data_event_per_message(gw: Running) -> None:
    status, headers, events = await sse_events(gw, "count=3")
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert events[-1] == ""  # the stream ends with a complete event
    for i, event in enumerate(events[:-1]):
        assert event.startswith("data: ")
        assert "\n" not in event
        assert orjson.loads(event[len("data: ") :]) == {"result": thing(i)}
    assert len(events) == 4


async def test_sse_error_event_after_first_message(gw: Running) -> None:
    status, _, events = await sse_events(gw, "count=2&fail_code=8")
    assert status == 200
    assert [e.split(" ", 1)[0] for e in events[:2]] == ["data:", "data:"]
    kind, data = events[2].split("\n")
    assert kind == "event: error"
    assert data.startswith("data: ")
    error = orjson.loads(data[len("data: ") :])["error"]
    assert (error["code"], error["message"]) == (8, "stream failed")
    assert events[3:] == [""]


async def test_sse_with_no_messages_is_empty(gw: Running) -> None:
    status, headers, events = await sse_events(gw, "count=0")
    assert (status, headers["content-type"], events) == (200, "text/event-stream", [""])


# --- Unit: framing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "sse"),
    [
        ("text/event-stream", True),
        ("Text/Event-Stream", True),
        ("application/json, text/event-stream;q=0.9", True),
        ("application/json", False),
        ("*/*", False),
        ("", False),
        ("application/x-ndjson", False),
    ],
)
def test_wants_sse(accept: str, sse: bool) -> None:
    assert streaming.wants_sse(accept) is sse


@pytest.mark.parametrize(
    ("function", "sse", "expected"),
    [
        (streaming.result_frame, False, b'{"result":{"a":1}}\n'),
        (streaming.result_frame, True, b'data: {"result":{"a":1}}\n\n'),
        (streaming.error_frame, False, b'{"error":{"a":1}}\n'),
        (streaming.error_frame, True, b'event: error\ndata: {"error":{"a":1}}\n\n'),
    ],
)
def test_frames(function: Any, sse: bool, expected: bytes) -> None:
    assert function(b'{"a":1}', sse=sse) == expected


@pytest.mark.parametrize(
    "document", [{}, {"s": "line\nbreak"}, {"n": [1, 2, {"x": None}]}, ["a"], "text", 5]
)
def test_frames_carry_any_compact_json_on_one_line(document: Any) -> None:
    payload = orjson.dumps(document)
    line = streaming.result_frame(payload, sse=False)
    assert line.count(b"\n") == 1
    assert orjson.loads(line) == {"result": document}
    event = streaming.result_frame(payload, sse=True)
    assert event.endswith(b"\n\n")
    assert event.count(b"\n") == 2
    assert orjson.loads(event.removeprefix(b"data: ")) == {"result": document}


# --- Long streams: no default deadline, keep-alives, event ids, resume -----------------


class SlowStream:
    """An upstream whose Stream sends one message, waits until the test releases it, then
    sends a second saying what deadline it ran under, and ends."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def stream(self, _request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """EchoService.Stream."""
        metadata = dict(context.invocation_metadata() or ())
        resume = metadata.get("grpcgateway-last-event-id", "")
        yield echo_pb2.Thing(name="things/0", note=f"last-event-id={resume}")
        await self.release.wait()
        yield echo_pb2.Thing(name="things/1", note=f"deadline={context.time_remaining()}")


@pytest_asyncio.fixture
async def slow() -> AsyncIterator[tuple[SlowStream, Running]]:
    """A gateway with a short default deadline and fast keep-alives, in front of a
    :class:`SlowStream` upstream."""
    servicer = SlowStream()
    handler = grpc.unary_stream_rpc_method_handler(
        servicer.stream,
        request_deserializer=echo_pb2.StreamRequest.FromString,
        response_serializer=echo_pb2.Thing.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Stream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    options = GatewayOptions(default_timeout=0.3, sse_keepalive=0.05, sse_id_field="name")
    try:
        async for running_gateway in running(port, options):
            yield servicer, running_gateway
    finally:
        await server.stop(0)


async def test_a_stream_outlives_the_default_deadline_and_gets_keepalives(
    slow: tuple[SlowStream, Running],
) -> None:
    servicer, gw = slow
    loop = asyncio.get_running_loop()
    async with gw.http.stream("GET", "/v1/things:stream", headers=SSE_HEADERS) as response:
        assert response.status_code == 200
        events = sse_blocks(response)
        first = await anext(events)
        assert first.splitlines()[0] == "id: things/0"
        started = loop.time()
        keepalives = 0
        while loop.time() - started < 1.0:  # well past the 0.3 s default deadline
            assert await anext(events) == ": keep-alive"
            keepalives += 1
        servicer.release.set()
        second = await anext(events)
        rest = [block async for block in events]
    assert keepalives >= 5
    id_line, data = second.splitlines()
    assert id_line == "id: things/1"
    assert orjson.loads(data.removeprefix("data: "))["result"]["note"] == "deadline=None"
    assert rest == []  # ended cleanly: no error event


async def test_ndjson_gets_no_keepalive_lines_and_no_deadline(
    slow: tuple[SlowStream, Running],
) -> None:
    servicer, gw = slow
    async with gw.http.stream("GET", "/v1/things:stream") as response:
        lines = response.aiter_lines()
        assert orjson.loads(await anext(lines))["result"]["name"] == "things/0"
        waiting = asyncio.ensure_future(anext(lines))
        done, _ = await asyncio.wait({waiting}, timeout=0.6)  # twice the default deadline
        assert not done  # nothing: no keep-alive line, and no deadline error
        servicer.release.set()
        assert orjson.loads(await waiting)["result"]["note"] == "deadline=None"


async def test_a_client_deadline_still_applies_to_a_stream(
    slow: tuple[SlowStream, Running],
) -> None:
    _, gw = slow
    headers = {**SSE_HEADERS, "Grpc-Timeout": "200m"}
    async with gw.http.stream("GET", "/v1/things:stream", headers=headers) as response:
        blocks = [block async for block in sse_blocks(response)]
    assert blocks[0].startswith("id: things/0\n")
    error = blocks[-1].split("\n")
    assert error[0] == "event: error"
    assert orjson.loads(error[1].removeprefix("data: "))["error"]["code"] == 4


async def test_last_event_id_reaches_the_upstream(slow: tuple[SlowStream, Running]) -> None:
    _, gw = slow
    headers = {**SSE_HEADERS, "Last-Event-ID": "evt_42"}
    async with gw.http.stream("GET", "/v1/things:stream", headers=headers) as response:
        first = await anext(sse_blocks(response))
    data = orjson.loads(first.splitlines()[1].removeprefix("data: "))
    assert data["result"]["note"] == "last-event-id=evt_42"


async def test_the_gateway_says_how_the_client_reached_it(gw: Running) -> None:
    """``x-forwarded-proto`` is the gateway's to set: an upstream that declares it a
    TLS-terminating proxy believes it, so a client may not forge it."""
    forged = {"Grpc-Metadata-X-Forwarded-Proto": "https"}
    response = await gw.http.post("/v1/headers", json={}, headers=forged)
    assert response.json()["received"]["x-forwarded-proto"] == "http"


# --- Unit: ids and pacing ---------------------------------------------------------------


def test_sse_frame_carries_the_event_id() -> None:
    frame = streaming.result_frame(b"{}", sse=True, event_id="evt_1")
    assert frame == b'id: evt_1\ndata: {"result":{}}\n\n'
    assert streaming.result_frame(b"{}", sse=False, event_id="evt_1") == b'{"result":{}}\n'


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("name", "things/1", "things/1"),
        ("name", "", ""),
        ("name", "two\nlines", ""),  # could not be one SSE line: no id rather than a bad one
        ("name", "cr\rhere", ""),
        ("note", "n", "n"),
        ("size", "", ""),  # not a string field
        ("tags", "", ""),  # repeated
        ("missing", "", ""),
        ("", "", ""),  # turned off
    ],
)
def test_event_id_comes_from_a_top_level_string_field(
    field: str, value: str, expected: str
) -> None:
    message = echo_pb2.Thing(size=3, tags=["a"])
    if field in {"name", "note"}:
        setattr(message, field, value)
    found = streaming.id_field(echo_pb2.Thing.DESCRIPTOR, field)
    assert streaming.event_id(message, found) == expected


@given(st.lists(st.integers(), max_size=20))
@settings(max_examples=30, deadline=None)
def test_pacing_adds_ticks_and_nothing_else(items: list[int]) -> None:
    """With ticks filtered out, a paced stream is the stream itself."""

    async def source() -> AsyncIterator[int]:
        for item in items:
            yield item

    async def collect() -> list[int | None]:
        return [x async for x in streaming.paced(source(), 0.001)]

    assert [x for x in asyncio.run(collect()) if x is not None] == items


async def test_pacing_ticks_while_the_stream_is_idle() -> None:
    gate = asyncio.Event()

    async def source() -> AsyncIterator[str]:
        yield "a"
        await gate.wait()
        yield "b"

    paced = streaming.paced(source(), 0.01)
    assert await anext(paced) == "a"
    assert await anext(paced) is None
    assert await anext(paced) is None
    gate.set()
    rest = [x async for x in paced]
    assert rest[-1] == "b"
    assert set(rest[:-1]) <= {None}
