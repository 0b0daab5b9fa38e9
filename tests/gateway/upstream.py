"""A real gRPC upstream for the gateway's tests: it echoes, fails and streams on demand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.api import httpbody_pb2
from google.protobuf import any_pb2, empty_pb2
from google.rpc import error_details_pb2, status_pb2

from tests.gateway.echo_proto import echo_pb2

SERVICE = "echo.v1.EchoService"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
Context = grpc.aio.ServicerContext[Any, Any]


def rich_status(code: int, message: str) -> status_pb2.Status:
    """A status with ErrorInfo, BadRequest and RetryInfo details."""
    details = []
    for detail in (
        error_details_pb2.ErrorInfo(reason="TEST_REASON", domain="echo.test"),
        error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field="code")]
        ),
    ):
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    return status_pb2.Status(code=code, message=message, details=details)


async def abort_with(context: Context, code: int, message: str) -> None:
    status = rich_status(code, message)
    context.set_trailing_metadata(
        (("grpc-status-details-bin", status.SerializeToString()), ("retry-after", "7"))
    )
    await context.abort(grpc.StatusCode(_by_number(code)), message)


def _by_number(code: int) -> Any:
    return next(c.value for c in grpc.StatusCode if c.value[0] == code)


class Echo:
    """The servicer."""

    async def Echo(self, request: Any, context: Context) -> Any:
        return request

    async def GetThing(self, request: Any, context: Context) -> Any:
        return echo_pb2.Thing(name=request.name, note=f"extra={request.extra}")

    async def Frobnicate(self, request: Any, context: Context) -> Any:
        return echo_pb2.Thing(name=request.name, note=f"frobnicated extra={request.extra}")

    async def GetFile(self, request: Any, context: Context) -> Any:
        return echo_pb2.Thing(name=request.path)

    async def GetNote(self, request: Any, context: Context) -> Any:
        return echo_pb2.Thing(name=request.id)

    async def UpdateThing(self, request: Any, context: Context) -> Any:
        return request

    async def ListTags(self, request: Any, context: Context) -> Any:
        return echo_pb2.Thing(name=request.name, tags=["red", "blue"], size=2)

    async def Upload(self, request: Any, context: Context) -> Any:
        blob = request.blob
        return echo_pb2.Thing(name=request.name, note=blob.content_type, size=len(blob.data))

    async def Download(self, request: Any, context: Context) -> Any:
        return httpbody_pb2.HttpBody(content_type="image/png", data=PNG)

    async def Stream(self, request: Any, context: Context) -> AsyncIterator[Any]:
        for i in range(request.count):
            yield echo_pb2.Thing(name=f"things/{i}", size=i)
        if request.fail_code:
            await abort_with(context, request.fail_code, "stream failed")

    async def Fail(self, request: Any, context: Context) -> Any:
        await context.send_initial_metadata((("x-custom", "initial"),))
        await abort_with(context, request.code, request.message or "failed on purpose")
        return empty_pb2.Empty()

    async def Headers(self, request: Any, context: Context) -> Any:
        received: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            text = value.hex() if isinstance(value, bytes) else value
            received[key] = f"{received[key]}, {text}" if key in received else text
        if request.reply_headers:
            await context.send_initial_metadata(tuple(request.reply_headers.items()))
        if request.reply_trailers:
            context.set_trailing_metadata(tuple(request.reply_trailers.items()))
        return echo_pb2.HeadersResponse(received=received, peer=context.peer())

    async def Slow(self, request: Any, context: Context) -> Any:
        await asyncio.sleep(30)
        return empty_pb2.Empty()

    async def Hidden(self, request: Any, context: Context) -> Any:
        return empty_pb2.Empty()

    async def UpdateRecord(self, request: Any, context: Context) -> Any:
        return request

    async def DeleteRecord(self, request: Any, context: Context) -> Any:
        return request

    async def ArchiveRecord(self, request: Any, context: Context) -> Any:
        return request


def handlers() -> grpc.GenericRpcHandler:
    """Generic handlers for every method of the echo service."""
    servicer = Echo()
    service = echo_pb2.DESCRIPTOR.services_by_name["EchoService"]
    table = {}
    for method in service.methods:
        input_class = _class(method.input_type.full_name)
        output_class = _class(method.output_type.full_name)
        factory = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        table[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=input_class.FromString,
            response_serializer=output_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE, table)


def _class(full_name: str) -> Any:
    from google.protobuf import message_factory, symbol_database

    descriptor = symbol_database.Default().pool.FindMessageTypeByName(full_name)
    return message_factory.GetMessageClass(descriptor)


async def start() -> tuple[grpc.aio.Server, int]:
    """A started upstream on a free port."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port
