"""The proxy's composition: the link server (WebSocket, agents dial in), the public server
(aiohttp, web clients), the control-plane client and the metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import redis.asyncio as redis
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from proxy.admin import AdminApi, Recent, configured
from proxy.control import ControlPlane
from proxy.links import LinkEndpoint, Registry
from proxy.metrics import ProxyMetrics
from proxy.peers import RENEW, Peers, RedisPeers
from proxy.web import WebProxy, WebSettings

log = logging.getLogger("tunnelplane.proxy")


@dataclass(frozen=True)
class ProxySettings:
    """Where the proxy listens, where the control plane is, and the public side's limits."""

    control_plane: str
    host: str = "127.0.0.1"
    port: int = 8090
    link_host: str = "127.0.0.1"
    link_port: int = 8091
    metrics_port: int = 0  # 0: no metrics endpoint
    tls_cert: Path | None = None  # the public side's certificate chain (PEM)
    tls_key: Path | None = field(default=None, repr=False)
    link_tls_cert: Path | None = None  # the link's (agents verify it)
    link_tls_key: Path | None = field(default=None, repr=False)
    control_plane_roots: bytes | None = field(default=None, repr=False)
    control_plane_tls: bool = False
    web: WebSettings = field(default_factory=WebSettings)
    #: The admin side (health, live config, diagnostics) for the control plane: it runs
    #: when there is a token, on this port (0: a free one).
    admin_port: int = 0
    admin_token: str = field(default="", repr=False)
    #: A proxy's config as the control plane gave it at start, and its revision.
    config: dict[str, Any] | None = None
    config_version: int = 0
    #: The registry the instances of one proxy share (proxy/peers.py): Redis at this URL
    #: ("": none, no relaying), under this key prefix.
    peers_redis_url: str = field(default="", repr=False)
    peers_prefix: str = "tp:"
    #: This instance's public base URL as other instances reach it ("": from the host the
    #: public side binds and its port).
    advertise_url: str = ""


class ProxyApp:
    """One proxy instance: :meth:`start`, then :meth:`stop`."""

    def __init__(self, settings: ProxySettings, peers: Peers | None = None) -> None:
        self.settings = settings
        self.registry = Registry()
        self.prometheus = CollectorRegistry()
        self.metrics = ProxyMetrics(self.prometheus)
        self._channel = self._control_channel()
        self.control = ControlPlane(self._channel)
        web_settings = settings.web
        if settings.config is not None:
            web_settings = configured(web_settings, settings.config)
        self.peers: Peers | None = peers
        self.web = WebProxy(
            web_settings, self.registry, self.control, self.metrics,
            shared=peers, hop_token=settings.admin_token,
        )  # fmt: skip
        self._publishing: asyncio.Task[None] | None = None
        self.recent = Recent()
        self.admin = AdminApi(
            settings.admin_token,
            self.web,
            self.registry,
            self.prometheus,
            self.recent,
            self.metrics,
            settings.config or {},
            settings.config_version,
        )
        self.links = LinkEndpoint(self.registry, self.control)
        self._runners: list[web.BaseRunner] = []
        self.port = self.link_port = self.metrics_port = self.admin_port = 0

    def _control_channel(self) -> grpc.aio.Channel:
        target = self.settings.control_plane
        if not (self.settings.control_plane_tls or self.settings.control_plane_roots):
            return grpc.aio.insecure_channel(target)
        credentials = grpc.ssl_channel_credentials(self.settings.control_plane_roots)
        return grpc.aio.secure_channel(target, credentials)

    async def start(self) -> None:
        """Listen on the link, public and metrics ports (0 picks a free one)."""
        s = self.settings
        links = web.Server(self.links.handle, access_log=None)
        self.link_port = await self._serve(
            web.ServerRunner(links, shutdown_timeout=1.0),
            s.link_host,
            s.link_port,
            _server_tls(s.link_tls_cert, s.link_tls_key),
        )
        # No access log: the proxy's metrics count every request (it cost 5 % of a request).
        server = web.Server(self.web.handle, handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=1.0)
        self.port = await self._serve(runner, s.host, s.port, _server_tls(s.tls_cert, s.tls_key))
        if s.metrics_port:
            metrics = web.Server(self._metrics)
            self.metrics_port = await self._serve(
                web.ServerRunner(metrics, shutdown_timeout=1.0), s.host, s.metrics_port, None
            )
        if s.admin_token:
            logging.getLogger().addHandler(self.recent)
            admin = web.Server(self.admin.handle, access_log=None)
            self.admin_port = await self._serve(
                web.ServerRunner(admin, shutdown_timeout=1.0), s.link_host, s.admin_port, None
            )
        self._start_peers()
        log.info(
            "proxy listening",
            extra={"port": self.port, "link_port": self.link_port,
                   "metrics_port": self.metrics_port, "admin_port": self.admin_port,
                   "domain": s.web.public_domain},
        )  # fmt: skip

    async def _serve(
        self, runner: web.BaseRunner, host: str, port: int, tls: ssl.SSLContext | None
    ) -> int:
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port, ssl_context=tls)
        await site.start()
        server = cast(asyncio.Server, site._server)  # the bound port, when port is 0
        return int(server.sockets[0].getsockname()[1])

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        self.metrics.links.set(self.registry.links_total())
        if request.path != "/metrics":
            return web.Response(status=404)
        return web.Response(body=generate_latest(self.prometheus), content_type="text/plain")

    @property
    def public_url(self) -> str:
        """Where other instances reach this one's public side."""
        host = self.settings.host if self.settings.host not in {"", "0.0.0.0"} else "127.0.0.1"  # noqa: S104
        return self.settings.advertise_url or f"http://{host}:{self.port}"

    def _start_peers(self) -> None:
        """Join the instances' shared registry, if there is one, and keep publishing."""
        s = self.settings
        if self.peers is None and s.peers_redis_url and s.admin_token:
            client = redis.Redis.from_url(s.peers_redis_url)
            self.peers = RedisPeers(client, self.public_url, s.peers_prefix)
            self.web.join(self.peers)
        if self.peers is not None:
            self._publishing = asyncio.create_task(self._publish(self.peers))

    async def _publish(self, shared: Peers) -> None:
        while True:
            try:
                await shared.publish(self.registry.tunnels())
            except Exception as exc:  # noqa: BLE001 - the registry may be away; try again
                log.warning("cannot publish to the peers' registry", extra={"error": repr(exc)})
            await asyncio.sleep(RENEW)

    async def stop(self) -> None:
        """Stop taking requests, give those in flight a second to end, then close the
        agents' links."""
        if self._publishing is not None:
            self._publishing.cancel()
            await asyncio.gather(self._publishing, return_exceptions=True)
        if self.peers is not None:
            with contextlib.suppress(Exception):
                await self.peers.close()
        await self.web.close()
        logging.getLogger().removeHandler(self.recent)
        for runner in reversed(self._runners):  # the public side before the links
            await runner.cleanup()
        await self._channel.close()


def _server_tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A server-side TLS context for a certificate chain and its key (None without one)."""
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
