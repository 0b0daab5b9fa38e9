"""The grpc.aio side: the one adapter from a grpc.aio call to the transport-neutral pipeline,
plus health, reflection (v1 and v1alpha) and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from server.domain.common.addresses import Network
from server.domain.common.errors import DomainError, Internal, InvalidArgument
from server.domain.limits.rules import in_networks
from server.interceptors.status import to_status
from server.pipeline import Call, Handler, MethodInfo

log = logging.getLogger("tunnelplane.grpc")

STATUS_DETAILS_KEY = "grpc-status-details-bin"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_MB = 1024 * 1024
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", 4 * _MB),
    ("grpc.max_send_message_length", 4 * _MB),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
)


def server_options(*, reuse_port: bool) -> list[tuple[str, Any]]:
    """:data:`SERVER_OPTIONS`, with ``SO_REUSEPORT`` on for a worker of a group
    (``TP_WORKERS``), whose processes listen on one port. Off otherwise, so that a port
    already in use fails to bind instead of being shared."""
    return [(k, int(reuse_port) if k == "grpc.so_reuseport" else v) for k, v in SERVER_OPTIONS]


@functools.lru_cache(maxsize=4096)
def peer_address(peer: str) -> str:
    """The IP address in a grpc peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind in {"ipv4", "ipv6"}:
        return rest.rpartition(":")[0]
    return rest or kind


@dataclass(frozen=True, slots=True)
class Security:
    """Whether a call arrived over TLS: this port's own, or a declared TLS-terminating
    proxy's. A proxy vouches only by sending ``x-forwarded-proto: https`` (it must set the
    header itself, replacing any the client sent), so a proxy that also forwards plain
    traffic cannot make it count as secure."""

    tls: bool = False
    proxies: tuple[Network, ...] = ()

    def secure(self, peer: str, metadata: Mapping[str, str]) -> bool:
        """Whether a call from ``peer`` with ``metadata`` counts as arriving over TLS."""
        if self.tls:
            return True
        return (
            bool(self.proxies)
            and metadata.get("x-forwarded-proto", "").lower() == "https"
            and in_networks(peer, self.proxies)
        )


#: Metadata that carries cookies: directly (gRPC) or forwarded by the HTTP gateway.
_COOKIE_KEYS = frozenset({"cookie", "grpcgateway-cookie"})


def metadata_dict(pairs: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """Request metadata as a dict; repeated keys are joined (``; `` for cookies, which
    HTTP/2 may split into one header per cookie, RFC 9113 8.2.3)."""
    result: dict[str, str] = {}
    for key, value in pairs:
        if isinstance(value, bytes):
            continue
        if key in result:
            result[key] += ("; " if key in _COOKIE_KEYS else ", ") + value
        else:
            result[key] = value
    return result


def _parser(message_type: type[Message]) -> Any:
    """A request deserializer that yields ``None`` for bytes that are not a valid message
    (bad UTF-8 in a string, truncated fields), so that the caller gets INVALID_ARGUMENT
    instead of grpc's UNKNOWN quoting the parser's exception."""

    def parse(data: bytes) -> Message | None:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return None

    return parse


class _GrpcStream:
    """A streaming call's messages over grpc.aio (see :class:`server.pipeline.CallStream`)."""

    __slots__ = ("_call", "_context", "headers_sent")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], call: Call) -> None:
        self._context = context
        self._call = call
        self.headers_sent = False

    async def send_headers(self) -> None:
        """Send the call's response headers, once, before anything else."""
        if not self.headers_sent:
            self.headers_sent = True
            if self._call.response_headers:
                await self._context.send_initial_metadata(self._call.response_headers)

    async def send(self, message: Message) -> None:
        await self.send_headers()
        await self._context.write(message)

    async def receive(self) -> Message | None:
        message = await self._context.read()
        if message is grpc.aio.EOF:
            return None
        if message is None:
            raise InvalidArgument([], "a request message is not a valid message")
        return message  # type: ignore[no-any-return]


async def _serve(
    method: MethodInfo,
    chain: Handler,
    request: Message | None,
    context: grpc.aio.ServicerContext[Any, Any],
    *,
    security: Security,
) -> Message | None:
    """Build the call, run the chain, answer (or fail with the status and its details)."""
    remaining = context.time_remaining()
    call = Call(
        method,
        metadata_dict(context.invocation_metadata() or ()),
        peer=peer_address(context.peer()),
        transport="grpc",
    )
    call.secure = security.secure(call.peer, call.metadata)
    stream = _GrpcStream(context, call)
    if method.grpc_type != "unary":
        call.stream = stream
    if request is None:
        invalid = InvalidArgument([], "the request is not a valid message")
        await _fail(context, call, invalid, stream)
        return None
    if remaining is not None:
        call.deadline = asyncio.get_running_loop().time() + remaining
    try:
        response = await chain(request, call)
    except DomainError as exc:
        await _fail(context, call, exc, stream)
        return None
    except Exception:
        log.exception("error outside the pipeline", extra={"method": method.full_name})
        await _fail(context, call, Internal(), stream)
        return None
    await stream.send_headers()
    if call.trailers:
        context.set_trailing_metadata(call.trailers)
    return response


