"""The gateway's own pages: ``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json`` and
the docs UI under ``/api/docs``; and the HTTP metrics ``/metrics`` shows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from gateway import docs
from gateway.asgi import Response
from gateway.bindings import Catalog
from gateway.errors import GatewayError
from gateway.forward import Dispatcher

#: The server's dependencies, each published as its own health service
#: ``tunnelplane.dependency.<name>`` (``/readyz`` reports those the server has; one that is
#: down while the server serves makes it DEGRADED).
DEPENDENCY = "tunnelplane.dependency."
DEPENDENCIES = ("database", "database_replica", "redis")
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
Page = Callable[[], Awaitable[Response]]


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


class Pages:
    """The built-in pages, answered by the gateway itself (GET or HEAD)."""

    def __init__(
        self,
        catalog: Catalog,
        dispatcher: Dispatcher,
        registry: CollectorRegistry,
        openapi: bytes,
        *,
        title: str,
        docs_enabled: bool,
    ) -> None:
        self._catalog = catalog
        self._dispatcher = dispatcher
        self._registry = registry
        self._openapi = openapi
        self._title = title
        self._docs_enabled = docs_enabled
        self._pages: dict[str, Page] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/openapi.json": self._openapi_page,
        }

    def get(self, path: str) -> Page | None:
        """The page served at ``path``, if any (the docs UI aside: see :meth:`docs`)."""
        return self._pages.get(path)

    @staticmethod
    def is_docs(path: str) -> bool:
        """Whether ``path`` belongs to the docs UI."""
        return path == docs.PREFIX or path.startswith(docs.PREFIX + "/")

    def docs(self, path: str) -> Response:
        """The docs page, its initializer or one of its assets; 404 when disabled."""
        if not self._docs_enabled:
            raise GatewayError.simple(5, "docs are disabled", "NOT_FOUND", 404)
        csp = (b"content-security-policy", docs.CSP.encode())
        if path in {docs.PREFIX, docs.PREFIX + "/"}:
            page = docs.page(self._title)
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
        serving = await self._dispatcher.health("")
        body = orjson.dumps({"status": "SERVING" if serving else "NOT_SERVING"})
        return Response(200 if serving else 503, body)

    async def _readyz(self) -> Response:
        services = sorted({b.method.containing_service.full_name for b in self._catalog.bindings})
        states = {service: await self._dispatcher.health(service) for service in services}
        ready = bool(await self._dispatcher.health("")) and all(states.values())
        # The dependencies the server publishes (those it does not have are left out).
        found = {d: await self._dispatcher.health(DEPENDENCY + d) for d in DEPENDENCIES}
        dependencies = {d: up for d, up in found.items() if up is not None}
        status = "NOT_SERVING"
        if ready:
            status = "SERVING" if all(dependencies.values()) else "DEGRADED"
        body = orjson.dumps(
            {
                "status": status,
                "services": {s: "SERVING" if up else "NOT_SERVING" for s, up in states.items()},
                "dependencies": {
                    d: "SERVING" if up else "NOT_SERVING" for d, up in dependencies.items()
                },
            }
        )
        return Response(200 if ready else 503, body)

    async def _metrics(self) -> Response:
        return Response(200, generate_latest(self._registry), CONTENT_TYPE_LATEST.encode())

    async def _openapi_page(self) -> Response:
        return Response(200, self._openapi)
