"""The ASGI application: route, transcode, dispatch, and what surrounds every response
(request id, security headers, CORS, gzip, body limit, HTTP metrics, docs, health)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
from google.protobuf.message import Message
from google.rpc import status_pb2
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from gateway import docs, headers, preconditions, streaming, transcode
from gateway.bindings import Binding, Catalog
from gateway.errors import GatewayError, error_body
from gateway.forward import Dispatcher, Outgoing, Reply
from gateway.jsonenc import JsonEncoder
from gateway.openapi import OperationExtension, build_document
from gateway.routes import Match

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
JSON = b"application/json"
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"x-permitted-cross-domain-policies", b"none"),
    (b"x-dns-prefetch-control", b"off"),
)
HSTS = (b"strict-transport-security", b"max-age=63072000; includeSubDomains")
EXPOSED = (
    b"x-request-id, retry-after, ratelimit, ratelimit-policy, x-ratelimit-limit, "
    b"x-ratelimit-remaining, x-ratelimit-reset, etag, location, deprecation, sunset, link"
)
COMPRESSIBLE = (b"application/json", b"text/", b"application/javascript")
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    """How the gateway behaves; every field is a setting of the embedding program."""

    strict: bool = False
    max_body_bytes: int = 2 * 1024 * 1024
    emit_defaults: bool = True
    cors_origins: frozenset[str] = frozenset()
    gzip_min_bytes: int = 1024
    docs: bool = True
    title: str = "API"
    version: str = "v1"
    tls: bool = False
    trust_forwarded_proto: bool = False
    #: Deadline of unary calls that send no ``Grpc-Timeout``, seconds (None: no deadline).
    #: Server streams get none unless the client sends ``Grpc-Timeout``: a watch lasts as
    #: long as its client wants.
    default_timeout: float | None = 30.0
    #: Seconds between ``: keep-alive`` comments on an idle SSE stream (None: never).
    sse_keepalive: float | None = 15.0
    #: A top-level string field of a stream's messages whose value becomes the SSE
    #: ``id:`` (a resuming ``EventSource`` sends it back as ``Last-Event-ID``); "": none.
    sse_id_field: str = "event_id"


@dataclass(slots=True)
class Response:
    """What to send, before the common headers are added."""

    status: int
    body: bytes = b""
    content_type: bytes = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None
    route: str = "unmatched"


class HttpMetrics:
    """``http_requests_total`` and ``http_request_duration_seconds`` by route template."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(
            "http_requests_total",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self._seconds = Histogram(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by method, route template and status.",
            ["method", "route", "status"],
            buckets=BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request."""
        key = (method, route, status)
        pair = self._children.get(key)
        if pair is None:
            pair = (
                self._requests.labels(method, route, str(status)),
                self._seconds.labels(method, route, str(status)),
            )
            self._children[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)


class Gateway:
    """An ASGI application serving every binding of a :class:`Catalog`."""

    def __init__(
        self,
        catalog: Catalog,
        dispatcher: Dispatcher,
        options: GatewayOptions | None = None,
        *,
        registry: CollectorRegistry | None = None,
        operation_extension: OperationExtension | None = None,
    ) -> None:
        self.catalog = catalog
        self.dispatcher = dispatcher
        self.options = options or GatewayOptions()
        self.registry = registry or CollectorRegistry()
        self._metrics = HttpMetrics(self.registry)
        self._json = JsonEncoder(emit_defaults=self.options.emit_defaults, pool=catalog.pool)
        # response_body picks one field of the reply; it is sent even when it is a default.
        self._full_json = JsonEncoder(emit_defaults=True, pool=catalog.pool)
        self._openapi = orjson.dumps(
            build_document(catalog, self.options.title, self.options.version, operation_extension)
        )
        self._common = list(SECURITY_HEADERS) + ([HSTS] if self.options.tls else [])
        self._builtin: dict[str, Callable[[], Awaitable[Response]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics_page,
            "/openapi.json": self._openapi_page,
        }

    @property
    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document served at ``/openapi.json``."""
        document: dict[str, Any] = orjson.loads(self._openapi)
        return document

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        method = scope["method"]
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else quote(scope["path"])
        client = scope.get("client")
        client_host = client[0] if client else ""
        request_id = ""
        origin = ""
        accept_encoding = ""
        try:
            inbound = headers.inbound(scope["headers"], client_host)
            request_id, origin = inbound.request_id, inbound.origin
            accept_encoding = inbound.accept_encoding
            response = await self._route(scope, receive, method, path, inbound)
        except GatewayError as error:
            # A header the gateway refused (say Grpc-Timeout) still keeps the caller's id.
            request_id = request_id or headers.request_id_from(_header(scope, b"x-request-id"))
            response = self._error(error.status, request_id, error.http, error.headers)
        await self._send(send, receive, response, request_id, origin, accept_encoding)
        self._metrics.observe(method, response.route, response.status, time.perf_counter() - start)

    async def _route(
        self, scope: Scope, receive: Receive, method: str, path: str, inbound: headers.Inbound
    ) -> Response:
        if (
            method == "OPTIONS"
            and inbound.origin
            and _header(scope, b"access-control-request-method")
        ):
            return self._preflight(scope, path, inbound.origin)
        builtin = self._builtin.get(path)
        if builtin is not None and method in {"GET", "HEAD"}:
            response = await builtin()
            response.route = path
            return response
        if path == docs.PREFIX or path.startswith(docs.PREFIX + "/"):
            return self._docs(path)
        found = self.catalog.router.match(method, path)
        if found is None:
            raise GatewayError.simple(5, f"no route for {method} {path[:200]}", "NOT_FOUND", 404)
        if isinstance(found, list):
            error = GatewayError.simple(
                12, f"{method} is not allowed here", "METHOD_NOT_ALLOWED", 405
            )
            error.headers.append(("allow", ", ".join(found)))
            raise error
        response = await self._call(scope, receive, found, inbound)
        response.route = found.route.route
        return response

    async def _call(
        self, scope: Scope, receive: Receive, match: Match[Binding], inbound: headers.Inbound
    ) -> Response:
        binding = match.route
        body = await _read_body(receive, scope, self.options.max_body_bytes)
        request = self._request(binding, match.variables, scope, body, inbound)
        client = scope.get("client")
        secure = scope.get("scheme") == "https" or (
            self.options.trust_forwarded_proto and _header(scope, b"x-forwarded-proto") == "https"
        )
        default = None if binding.server_streaming else self.options.default_timeout
        outgoing = Outgoing(
            binding,
            request,
            inbound.metadata,
            default if inbound.timeout is None else inbound.timeout,
            client[0] if client else "",
            secure,
        )
        if binding.server_streaming:
            return await self._stream(outgoing, inbound)
        reply = await self.dispatcher.unary(outgoing)
        extra = headers.outbound(
            reply.initial, reply.trailing, trailers_wanted=inbound.trailers_wanted
        )
        if reply.status is not None or reply.message is None:
            status = reply.status or status_pb2.Status(code=2, message="no response")
            return self._error(status, inbound.request_id, None, [], extra)
        content_type, payload = self._encode(binding, reply.message)
        return Response(200, payload, content_type, extra)

    def _request(
        self,
        binding: Binding,
        variables: dict[str, str],
        scope: Scope,
        body: bytes,
        inbound: headers.Inbound,
    ) -> Message:
        shape = binding.shape
        request = binding.request_class()
        strict = self.options.strict
        if shape.body:
            transcode.apply_body(
                request, shape, body, inbound.content_type, strict=strict, pool=self.catalog.pool
            )
        items = transcode.query_items(scope.get("query_string", b""))
        transcode.apply_query(request, shape, items, strict=strict)
        mask = binding.mask_field
        if (
            mask is not None
            and not shape.http_body
            and not getattr(request, mask.name).paths
            and body.strip()
        ):
            document = orjson.loads(body)
            assert shape.body_field is not None
            paths = transcode.infer_mask(document, shape.body_field.message_type)
            if paths:  # extending by nothing would still mark the mask as present
                getattr(request, mask.name).paths.extend(paths)
        transcode.apply_path(request, shape, variables)
        preconditions.apply_if_match(request, binding.etag, inbound.if_match)
        return request

    def _encode(self, binding: Binding, message: Message) -> tuple[bytes, bytes]:
        target = binding.response_body
        if binding.http_body_response:
            body: Any = getattr(message, target.name) if target is not None else message
            content_type = str(body.content_type or "application/octet-stream")
            return content_type.encode("latin-1"), bytes(body.data)
        if target is None:
            return JSON, orjson.dumps(self._json.encode(message))
        document = self._full_json.encode(message)
        return JSON, orjson.dumps(document.get(target.json_name))

    async def _stream(self, outgoing: Outgoing, inbound: headers.Inbound) -> Response:
        reply = await self.dispatcher.server_stream(outgoing)
        if isinstance(reply, Reply):
            extra = headers.outbound(
                reply.initial, reply.trailing, trailers_wanted=inbound.trailers_wanted
            )
            status = reply.status or status_pb2.Status(code=2, message="stream failed")
            return self._error(status, inbound.request_id, None, [], extra)
        sse = streaming.wants_sse(inbound.accept)
        binding = outgoing.binding
        ids = streaming.id_field(binding.response_class.DESCRIPTOR, self.options.sse_id_field)
        keepalive = self.options.sse_keepalive if sse else None

        async def frames() -> AsyncIterator[bytes]:
            paced = streaming.paced(reply.messages, keepalive)
            async with contextlib.aclosing(paced) as messages:
                async for message in messages:
                    if message is None:
                        yield streaming.KEEPALIVE
                        continue
                    document = self._encode(binding, message)[1]
                    event_id = streaming.event_id(message, ids) if sse else ""
                    yield streaming.result_frame(document, sse=sse, event_id=event_id)
            if reply.status is not None:
                document = error_body(reply.status, inbound.request_id, self.catalog.pool)
                yield streaming.error_frame(document, sse=sse)

        content_type = streaming.SSE if sse else streaming.NDJSON
        extra = headers.outbound(reply.initial, (), trailers_wanted=False)
        return Response(200, b"", content_type.encode(), extra, frames())

    def _error(
        self,
        status: status_pb2.Status,
        request_id: str,
        http: int | None,
        extra: list[tuple[str, str]],
        metadata_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> Response:
        code = http or _http_status(status.code)
        response_headers = list(metadata_headers or [])
        response_headers += [(k.encode(), v.encode("latin-1")) for k, v in extra]
        if status.code == 16:
            response_headers.append((b"www-authenticate", b'Bearer realm="api"'))
        body = error_body(status, request_id, self.catalog.pool)
        return Response(code, body, JSON, response_headers)

    def _preflight(self, scope: Scope, path: str, origin: str) -> Response:
        if not self._origin_allowed(origin):
            raise GatewayError.simple(7, "origin not allowed", "CORS_ORIGIN_DENIED", 403)
        requested = _header(scope, b"access-control-request-headers")
        allowed = self.catalog.router.match("OPTIONS", path)
        methods = (
            ", ".join(allowed) if isinstance(allowed, list) else "GET, POST, PUT, PATCH, DELETE"
        )
        return Response(
            204,
            headers=[
                (b"access-control-allow-methods", methods.encode()),
                (b"access-control-allow-headers", requested.encode("latin-1")),
                (b"access-control-max-age", b"600"),
            ],
            route="preflight",
        )

    def _origin_allowed(self, origin: str) -> bool:
        allowed = self.options.cors_origins
        return bool(origin) and ("*" in allowed or origin in allowed)

    def _cors_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        """An origin named in the settings is reflected and may send credentials (cookies);
        under ``*`` any origin may read, without them: reflecting every origin with
        credentials would let any page on the same site use the browser's cookies."""
        if origin in self.options.cors_origins:
            return [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-credentials", b"true"),
                (b"access-control-expose-headers", EXPOSED),
                (b"vary", b"Origin"),
            ]
        return [
            (b"access-control-allow-origin", b"*"),
            (b"access-control-expose-headers", EXPOSED),
        ]

    def _docs(self, path: str) -> Response:
        if not self.options.docs:
            raise GatewayError.simple(5, "docs are disabled", "NOT_FOUND", 404)
        csp = (b"content-security-policy", docs.CSP.encode())
        if path in {docs.PREFIX, docs.PREFIX + "/"}:
            page = docs.page(self.options.title)
            return Response(200, page, b"text/html; charset=utf-8", [csp], route=docs.PREFIX)
        name = path[len(docs.PREFIX) + 1 :]
        if name == "init.js":
            return Response(
                200, docs.initializer(), b"text/javascript; charset=utf-8", [csp], route=docs.PREFIX
            )
        found = docs.asset(name)
        if found is None:
            raise GatewayError.simple(5, "no such docs asset", "NOT_FOUND", 404)
        content, kind = found
        cache = (b"cache-control", b"public, max-age=86400")
        return Response(200, content, kind.encode(), [csp, cache], route=docs.PREFIX)

    async def _healthz(self) -> Response:
        serving = await self.dispatcher.health("")
        body = orjson.dumps({"status": "SERVING" if serving else "NOT_SERVING"})
        return Response(200 if serving else 503, body)

    async def _readyz(self) -> Response:
        services = sorted({b.method.containing_service.full_name for b in self.catalog.bindings})
        states = {service: await self.dispatcher.health(service) for service in services}
        ready = await self.dispatcher.health("") and all(states.values())
        body = orjson.dumps(
            {
                "status": "SERVING" if ready else "NOT_SERVING",
                "services": {s: "SERVING" if up else "NOT_SERVING" for s, up in states.items()},
            }
        )
        return Response(200 if ready else 503, body)

    async def _metrics_page(self) -> Response:
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())

    async def _openapi_page(self) -> Response:
        return Response(200, self._openapi)

    async def _send(
        self,
        send: Send,
        receive: Receive,
        response: Response,
        request_id: str,
        origin: str,
        accept_encoding: str,
    ) -> None:
        out = [(b"content-type", response.content_type), *response.headers, *self._common]
        if all(key != b"x-request-id" for key, _ in response.headers):  # else the upstream's
            out.append((b"x-request-id", request_id.encode()))
        if origin and self._origin_allowed(origin):
            out += self._cors_headers(origin)
        if response.stream is not None:
            await _send_stream(send, receive, response, out)
            return
        body = response.body
        if (
            len(body) >= self.options.gzip_min_bytes
            and "gzip" in accept_encoding
            and response.content_type.startswith(COMPRESSIBLE)
        ):
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
            body = compressor.compress(body) + compressor.flush()
            out += [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")]
        out.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": out})
        await send({"type": "http.response.body", "body": body})


async def _send_stream(
    send: Send, receive: Receive, response: Response, out: list[tuple[bytes, bytes]]
) -> None:
    """Send a stream as it comes; stop it (the upstream call is cancelled) when the client
    goes away, which the server reports on ``receive``, not by failing ``send``."""
    stream = response.stream
    assert stream is not None
    out.append((b"cache-control", b"no-cache"))
    await send({"type": "http.response.start", "status": response.status, "headers": out})

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


def _http_status(code: int) -> int:
    from gateway.errors import http_status

    return http_status(code)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return ""


async def _read_body(receive: Receive, scope: Scope, limit: int) -> bytes:
    declared = _header(scope, b"content-length")
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


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
