"""The local-process provisioner: each instance of a proxy is a ``python -m proxy`` child
of this server, the embedded default.

Instances are slots ``{proxy}-{n}``: a child that dies is started again in its slot on the
next :meth:`apply` (the instance keeps its id; its start time moves, which the fleet loop
counts as a restart). Every child binds free ports, says which on its first line of
stdout, watches this server (``TP_PROXY_PARENT_PID``) and stops when it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from server.domain.proxies.model import Instance, Pool

log = logging.getLogger("tunnelplane.provision.local")


class StartFailedError(RuntimeError):
    """A child did not come up."""


@dataclass
class _Child:
    slot: int
    process: asyncio.subprocess.Process
    instance: Instance


@dataclass(frozen=True, slots=True)
class LocalSettings:
    """Where children listen and how they reach this server."""

    #: The control plane's gRPC address, known once the server has bound its port.
    control_plane: Callable[[], str]
    host: str = "127.0.0.1"
    public_domain: str = "localhost"
    control_plane_ca: str = ""
    #: The registry the instances share to relay requests to each other (proxy/peers.py):
    #: the server's Redis ("": none).
    redis_url: str = field(default="", repr=False)
    redis_prefix: str = "tp:"
    start_timeout: float = 20.0
    stop_grace: float = 5.0


class LocalProvisioner:
    """Runs instances as child processes on this machine."""

    kind = "local"

    def __init__(self, settings: LocalSettings) -> None:
        self._settings = settings
        self._pools: dict[str, dict[int, _Child]] = {}
        self._last: dict[str, tuple[Pool, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def apply(self, pool: Pool, admin_token: str) -> Sequence[Instance]:
        async with self._lock(pool.proxy_id):
            self._last[pool.proxy_id] = (pool, admin_token)
            children = self._alive(pool.proxy_id)
            for slot in sorted(s for s in children if s >= pool.replicas):
                await self._stop(children.pop(slot))
            missing = [s for s in range(pool.replicas) if s not in children]
            started = await asyncio.gather(
                *(self._start(pool, s, admin_token) for s in missing), return_exceptions=True
            )
            for result in started:
                if isinstance(result, _Child):
                    children[result.slot] = result
                else:
                    log.warning("proxy instance did not start", extra={
                        "proxy": pool.proxy_id, "error": str(result)})  # fmt: skip
            return [children[s].instance for s in sorted(children)]

    async def restart(self, proxy_id: str, instance_id: str) -> Instance | None:
        async with self._lock(proxy_id):
            children = self._alive(proxy_id)
            slot = next((s for s, c in children.items() if c.instance.id == instance_id), None)
            last = self._last.get(proxy_id)
            if slot is None or last is None:
                return None
            await self._stop(children.pop(slot))
            child = await self._start(last[0], slot, last[1])
            children[slot] = child
            return child.instance

    async def remove(self, proxy_id: str) -> None:
        async with self._lock(proxy_id):
            children = self._pools.pop(proxy_id, {})
            self._last.pop(proxy_id, None)
            await asyncio.gather(*(self._stop(c) for c in children.values()))

    async def instances(self, proxy_id: str) -> Sequence[Instance]:
        children = self._alive(proxy_id)
        return [children[s].instance for s in sorted(children)]

    async def close(self) -> None:
        for proxy_id in list(self._pools):
            await self.remove(proxy_id)

    def pids(self, proxy_id: str) -> dict[str, int]:
        """Each live instance's process id (tests and diagnostics)."""
        return {c.instance.id: c.process.pid for c in self._alive(proxy_id).values()}

    def _lock(self, proxy_id: str) -> asyncio.Lock:
        return self._locks.setdefault(proxy_id, asyncio.Lock())

    def _alive(self, proxy_id: str) -> dict[int, _Child]:
        children = self._pools.setdefault(proxy_id, {})
        for slot in [s for s, c in children.items() if c.process.returncode is not None]:
            del children[slot]
        return children

    def _environment(self, pool: Pool, admin_token: str) -> dict[str, str]:
        s = self._settings
        return {
            **os.environ,
            "TP_PROXY_CONTROL_PLANE": s.control_plane(),
            "TP_PROXY_CONTROL_PLANE_CA": s.control_plane_ca,
            "TP_PROXY_HOST": s.host,
            "TP_PROXY_PORT": "0",
            "TP_PROXY_LINK_HOST": s.host,
            "TP_PROXY_LINK_PORT": "0",
            "TP_PROXY_ADMIN_PORT": "0",
            "TP_PROXY_ADMIN_TOKEN": admin_token,
            "TP_PROXY_OWNER": pool.user_id,
            "TP_PROXY_CONFIG": json.dumps(asdict(pool.config)),
            "TP_PROXY_CONFIG_VERSION": str(pool.config_version),
            "TP_PUBLIC_DOMAIN": s.public_domain,
            "TP_PROXY_PARENT_PID": str(os.getpid()),
            "TP_PROXY_REDIS_URL": s.redis_url,
            "TP_PROXY_REDIS_PREFIX": s.redis_prefix,
            "TP_PROXY_LOG_LEVEL": os.environ.get("TP_LOG_LEVEL", "INFO").upper(),
            "TP_PROXY_LOG_FORMAT": os.environ.get("TP_LOG_FORMAT", "json"),
        }

    async def _start(self, pool: Pool, slot: int, admin_token: str) -> _Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            env=self._environment(pool, admin_token),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            ports = await asyncio.wait_for(_ready(process), self._settings.start_timeout)
        except BaseException:
            await self._kill(process)
            raise
        host = self._settings.host
        instance = Instance(
            id=f"{pool.proxy_id}-{slot}",
            public_url=f"http://{host}:{ports['port']}",
            link_address=f"{host}:{ports['link_port']}",
            admin_url=f"http://{host}:{ports['admin_port']}",
            start_time=datetime.now(UTC),
        )
        log.info("proxy instance started", extra={"instance": instance.id, "pid": process.pid})
        return _Child(slot, process, instance)

    async def _stop(self, child: _Child) -> None:
        process = child.process
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), self._settings.stop_grace)
        except TimeoutError:
            await self._kill(process)
        log.info("proxy instance stopped", extra={"instance": child.instance.id})

    @staticmethod
    async def _kill(process: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def _ready(process: asyncio.subprocess.Process) -> dict[str, int]:
    """The ports a child announces: ``proxy ready port=… link_port=… admin_port=…``."""
    assert process.stdout is not None
    while line := await process.stdout.readline():
        text = line.decode(errors="replace").strip()
        if text.startswith("proxy ready "):
            pairs = (part.partition("=") for part in text.split()[2:])
            return {key: int(value) for key, _, value in pairs}
    raise StartFailedError(f"the proxy exited with status {await process.wait()}")
