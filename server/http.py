"""The embedded HTTP/JSON gateway: transcoded calls go straight into the same compiled
pipeline chains that serve gRPC, in the same process and event loop (no loopback hop).

The gateway itself is generic (``gateway/``); this module supplies what only Tunnelplane
knows: the in-process dispatcher and the policy-derived OpenAPI additions.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from tunnelplane.v1 import options_pb2

from gateway.app import Gateway, GatewayOptions
from gateway.bindings import Catalog, load_descriptor_set
from gateway.forward import Outgoing, Reply, StreamReply
from gateway.guard import ConnectionGuard
from gateway.openapi import OpenApiExtension
from server.cookies import ACCESS_COOKIE, REFRESH_COOKIE
from server.domain.common.errors import DomainError, Internal
from server.domain.identity.model import CredentialKind
from server.grpc_server import metadata_dict
from server.interceptors.status import to_status
from server.pipeline import Call, Handler, MethodInfo
from server.policy import policy_of
from server.settings import Settings, networks

DESCRIPTORS = "descriptors.binpb"
BEARER = "bearer"
ACCESS_COOKIE_SCHEME = "accessCookie"
#: Messages a server stream may run ahead of its HTTP client.
STREAM_BUFFER = 16


class InProcessDispatcher:
    """Runs a transcoded call through the method's pipeline chain, as gRPC would."""

    def __init__(
        self,
        methods: Mapping[str, MethodInfo],
        chains: Mapping[str, Handler],
        health: Callable[[str], bool | None],
    ) -> None:
        self._methods = methods
        self._chains = chains
        self._health = health

    def _call(self, out: Outgoing) -> tuple[Call, Handler]:
        method = self._methods[out.binding.full_method]
        call = Call(method, metadata_dict(out.metadata), peer=out.peer, transport="http")
        call.secure = out.secure
        if out.timeout is not None:
            call.deadline = asyncio.get_running_loop().time() + out.timeout
        return call, self._chains[method.full_name]

    async def unary(self, out: Outgoing) -> Reply:
        """The reply, or the status the pipeline ended with."""
        call, chain = self._call(out)
        try:
            response = await chain(out.request, call)
        except DomainError as exc:
            return Reply(None, to_status(exc), call.response_headers, call.trailers)
        except Exception:  # noqa: BLE001 - the pipeline's error stage logged it already
            return Reply(None, to_status(Internal()), call.response_headers, call.trailers)
        return Reply(response, None, call.response_headers, call.trailers)

    async def server_stream(self, out: Outgoing) -> StreamReply | Reply:
        """Run the chain in a task whose messages come through a small queue (the HTTP
        client's pace holds the stream back); a failure before the first message is a
        :class:`Reply`. When the client goes away the task is cancelled."""
        call, chain = self._call(out)
        queue: asyncio.Queue[Message | _End] = asyncio.Queue(STREAM_BUFFER)
        call.stream = _QueueStream(queue)

        async def run() -> None:
            status: status_pb2.Status | None = None
            try:
                await chain(out.request, call)
            except DomainError as exc:
                status = to_status(exc)
            except Exception:  # noqa: BLE001 - the pipeline's error stage logged it already
                status = to_status(Internal())
            await queue.put(_End(status))

        task = asyncio.create_task(run(), name=f"stream {out.binding.full_method}")
        first = await _first(queue, task)
        if isinstance(first, _End):
            status = first.status or status_pb2.Status()
            return Reply(None, status, call.response_headers, call.trailers)
        reply = StreamReply(_nothing(), list(call.response_headers))
        reply.messages = _drain(queue, task, first, call, reply)
        return reply

    async def health(self, service: str) -> bool | None:
        """The health monitor's view (None: a service it does not know)."""
        return self._health(service)


@dataclass(frozen=True, slots=True)
class _End:
    """The end of an in-process stream, with its failure if it failed."""

    status: status_pb2.Status | None


class _QueueStream:
    """A server stream's messages, handed to the HTTP side through a bounded queue."""

    __slots__ = ("_queue",)

    def __init__(self, queue: asyncio.Queue[Message | _End]) -> None:
        self._queue = queue

    async def send(self, message: Message) -> None:
        await self._queue.put(message)

    async def receive(self) -> Message | None:
        return None  # HTTP transcoding carries no client streams


async def _first(queue: asyncio.Queue[Message | _End], task: asyncio.Task[None]) -> Message | _End:
    try:
        return await queue.get()
    except BaseException:
        task.cancel()
        raise


