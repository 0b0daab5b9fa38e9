"""Server streaming (TRANSCODING.md "Streaming"): newline-delimited JSON, one message per
line and per write; a failure after the first message as a last ``{"error": ...}`` line, a
failure before it as the mapped HTTP status; Server-Sent Events on request."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import orjson
import pytest

from gateway import streaming
from tests.gateway.conftest import Running

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
