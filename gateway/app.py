"""The ASGI application: route, transcode, dispatch, and what surrounds every response
(request id, security headers and CORS: ``gateway.cors``; gzip, streams and the body limit:
``gateway.asgi``; HTTP metrics, docs and health: ``gateway.pages``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
from google.protobuf.message import Message
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from gateway import headers, preconditions, streaming, transcode
from gateway.asgi import (
    JSON,
    Headers,
    Receive,
    Response,
    Scope,
    Send,
    header,
    lifespan,
    read_body,
    send_response,
)
from gateway.bindings import Binding, Catalog
from gateway.cors import Cors, security_headers
from gateway.errors import GatewayError, error_body, http_status
from gateway.forward import Dispatcher, Outgoing, Reply
from gateway.jsonenc import JsonEncoder
from gateway.openapi import OperationExtension, build_document
from gateway.pages import HttpMetrics, Pages
from gateway.routes import Match


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
        self._common = security_headers(tls=self.options.tls)
        self._cors = Cors(self.options.cors_origins)
        self._pages = Pages(
            catalog,
            dispatcher,
            self.registry,
            self._openapi,
            title=self.options.title,
            docs_enabled=self.options.docs,
        )

    @property
    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document served at ``/openapi.json``."""
        document: dict[str, Any] = orjson.loads(self._openapi)
        return document

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await lifespan(receive, send)

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
            request_id = request_id or headers.request_id_from(header(scope, b"x-request-id"))
            response = self._error(error.status, request_id, error.http, error.headers)
        await send_response(
            send,
            receive,
            response,
            self._headers(response, request_id, origin),
            accept_encoding=accept_encoding,
            gzip_min_bytes=self.options.gzip_min_bytes,
        )
        self._metrics.observe(method, response.route, response.status, time.perf_counter() - start)

    async def _route(
        self, scope: Scope, receive: Receive, method: str, path: str, inbound: headers.Inbound
    ) -> Response:
        if (
            method == "OPTIONS"
            and inbound.origin
            and header(scope, b"access-control-request-method")
        ):
            allowed = self.catalog.router.match("OPTIONS", path)
            methods = allowed if isinstance(allowed, list) else None
            requested = header(scope, b"access-control-request-headers")
            return self._cors.preflight(inbound.origin, methods, requested)
        page = self._pages.get(path)
        if page is not None and method in {"GET", "HEAD"}:
            response = await page()
            response.route = path
            return response
        if self._pages.is_docs(path):
            return self._pages.docs(path)
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
        body = await read_body(receive, scope, self.options.max_body_bytes)
        request = self._request(binding, match.variables, scope, body, inbound)
        client = scope.get("client")
        secure = scope.get("scheme") == "https" or (
            self.options.trust_forwarded_proto and header(scope, b"x-forwarded-proto") == "https"
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
        code = http or http_status(status.code)
        response_headers = list(metadata_headers or [])
        response_headers += [(k.encode(), v.encode("latin-1")) for k, v in extra]
        if status.code == 16:
            response_headers.append((b"www-authenticate", b'Bearer realm="api"'))
        body = error_body(status, request_id, self.catalog.pool)
        return Response(code, body, JSON, response_headers)

    def _headers(self, response: Response, request_id: str, origin: str) -> Headers:
        """The response's headers, the common ones, the request id and CORS."""
        out = [(b"content-type", response.content_type), *response.headers, *self._common]
        if all(key != b"x-request-id" for key, _ in response.headers):  # else the upstream's
            out.append((b"x-request-id", request_id.encode()))
        out += self._cors.headers(origin)
        return out