async def _nothing() -> AsyncIterator[Message]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _drain(
    queue: asyncio.Queue[Message | _End],
    task: asyncio.Task[None],
    first: Message,
    call: Call,
    reply: StreamReply,
) -> AsyncIterator[Message]:
    """The stream's messages; its status and trailers land on the reply at the end."""
    item: Message | _End = first
    try:
        while not isinstance(item, _End):
            yield item
            item = await queue.get()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    reply.status, reply.trailing = item.status, list(call.trailers)


def policy_extension() -> OpenApiExtension:
    """Security requirements and the policy of each operation, from the policy option."""

    def operation(method: MethodDescriptor) -> dict[str, Any]:
        options = method.GetOptions()
        if not options.HasExtension(options_pb2.policy):
            return {}
        policy = policy_of(method)
        rule = policy.rule
        described: dict[str, Any] = {
            "access": "public" if rule.public else "authenticated",
            "audited": policy.audited,
        }
        if rule.permission:
            described["permission"] = rule.permission
        if rule.owner_field:
            described["ownerField"] = rule.owner_field
            described["adminPermission"] = rule.admin_permission
        if rule.min_tier is not None:
            described["minTier"] = rule.min_tier.value
        if policy.require_tls:
            described["requireTls"] = True
        if policy.stream_limit:
            described["streamLimit"] = policy.stream_limit
        if policy.cookie_auth:
            described["cookieAuth"] = True
        if rule.credentials != frozenset(CredentialKind):
            described["credentials"] = sorted(c.value for c in rule.credentials)
        security: list[dict[str, list[str]]] = [] if rule.public else [{BEARER: []}]
        if policy.cookie_auth:
            security.append({ACCESS_COOKIE_SCHEME: []})
        return {"security": security, "x-tunnelplane-policy": described}

    return OpenApiExtension(
        operation,
        {
            BEARER: {
                "type": "http",
                "scheme": "bearer",
                "description": "An access token from Login or RefreshToken (a JWT), or an "
                "API key (`tp_...`).",
            },
            "refreshCookie": {
                "type": "apiKey",
                "in": "cookie",
                "name": REFRESH_COOKIE,
                "description": "The refresh token, for RefreshToken, when delivered by cookie.",
            },
            ACCESS_COOKIE_SCHEME: {
                "type": "apiKey",
                "in": "cookie",
                "name": ACCESS_COOKIE,
                "description": "The access token, set with the refresh cookie; it "
                "authenticates only read-only streams (a browser's EventSource), never "
                "another call. An Authorization header wins over it.",
            },
        },
    )


def http_guard(settings: Settings) -> ConnectionGuard:
    """Read timeouts and the per-address connection cap of the HTTP listener; proxies
    whose X-Forwarded-For is believed carry many clients and are not capped."""
    return ConnectionGuard(
        header_timeout=settings.http_header_timeout,
        body_timeout=settings.http_body_timeout,
        max_per_address=settings.http_max_connections_per_address,
        exempt=networks(settings.trusted_proxies),
    )


def descriptor_set() -> Any:
    """The contract's descriptor set (with comments), shipped in ``generated/``."""
    resource = importlib.resources.files("tunnelplane") / DESCRIPTORS
    return load_descriptor_set(str(resource))


def build_gateway(
    settings: Settings,
    methods: list[MethodInfo],
    chains: Mapping[str, Handler],
    health: Callable[[str], bool | None],
    registry: Any,
) -> Gateway:
    """The embedded gateway over every served service."""
    services = sorted({m.service for m in methods})
    catalog = Catalog.build(descriptor_set(), descriptor_pool.Default(), services)
    origins = frozenset(o.strip() for o in settings.http_cors_origins.split(",") if o.strip())
    options = GatewayOptions(
        strict=settings.http_strict,
        max_body_bytes=settings.http_max_body_bytes,
        emit_defaults=settings.http_emit_defaults,
        cors_origins=origins,
        docs=settings.http_docs,
        title="Tunnelplane API",
        version="v1",
        tls=bool(settings.tls_cert_file),
        trust_forwarded_proto=settings.http_trust_forwarded_proto,
        # The pipeline's deadline stage decides: TP_DEFAULT_DEADLINE for unary calls, none
        # for streams (unless the client sends Grpc-Timeout).
        default_timeout=None,
        sse_keepalive=settings.http_sse_keepalive,
        sse_id_field="event_id",
    )
    dispatcher = InProcessDispatcher({m.full_name: m for m in methods}, chains, health)
    return Gateway(
        catalog, dispatcher, options, registry=registry, operation_extension=policy_extension()
    )
