"""The admin side of an instance the control plane runs (``--admin-port``): its health
with what it says of its load, its config pushed live, its diagnostics and its metrics.

Only the control plane reaches it: every path but ``/metrics`` needs the instance's admin
token (``Authorization: Bearer …``), given at start in ``TP_PROXY_ADMIN_TOKEN`` — except
that ``/_proxy/health`` without it answers a bare ``SERVING`` (for liveness probes).
"""

from __future__ import annotations

import collections
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from proxy.links import Registry
from proxy.metrics import ProxyMetrics
from proxy.web import WebProxy, WebSettings

#: The settings a pushed config may set, with their bounds (the control plane validates
#: them too; an instance never takes a value it cannot work with).
NUMBERS: Mapping[str, tuple[float, float]] = {
    "max_connections": (0, 1_000_000),
    "timeout": (0.001, 86_400),
    "first_byte_timeout": (0.001, 86_400),
    "gzip_level": (0, 9),
    "rate_limit_rps": (0, 10_000_000),
    "rate_limit_burst": (0, 10_000_000),
    "retries": (0, 100),
    "retry_delay": (0.001, 60),
    "max_body_bytes": (1, 1 << 40),
}


def configured(base: WebSettings, config: Mapping[str, Any]) -> WebSettings:
    """``base`` with a proxy config applied; ValueError naming a bad setting."""
    values: dict[str, float] = {}
    for name, (low, high) in NUMBERS.items():
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number")  # noqa: TRY004 - bad input
        if not low <= value <= high:
            raise ValueError(f"{name} must be {low} to {high}")
        values[name] = value
    return replace(
        base,
        first_byte_timeout=values["first_byte_timeout"],
        idle_timeout=values["timeout"],
        max_body_bytes=int(values["max_body_bytes"]),
        claim_wait=(values["retries"] + 1) * values["retry_delay"],
        max_connections=int(values["max_connections"]),
        rate_limit_rps=values["rate_limit_rps"],
        rate_limit_burst=int(values["rate_limit_burst"]),
        gzip_level=int(values["gzip_level"]),
    )


class Recent(logging.Handler):
    """The instance's last log lines and last warnings or errors, for diagnostics."""

    def __init__(self, lines: int = 200, errors: int = 50) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=lines)
        self.errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=errors)

    def emit(self, record: logging.LogRecord) -> None:
        entry = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage()[:500],
        }
        self.lines.append(entry)
        if record.levelno >= logging.WARNING:
            self.errors.append(entry)


class CpuSampler:
    """The process's CPU use since the last sample, in percent of one core."""

    def __init__(self) -> None:
        self._cpu, self._wall = time.process_time(), time.monotonic()

    def sample(self) -> float:
        cpu, wall = time.process_time(), time.monotonic()
        spent, passed = cpu - self._cpu, wall - self._wall
        self._cpu, self._wall = cpu, wall
        return round(100.0 * spent / passed, 1) if passed > 0 else 0.0


class AdminApi:
    """The aiohttp handler of the admin port."""

    def __init__(
        self,
        token: str,
        web_proxy: WebProxy,
        registry: Registry,
        prometheus: CollectorRegistry,
        recent: Recent,
        metrics: ProxyMetrics,
        config: Mapping[str, Any],
        config_version: int,
    ) -> None:
        self._metrics = metrics
        self._token = token.encode()
        self._web = web_proxy
        self._registry = registry
        self._prometheus = prometheus
        self._recent = recent
        self._cpu = CpuSampler()
        self._started = time.time()
        self.config, self.config_version = dict(config), config_version

    async def handle(self, request: web.BaseRequest) -> web.Response:
        """Answer one admin request."""
        if request.path == "/metrics" and request.method == "GET":
            return web.Response(body=generate_latest(self._prometheus), content_type="text/plain")
        if not self._authorized(request):
            if (request.method, request.path) == ("GET", "/_proxy/health"):
                return _json({"status": "SERVING"})  # a probe's answer: alive, nothing more
            return _json({"error": "the admin token is missing or wrong"}, 401)
        if (request.method, request.path) == ("PUT", "/_proxy/config"):
            return await self._configure(request)
        reads = {
            "/_proxy/health": self.health,
            "/_proxy/diagnostics": self.diagnostics,
            "/_proxy/stats": self._metrics.summary,
        }
        read = reads.get(request.path) if request.method == "GET" else None
        if read is None:
            return _json({"error": "no such admin path"}, 404)
        return _json(read())

    def health(self) -> dict[str, Any]:
        """What the control plane's checks read: alive, and the load it carries."""
        last = self._web.last_request
        return {
            "status": "SERVING",
            "config_version": self.config_version,
            "cpu_percent": self._cpu.sample(),
            "streams": self._web.active,
            "agents_linked": self._registry.links_total(),
            "last_request_time": last or None,
        }

    def diagnostics(self) -> dict[str, Any]:
        """The bundle: effective config, recent logs and errors, load."""
        return {
            "config_version": self.config_version,
            "config": self.config,
            "started": self._started,
            "streams": self._web.active,
            "last_request_time": self._web.last_request or None,
            "recent_errors": list(self._recent.errors),
            "recent_logs": list(self._recent.lines),
        }

    async def _configure(self, request: web.BaseRequest) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            version, config = int(body["version"]), dict(body["config"])
            settings = configured(self._web.settings, config)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            return _json({"error": f"bad config: {exc}"}, 400)
        self._web.configure(settings)
        self.config, self.config_version = config, version
        logging.getLogger("tunnelplane.proxy").info(
            "config applied", extra={"config_version": version}
        )
        return _json({"config_version": version})

    def _authorized(self, request: web.BaseRequest) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self._token
        )


def _json(data: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")
