"""The embedded streaming proxy: one ``python -m proxy`` child process the server keeps
running (``make run`` serves tunnels' web traffic with no further step).

The loop's step starts the child and waits for it; a child that exits is an error, so
the supervisor restarts it after its back-off. On shutdown the child gets SIGTERM, then
SIGKILL if it has not exited within the grace. The child inherits stdout and stderr: its
log lines appear beside the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from server.workers.supervisor import Backoff, Loop

log = logging.getLogger("tunnelplane.workers.proxy")


class ProxyExited(RuntimeError):  # noqa: N818 - an event, the supervisor restarts it
    """The embedded proxy exited on its own."""


@dataclass(frozen=True, slots=True)
class EmbeddedProxy:
    """How to run the child: where it listens and where the control plane is."""

    host: str
    port: int
    link_port: int
    public_domain: str
    #: The control plane's gRPC address, known once the server has bound its port.
    control_plane: Callable[[], str]
    #: The control plane's certificate file when its gRPC port has TLS ("": none).
    control_plane_ca: str = ""
    stop_grace: float = 5.0

    def environment(self) -> Mapping[str, str]:
        """The child's environment: the server's, plus the proxy's settings."""
        return {
            **os.environ,
            "TP_PROXY_CONTROL_PLANE": self.control_plane(),
            "TP_PROXY_HOST": self.host,
            "TP_PROXY_PORT": str(self.port),
            "TP_PROXY_LINK_HOST": self.host,
            "TP_PROXY_LINK_PORT": str(self.link_port),
            "TP_PUBLIC_DOMAIN": self.public_domain,
            "TP_PROXY_CONTROL_PLANE_CA": self.control_plane_ca,
            "TP_PROXY_PARENT_PID": str(os.getpid()),
            "TP_PROXY_LOG_LEVEL": os.environ.get("TP_LOG_LEVEL", "INFO").upper(),
            "TP_PROXY_LOG_FORMAT": os.environ.get("TP_LOG_FORMAT", "json"),
        }

    async def run(self) -> None:
        """Run the child until it exits (:class:`ProxyExited`) or this task is cancelled."""
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", env=dict(self.environment())
        )
        log.info("embedded proxy started", extra={"pid": child.pid, "port": self.port,
                                                  "link_port": self.link_port})  # fmt: skip
        try:
            code = await child.wait()
        finally:
            if child.returncode is None:
                await self._stop(child)
        raise ProxyExited(f"the embedded proxy exited with status {code}")

    async def _stop(self, child: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(child.wait()), self.stop_grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()


def embedded_proxy_loop(proxy: EmbeddedProxy) -> Loop:
    """The loop that keeps the child running; restarts back off up to 30 s."""

    async def step() -> float | None:
        await proxy.run()
        return None  # not reached: run() returns only by raising

    return Loop("embedded-proxy", step, 1.0, backoff=Backoff(base=0.5, cap=30.0))
