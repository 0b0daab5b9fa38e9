"""Proxies: the embedded streaming proxy, a child process this server keeps running, so
that ``make run`` carries tunnels' web traffic with no further step.

It runs when ``TP_PROXY_PORT`` is not 0 and the server is one process. With
``TP_WORKERS`` above 1 the workers share ports, but a proxy is a process of its own: run
``python -m proxy`` beside the group (``TP_PROXY_LINKS`` tells agents where it is).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.settings import Settings
from server.workers.embedded_proxy import EmbeddedProxy, embedded_proxy_loop
from server.workers.supervisor import Loop


@dataclass
class ProxiesArea:
    """The embedded proxy, if this process runs one."""

    embedded: EmbeddedProxy | None

    def loops(self) -> Sequence[Loop]:
        """The loop that keeps the embedded proxy running."""
        return [] if self.embedded is None else [embedded_proxy_loop(self.embedded)]

    async def aclose(self) -> None:
        """Nothing to release: the loop stops the child."""


def build(settings: Settings, grpc_port: Callable[[], int]) -> ProxiesArea:
    """The area; ``grpc_port`` gives the control plane's bound gRPC port once it is known."""
    if not settings.proxy_port or settings.workers > 1:
        return ProxiesArea(None)
    host = "127.0.0.1" if settings.grpc_host in {"0.0.0.0", ""} else settings.grpc_host  # noqa: S104
    if ":" in host:
        host = f"[{host}]"
    return ProxiesArea(
        EmbeddedProxy(
            host=settings.proxy_host,
            port=settings.proxy_port,
            link_port=settings.proxy_link_port,
            public_domain=settings.public_domain,
            control_plane=lambda: f"{host}:{grpc_port()}",
            control_plane_ca=settings.tls_cert_file or "",
        )
    )
