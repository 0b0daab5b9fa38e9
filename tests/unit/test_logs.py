"""JSON log lines carry the call's request and trace ids, on both writers."""

from __future__ import annotations

import io
import json
import logging

from server.logs import AccessLog, JsonFormatter, request_id_var, trace_id_var


def test_formatter_and_access_log_write_the_same_shape() -> None:
    request_token = request_id_var.set("req-1")
    trace_token = trace_id_var.set("ab" * 16)
    try:
        record = logging.LogRecord(
            "tunnelplane.x", logging.WARNING, __file__, 1, "hi %s", ("you",), None
        )
        record.method = "/pkg.Svc/M"
        formatted = json.loads(JsonFormatter().format(record))
        stream = io.StringIO()
        access = AccessLog(
            logging.getLogger("tunnelplane.access.test"), json_lines=True, stream=stream
        )
        access.write({"method": "/pkg.Svc/M", "code": "OK"})
        written = json.loads(stream.getvalue())
    finally:
        request_id_var.reset(request_token)
        trace_id_var.reset(trace_token)
    assert formatted["message"] == "hi you"
    assert formatted["level"] == "warning"
    assert formatted["method"] == "/pkg.Svc/M"
    assert written["message"] == "call"
    assert written["code"] == "OK"
    for entry in (formatted, written):
        assert entry["request_id"] == "req-1"
        assert entry["trace_id"] == "ab" * 16
        assert entry["time"].endswith("+00:00")
    assert stream.getvalue().count("\n") == 1


def test_ids_are_left_out_outside_a_call() -> None:
    stream = io.StringIO()
    AccessLog(logging.getLogger("t"), json_lines=True, stream=stream).write({"code": "OK"})
    entry = json.loads(stream.getvalue())
    assert "request_id" not in entry
    assert "trace_id" not in entry


def test_a_logged_traceback_is_redacted() -> None:
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1c3IifQ.c2ln"
    error = RuntimeError(f"refused Bearer {token} for someone@example.com")
    record = logging.LogRecord(
        "tunnelplane.server", logging.ERROR, __file__, 1, "unhandled error", None,
        (RuntimeError, error, None),
    )  # fmt: skip
    line = JsonFormatter().format(record)
    assert token not in line
    assert "someone@example.com" not in line
    assert "Bearer [Filtered]" in json.loads(line)["exception"]
