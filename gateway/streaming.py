"""Framing of server-streaming responses: newline-delimited JSON or Server-Sent Events.

NDJSON: one ``{"result": ...}`` line per message; an error after the first message is a
last line ``{"error": <Status>}``. SSE (``Accept: text/event-stream``): one ``data:`` event
per message, and an ``event: error`` for a failure. An SSE event carries ``id:`` when the
message has a non-empty string field of the configured name (``event_id`` by default),
so that a reconnecting ``EventSource`` sends it back as ``Last-Event-ID``; an idle SSE
stream gets a ``: keep-alive`` comment every so often, so that proxies keep it open.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
KEEPALIVE = b": keep-alive\n\n"

T = TypeVar("T")


def wants_sse(accept: str) -> bool:
    """Whether the client asked for Server-Sent Events."""
    return SSE in accept.lower()


def result_frame(document: bytes, *, sse: bool, event_id: str = "") -> bytes:
    """One message of the stream (with its SSE ``id:`` if it has one)."""
    if sse:
        head = b"id: " + event_id.encode() + b"\n" if event_id else b""
        return head + b"data: " + b'{"result":' + document + b"}\n\n"
    return b'{"result":' + document + b"}\n"


def error_frame(status_document: bytes, *, sse: bool) -> bytes:
    """The failure that ends the stream after it started."""
    if sse:
        return b"event: error\ndata: " + b'{"error":' + status_document + b"}\n\n"
    return b'{"error":' + status_document + b"}\n"


def id_field(message: Any, name: str) -> FieldDescriptor | None:
    """The top-level string field ``name`` of ``message`` that holds event ids, if any."""
    field: FieldDescriptor | None = message.fields_by_name.get(name) if name else None
    if field is None or field.type != FieldDescriptor.TYPE_STRING or field.is_repeated:
        return None
    return field


def event_id(message: Message, field: FieldDescriptor | None) -> str:
    """The message's event id ('' if none, or if it could not be one SSE line)."""
    if field is None:
        return ""
    value = str(getattr(message, field.name))
    if any(c in value for c in "\r\n\0"):
        return ""
    return value


async def paced(items: AsyncIterator[T], every: float | None) -> AsyncGenerator[T | None, None]:
    """``items``, with a ``None`` each time ``every`` seconds pass without one.

    The next item is awaited in a task of its own that a tick does not cancel, so the
    stream underneath never notices the ticks. Closing the result closes ``items`` too
    (at once, not when it is garbage collected: a stream's call ends with it).
    """

    async def following() -> tuple[T] | None:
        try:
            return (await anext(items),)
        except StopAsyncIteration:
            return None

    pending: asyncio.Task[tuple[T] | None] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.create_task(following())
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            got, pending = pending.result(), None
            if got is None:
                return
            yield got[0]
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
        closing = getattr(items, "aclose", None)
        if closing is not None:
            await closing()