def method_handler(
    method: MethodInfo, chain: Handler, *, security: Security | None = None
) -> grpc.RpcMethodHandler[Any, Any]:
    """The grpc.aio handler of one method, unary or streaming, running its chain.

    A streaming method's endpoint writes through the call; a client-streaming one gets an
    empty request message and reads the client's messages through the call.
    """
    parse = _parser(method.request_type)
    serialize = method.response_type.SerializeToString
    security = security or Security()

    async def handle(request: Message | None, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await _serve(method, chain, request, context, security=security)

    async def handle_stream(request: Message | None, context: Any) -> None:
        await _serve(method, chain, request, context, security=security)

    async def handle_client_stream(_requests: Any, context: Any) -> None:
        await _serve(method, chain, method.request_type(), context, security=security)

    kind = method.grpc_type
    if kind == "unary":
        return grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=parse, response_serializer=serialize
        )
    if kind == "server_stream":
        return grpc.unary_stream_rpc_method_handler(
            handle_stream, request_deserializer=parse, response_serializer=serialize
        )
    if kind == "bidi_stream":
        return grpc.stream_stream_rpc_method_handler(
            handle_client_stream, request_deserializer=parse, response_serializer=serialize
        )
    raise NotImplementedError(f"{method.full_name}: client-streaming methods are not served")


async def _fail(
    context: grpc.aio.ServicerContext[Any, Any], call: Call, exc: DomainError, stream: _GrpcStream
) -> None:
    status = to_status(exc)
    await stream.send_headers()
    trailers: list[tuple[str, str | bytes]] = [*call.trailers]
    trailers.append((STATUS_DETAILS_KEY, status.SerializeToString()))
    context.set_trailing_metadata(trailers)
    context.set_code(grpc.StatusCode[exc.code.name])
    context.set_details(status.message)


def service_handlers(
    methods: Iterable[MethodInfo],
    chains: Mapping[str, Handler],
    *,
    security: Security | None = None,
) -> list[grpc.GenericRpcHandler]:
    """One generic handler per service, dispatching to the compiled chains."""
    by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
    for method in methods:
        by_service.setdefault(method.service, {})[method.name] = method_handler(
            method, chains[method.full_name], security=security
        )
    return [grpc.method_handlers_generic_handler(s, h) for s, h in by_service.items()]


def add_health(server: grpc.aio.Server, servicer: HealthServicer | None = None) -> HealthServicer:
    """Register ``grpc.health.v1.Health`` (Check and Watch), served by ``servicer`` (a new
    one if None)."""
    servicer = servicer or HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


def _register_reflection_v1(pool: Any) -> None:
    """Add ``grpc/reflection/v1/reflection.proto`` to the pool, built from v1alpha.

    The two versions differ only in their package name, so the v1alpha messages serve
    both on the wire; the descriptor makes ``describe`` work for the v1 service too.
    """
    name = "grpc/reflection/v1/reflection.proto"
    with contextlib.suppress(KeyError):
        pool.FindFileByName(name)
        return
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name, proto.package = name, "grpc.reflection.v1"
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)


class _Reflection(reflection.aio.ReflectionServicer):
    """Also resolves method names (``pkg.Service.Method``, as ``grpcurl describe`` sends
    them), which the protobuf pool's symbol lookup does not."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        with contextlib.suppress(KeyError):
            method = descriptor_pool.Default().FindMethodByName(fully_qualified_name)
            fully_qualified_name = method.containing_service.full_name
        # A private hook of grpcio-reflection, absent from its type stubs.
        return super()._file_containing_symbol(request, fully_qualified_name)  # type: ignore[misc]


def add_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Server reflection, v1alpha and v1, listing ``service_names`` and itself."""
    names = [*service_names, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = _Reflection(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in (reflection.SERVICE_NAME, REFLECTION_V1):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )
    _register_reflection_v1(descriptor_pool.Default())


def bind(server: grpc.aio.Server, address: str, cert_file: str, key_file: str) -> int:
    """Listen on ``address``, with TLS when a certificate is configured; returns the port."""
    if cert_file:
        credentials = grpc.ssl_server_credentials(
            [(Path(key_file).read_bytes(), Path(cert_file).read_bytes())]
        )
        return server.add_secure_port(address, credentials)
    return server.add_insecure_port(address)
