"""ASGI plumbing: what a response is, reading a bounded request body, sending a response
(gzip for large compressible bodies; a stream stops when its client goes away), lifespan."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import GatewayError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
JSON = b"application/json"
COMPRESSIBLE = (b"application/json", b"text/", b"application/javascript")


@dataclass(slots=True)
class Response:
    """What to send, before the common headers are added."""

    status: int
    body: bytes = b""
    content_type: bytes = JSON
    headers: Headers = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None
    route: str = "unmatched"


def header(scope: Scope, name: bytes) -> str:
    """The first value of the request header ``name`` (lower case), or ""."""
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return ""


async def read_body(receive: Receive, scope: Scope, limit: int) -> bytes:
    """The whole request body; 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = header(scope, b"content-length")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise GatewayError.simple(1, "client went away", "CANCELLED", 499)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return GatewayError.simple(
        3, f"request body is larger than {limit} bytes", "BODY_TOO_LARGE", 413
    )


async def send_response(
    send: Send,
    receive: Receive,
    response: Response,
    headers: Headers,
    *,
    accept_encoding: str,
    gzip_min_bytes: int,
) -> None:
    """Send ``response`` with ``headers`` (its own included); a body of at least
    ``gzip_min_bytes`` of a text type is gzipped for a client that accepts it."""
    if response.stream is not None:
        await _send_stream(send, receive, response, headers)
        return
    body = response.body
    if (
        len(body) >= gzip_min_bytes
        and "gzip" in accept_encoding
        and response.content_type.startswith(COMPRESSIBLE)
    ):
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
        body = compressor.compress(body) + compressor.flush()
        headers += [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_stream(send: Send, receive: Receive, response: Response, headers: Headers) -> None:
    """Send a stream as it comes; stop it (the upstream call is cancelled) when the client
    goes away, which the server reports on ``receive``, not by failing ``send``."""
    stream = response.stream
    assert stream is not None
    headers.append((b"cache-control", b"no-cache"))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})

    async def pump() -> None:
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    pumping = asyncio.create_task(pump())
    watching = asyncio.create_task(_disconnected(receive))
    try:
        await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, watching):
            task.cancel()
        await asyncio.gather(pumping, watching, return_exceptions=True)
        if hasattr(stream, "aclose"):
            await stream.aclose()
    if pumping.done() and not pumping.cancelled():
        pumping.result()  # a failure while sending is the caller's to see


async def _disconnected(receive: Receive) -> None:
    """Return when the client goes away. After the request body, ``receive`` blocks until
    then; a server whose ``receive`` keeps answering instead cannot tell us, so stop asking."""
    finished = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if not message.get("more_body"):
            finished += 1
            if finished > 1:
                await asyncio.Future()  # never: the stream's own end decides


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer the lifespan protocol: nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
