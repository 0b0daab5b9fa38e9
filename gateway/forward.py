"""Dispatching a transcoded call: the protocol, and the grpc.aio channel implementation.

The gateway only needs a :class:`Dispatcher`. Standalone, :class:`ChannelDispatcher`
forwards over a grpc.aio channel to any server. Embedded in Tunnelplane, the server
provides one that runs the call through its own pipeline in-process (no loopback hop).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2

from gateway.bindings import Binding
from gateway.errors import status_from_trailers
from gateway.telemetry import continuing

MetadataPairs = Sequence[tuple[str, str | bytes]]


@dataclass(slots=True)
class Outgoing:
    """A transcoded call, ready to dispatch."""

    binding: Binding
    request: Message
    metadata: list[tuple[str, str | bytes]]
    timeout: float | None
    peer: str
    secure: bool


@dataclass(slots=True)
class Reply:
    """The outcome of a unary call. ``status`` is ``None`` on success."""

    message: Message | None
    status: status_pb2.Status | None
    initial: MetadataPairs = ()
    trailing: MetadataPairs = ()


@dataclass(slots=True)
class StreamReply:
    """A server stream: its initial metadata, its messages, then its final status."""

    messages: AsyncIterator[Message]
    initial: MetadataPairs = ()
    #: Set once ``messages`` is exhausted: the failure, if the stream ended in one.
    status: status_pb2.Status | None = None
    trailing: MetadataPairs = field(default_factory=list)


class Dispatcher(Protocol):
    """Runs transcoded calls."""

    async def unary(self, call: Outgoing) -> Reply:
        """Run a unary call."""
        ...

    async def server_stream(self, call: Outgoing) -> StreamReply | Reply:
        """Start a server-streaming call (a :class:`Reply` if it failed before starting)."""
        ...

    async def health(self, service: str) -> bool | None:
        """Whether ``service`` ("" for the whole server) is serving; None if the server
        does not know that service."""
        ...


_ASCII = range(0x20, 0x7F)


def upstream_metadata(call: Outgoing) -> list[tuple[str, str | bytes]]:
    """The call's metadata for the upstream, with ``x-forwarded-proto`` saying how the
    client reached the gateway (replacing any the client sent): an upstream that declares
    this gateway a TLS-terminating proxy believes it."""
    pairs = [(k, v) for k, v in clean_metadata(call.metadata) if k != "x-forwarded-proto"]
    pairs.append(("x-forwarded-proto", "https" if call.secure else "http"))
    return pairs


def clean_metadata(pairs: MetadataPairs) -> list[tuple[str, str | bytes]]:
    """Drop text values gRPC would refuse (non-printable or non-ASCII characters)."""
    return [
        (key, value)
        for key, value in pairs
        if isinstance(value, bytes) or all(ord(c) in _ASCII for c in value)
    ]


class ChannelDispatcher:
    """Forwards calls over a grpc.aio channel (the standalone gateway).

    ``traced``: the channel has tracing interceptors (:mod:`gateway.telemetry`), so each
    call starts in the trace context its caller sent, for its client span to continue.
    """

    def __init__(self, channel: grpc.aio.Channel, *, traced: bool = False) -> None:
        self._channel = channel
        self._traced = traced
        self._unary: dict[str, Any] = {}
        self._stream: dict[str, Any] = {}
        self._health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    def _callable(self, binding: Binding, *, stream: bool) -> Any:
        cache = self._stream if stream else self._unary
        found = cache.get(binding.full_method)
        if found is None:
            factory = self._channel.unary_stream if stream else self._channel.unary_unary
            found = factory(
                binding.full_method,
                request_serializer=binding.request_class.SerializeToString,
                response_deserializer=binding.response_class.FromString,
            )
            cache[binding.full_method] = found
        return found

    def _start(self, call: Outgoing, *, stream: bool) -> Any:
        rpc = self._callable(call.binding, stream=stream)
        metadata = upstream_metadata(call)
        if not self._traced:
            return rpc(call.request, metadata=metadata, timeout=call.timeout)
        # The interceptor's span starts in a task created right here, in this context.
        with continuing(metadata) as rest:
            return rpc(call.request, metadata=rest, timeout=call.timeout)

    async def unary(self, call: Outgoing) -> Reply:
        """Forward a unary call; a gRPC error becomes the reply's status."""
        rpc = self._start(call, stream=False)
        try:
            response = await rpc
        except grpc.aio.AioRpcError as error:
            return _failed(error)
        return Reply(
            response, None, await rpc.initial_metadata() or (), await rpc.trailing_metadata() or ()
        )

    async def server_stream(self, call: Outgoing) -> StreamReply | Reply:
        """Forward a server stream; a failure before the first message is a :class:`Reply`."""
        rpc = self._start(call, stream=True)
        try:
            initial = await rpc.initial_metadata()
            first = await rpc.read()
        except grpc.aio.AioRpcError as error:
            return _failed(error)
        reply = StreamReply(_empty(), initial or ())
        reply.messages = _rest(rpc, first, reply)
        return reply

    async def health(self, service: str) -> bool | None:
        """Ask the upstream's ``grpc.health.v1.Health/Check``."""
        try:
            response = await self._health(health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.aio.AioRpcError as error:
            return None if error.code() == grpc.StatusCode.NOT_FOUND else False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def _failed(error: grpc.aio.AioRpcError) -> Reply:
    trailing: MetadataPairs = tuple(error.trailing_metadata() or ())
    initial: MetadataPairs = tuple(error.initial_metadata() or ())
    status = status_from_trailers(error.code().value[0], error.details() or "", trailing)
    return Reply(None, status, initial, trailing)


async def _empty() -> AsyncIterator[Message]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _rest(rpc: Any, first: Any, reply: StreamReply) -> AsyncIterator[Message]:
    message = first
    try:
        while message is not grpc.aio.EOF:
            yield message
            message = await rpc.read()
        reply.trailing = list(await rpc.trailing_metadata() or ())
    except grpc.aio.AioRpcError as error:
        failed = _failed(error)
        reply.status, reply.trailing = failed.status, list(failed.trailing)
    finally:
        rpc.cancel()  # the HTTP client went away mid-stream: so does the upstream call
