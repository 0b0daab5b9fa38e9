"""Structured logging: one JSON object per line, with request and trace ids from context."""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson

from server.redaction import redact

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
trace_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="")
#: Which process of a group (``TP_WORKERS``) writes: set once by :func:`configure`, before
#: the event loop starts, so that every task inherits it; empty for a single process.
process_var: contextvars.ContextVar[tuple[tuple[str, object], ...]] = contextvars.ContextVar(
    "process", default=()
)

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class _Clock:
    """RFC 3339 UTC timestamps with milliseconds; the seconds part is formatted once."""

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}+00:00"


def _entry(stamp: str, level: str, logger: str, message: str) -> dict[str, Any]:
    """The fields every JSON line starts with, including the ids bound to this call."""
    entry: dict[str, Any] = {"time": stamp, "level": level, "logger": logger, "message": message}
    entry.update(process_var.get())
    request_id = request_id_var.get()
    if request_id:
        entry["request_id"] = request_id
    trace_id = trace_id_var.get()
    if trace_id:
        entry["trace_id"] = trace_id
    return entry


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; fields passed with ``extra`` are kept."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        entry = _entry(
            self._clock.stamp(record.created),
            record.levelname.lower(),
            record.name,
            record.getMessage(),
        )
        fields = record.__dict__
        for key in fields.keys() - _STANDARD:
            if not key.startswith("_"):
                entry[key] = fields[key]
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


class _TextFormatter(logging.Formatter):
    """The text format, with tracebacks redacted as in JSON."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return redact(super().formatException(ei))


class AccessLog:
    """The per-call access log line.

    In JSON format it writes the line straight to stderr, skipping the record, handler
    and formatter machinery of :mod:`logging` (the dearest part of the pipeline when
    measured); the level of the ``tunnelplane.access`` logger still decides whether
    anything is written. In text format it goes through that logger.
    """

    def __init__(self, logger: logging.Logger, *, json_lines: bool, stream: Any = None) -> None:
        self._logger = logger
        self._json = json_lines
        self._stream = stream if stream is not None else sys.stderr
        self._clock = _Clock()

    def enabled(self) -> bool:
        """Whether lines are written at the current level."""
        return self._logger.isEnabledFor(logging.INFO)

    def write(self, fields: dict[str, Any]) -> None:
        """Write one line with ``fields`` and the current request and trace ids."""
        if not self._json:
            self._logger.info("call", extra=fields)
            return
        entry = _entry(self._clock.stamp(time.time()), "info", self._logger.name, "call")
        entry.update(fields)
        # stderr is line-buffered (Python 3.9+), so each line leaves in one write.
        self._stream.write(orjson.dumps(entry).decode() + "\n")


def configure(level: str, fmt: str, process: Mapping[str, object] | None = None) -> None:
    """Send every log record to stderr as JSON (or plain text for ``fmt='text'``).

    ``process`` names the process of a group that writes (``{"worker": 1, "pid": 4242}``):
    its fields go into every line written from this context on (call it before the event
    loop starts).
    """
    fields = tuple((process or {}).items())
    process_var.set(fields)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tag = "".join(f"{key}={value} " for key, value in fields)
        handler.setFormatter(_TextFormatter(f"%(asctime)s %(levelname)s {tag}%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
