"""Framing of server-streaming responses: newline-delimited JSON or Server-Sent Events.

NDJSON: one ``{"result": ...}`` line per message; an error after the first message is a
last line ``{"error": <Status>}``. SSE (``Accept: text/event-stream``): one ``data:`` event
per message, and an ``event: error`` for a failure.
"""

from __future__ import annotations

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


def wants_sse(accept: str) -> bool:
    """Whether the client asked for Server-Sent Events."""
    return SSE in accept.lower()


def result_frame(document: bytes, *, sse: bool) -> bytes:
    """One message of the stream."""
    if sse:
        return b"data: " + b'{"result":' + document + b"}\n\n"
    return b'{"result":' + document + b"}\n"


def error_frame(status_document: bytes, *, sse: bool) -> bytes:
    """The failure that ends the stream after it started."""
    if sse:
        return b"event: error\ndata: " + b'{"error":' + status_document + b"}\n\n"
    return b'{"error":' + status_document + b"}\n"
