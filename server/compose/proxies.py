"""Proxies: the embedded streaming proxy (a child this server keeps running, so that
``make run`` carries tunnels' web traffic with no further step), users' own proxies
(ProxyService: the fleet use cases, and the loop that runs their instances through a
provisioner), and the access questions the proxies ask.

The embedded proxy runs when ``TP_PROXY_PORT`` is not 0 and the server is one process.
With ``TP_WORKERS`` above 1 the workers share ports, but a proxy is a process of its own:
run ``python -m proxy`` beside the group (``TP_PROXY_LINKS`` tells agents where it is).
Users' proxies run as local children (``TP_PROXY_PROVISIONER=local``, a one-process server
only: one process must own them) or as Kubernetes Deployments
(``TP_PROXY_PROVISIONER=kubernetes``); either way one replica at a time runs the fleet loop
(a PostgreSQL advisory lock; with SQLite the one process).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from server.compose.events import EventsArea
from server.compose.identity import IdentityArea
from server.compose.infrastructure import Infrastructure
from server.compose.tunnels import TunnelsArea
from server.domain.proxies.basic import BasicCheck
from server.domain.proxies.fleet import FleetSettings, ProxyFleet
from server.domain.proxies.insight import ProxyInsight
from server.domain.proxies.ports import Provisioner
from server.domain.proxies.service import ProxyAccess
from server.domain.proxies.upkeep import ProxyUpkeep
from server.domain.tunnels.cache import TunnelCache
from server.provision.admin import InstanceAdminClient, admin_tokens
from server.provision.kubernetes import KubernetesProvisioner
from server.provision.local import LocalProvisioner, LocalSettings
from server.settings import Settings
from server.storage.leader import Leadership
from server.workers.embedded_proxy import EmbeddedProxy, embedded_proxy_loop
from server.workers.proxy_fleet import ProxyFleetLoop, fleet_loop
from server.workers.supervisor import Loop


@dataclass
class ProxiesArea:
    """The proxies' use cases, and the loops that run their processes."""

    access: ProxyAccess
    fleet: ProxyFleet
    upkeep: ProxyUpkeep
    insight: ProxyInsight
    #: The embedded proxy, if this process runs one.
    embedded: EmbeddedProxy | None
    #: The loop that runs users' proxies' instances, if this process owns them.
    fleet_loop: ProxyFleetLoop | None

    def loops(self) -> Sequence[Loop]:
        """The embedded proxy's keeper and the fleet loop, as configured."""
        loops = [] if self.embedded is None else [embedded_proxy_loop(self.embedded)]
        if self.fleet_loop is not None:
            loops.append(fleet_loop(self.fleet_loop))
        return loops

    async def aclose(self) -> None:
        """Nothing to release: the loops stop their children."""


def build(
    infra: Infrastructure,
    events: EventsArea,
    identity: IdentityArea,
    tunnels: TunnelsArea,
    grpc_port: Callable[[], int],
) -> ProxiesArea:
    """The area; ``grpc_port`` gives the control plane's bound gRPC port once it is known."""
    settings = infra.settings
    fleet = ProxyFleet(
        infra.db,
        events.bus,
        infra.lister,
        infra.clock,
        FleetSettings(max_per_user=settings.max_proxies_per_user),
    )
    upkeep = ProxyUpkeep(infra.db, fleet, infra.clock)
    keys = infra.keys
    tokens = admin_tokens(keys.secrets_keys[0] if keys.secrets_keys else keys.page_token_secret)
    control_plane = _control_plane(settings, grpc_port)
    admin = InstanceAdminClient(tokens, breakers=infra.breakers)
    insight = ProxyInsight(infra.db, infra.lister, admin, infra.clock)
    provisioner = _provisioner(settings, control_plane)
    loop = None
    if provisioner is not None:
        leader = Leadership(infra.db.engine, "proxy-fleet")
        loop = ProxyFleetLoop(upkeep, provisioner, admin, tokens, leader=leader)
    lookups = Counter(
        "tunnelplane_cache_requests",
        "Cache lookups by cache and result (hit, miss).",
        ["cache", "result"],
        registry=infra.registry,
    )
    tunnel_cache = TunnelCache(
        infra.db, settings.cache_ttl, lambda result: lookups.labels("tunnels", result).inc()
    )
    events.local_bus.listen(tunnel_cache.hear)
    return ProxiesArea(
        ProxyAccess(
            tunnel_cache, tunnels.shares, BasicCheck(identity.hasher, identity.basic_throttle)
        ),
        fleet,
        upkeep,
        insight,
        _embedded(settings, control_plane),
        loop,
    )


def _provisioner(settings: Settings, control_plane: Callable[[], str]) -> Provisioner | None:
    """The provisioner the settings name; None when users' proxies do not run here."""
    if settings.proxy_provisioner == "kubernetes":
        return KubernetesProvisioner(
            settings.kubernetes_namespace,
            settings.proxy_image,
            settings.kubernetes_control_plane,
            public_domain=settings.public_domain,
            redis_url=settings.redis_url,
            redis_prefix=settings.redis_prefix,
        )
    if settings.proxy_provisioner == "local" and settings.workers == 1:
        return LocalProvisioner(
            LocalSettings(
                control_plane=control_plane,
                host=settings.proxy_host,
                public_domain=settings.public_domain,
                control_plane_ca=settings.tls_cert_file or "",
                redis_url=settings.redis_url,
                redis_prefix=settings.redis_prefix,
            )
        )
    return None


def _control_plane(settings: Settings, grpc_port: Callable[[], int]) -> Callable[[], str]:
    """How children reach this server's gRPC port (bound to all addresses: loopback)."""
    host = "127.0.0.1" if settings.grpc_host in {"0.0.0.0", ""} else settings.grpc_host  # noqa: S104
    if ":" in host:
        host = f"[{host}]"
    return lambda: f"{host}:{grpc_port()}"


def _embedded(settings: Settings, control_plane: Callable[[], str]) -> EmbeddedProxy | None:
    if not settings.proxy_port or settings.workers > 1:
        return None
    return EmbeddedProxy(
        host=settings.proxy_host,
        port=settings.proxy_port,
        link_port=settings.proxy_link_port,
        public_domain=settings.public_domain,
        control_plane=control_plane,
        control_plane_ca=settings.tls_cert_file or "",
    )
