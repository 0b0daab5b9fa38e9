"""The fleet loop: makes users' proxies' instances match what is stored, and keeps them
healthy.

Each round, for every proxy not stopped or failed: a stopping one has its instances
removed and becomes ``stopped``; otherwise the provisioner is asked to run the desired
count (idempotent), and when checks are due each instance's admin side is asked for its
health and load, a config it does not have yet is pushed to it, unhealthy instances are
restarted after their back-off, an idle proxy is stopped and the autoscaler decides.
Checks run every second while an instance is not yet healthy, then at the config's
period; between checks the provisioner is asked again only when what it must run has
changed (a new count or config), so a quiet proxy costs nothing per round. Proxies are
tended concurrently; one failing does not hold up the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Protocol

from server.domain.proxies.config import Load
from server.domain.proxies.lifecycle import restart_due
from server.domain.proxies.model import Instance, InstanceHealth, Pool, Proxy, ProxyState
from server.domain.proxies.ports import Provisioner
from server.domain.proxies.upkeep import Check, ProxyUpkeep
from server.provision.admin import AdminError, InstanceAdminClient
from server.workers.supervisor import Backoff, Loop

log = logging.getLogger("tunnelplane.workers.proxy_fleet")


class Leader(Protocol):
    """Whether this replica runs the fleet (one at a time does)."""

    async def hold(self) -> bool: ...
    async def release(self) -> None: ...


#: Check period while an instance is coming up (or down).
FAST_CHECKS = 1.0


class ProxyFleetLoop:
    """One round of the fleet loop per :meth:`step`."""

    def __init__(
        self,
        upkeep: ProxyUpkeep,
        provisioner: Provisioner,
        admin: InstanceAdminClient,
        token: Callable[[str], str],
        clock: Callable[[], float] = time.monotonic,
        *,
        leader: Leader | None = None,
    ) -> None:
        self._leader = leader
        self._upkeep = upkeep
        self._provisioner = provisioner
        self._admin = admin
        self._token = token
        self._clock = clock
        self._next_check: dict[str, float] = {}
        #: The pool last applied per proxy: applying again is only needed when it changes,
        #: or when checks are due (to place again what died).
        self._applied: dict[str, Pool] = {}

    async def step(self) -> float | None:
        """Tend every proxy once, if this replica leads the fleet."""
        if self._leader is not None and not await self._leader.hold():
            # Another replica tends them; start afresh on taking over.
            self._next_check.clear()
            self._applied.clear()
            return None
        proxies = await self._upkeep.active()
        live = {p.id for p in proxies}
        for stale in set(self._next_check) - live:
            del self._next_check[stale]
        for stale in set(self._applied) - live:
            del self._applied[stale]
        await asyncio.gather(*(self._guarded(p) for p in proxies))
        return None

    async def close(self) -> None:
        """Stop every instance and let go of the HTTP pool."""
        await self._provisioner.close()
        await self._admin.close()
        if self._leader is not None:
            await self._leader.release()

    async def _guarded(self, proxy: Proxy) -> None:
        try:
            await self.tend(proxy)
        except Exception:
            log.exception("tending a proxy failed", extra={"proxy": proxy.name})

    async def tend(self, proxy: Proxy) -> None:
        """One round for one proxy."""
        if proxy.state is ProxyState.STOPPING:
            await self._provisioner.remove(proxy.id)
            self._applied.pop(proxy.id, None)
            await self._upkeep.stopped(proxy.id)
            return
        pool = Pool(
            proxy.id, proxy.user_id, proxy.desired_instances, proxy.config, proxy.config_version
        )
        due = self._clock() >= self._next_check.get(proxy.id, 0.0)
        if not due and self._applied.get(proxy.id) == pool:
            return  # nothing asked of the provisioner has changed, and no check is due
        placed = await self._provisioner.apply(pool, self._token(proxy.id))
        self._applied[proxy.id] = pool
        current = await self._upkeep.placed(proxy.id, placed)
        if current is None or not await self._alive(current) or not due:
            return
        checks = await self._check_all(current)
        current = await self._upkeep.checked(proxy.id, checks)
        if current is None or not await self._alive(current):
            return
        self._schedule(current)
        await self._restart_unhealthy(current)
        if await self._upkeep.stop_if_idle(current):
            return
        answered = [c for c in checks.values() if c.ok]
        cpu = [c.cpu_percent for c in answered if c.cpu_percent >= 0]
        load = Load(sum(cpu) / len(cpu) if cpu else -1.0, sum(c.streams for c in answered))
        event = await self._upkeep.autoscale(proxy.id, load)
        if event is not None:
            log.info("proxy scaling decision", extra={"proxy": proxy.name,
                     "to": event.to_instances, "applied": event.applied})  # fmt: skip

    async def _alive(self, proxy: Proxy) -> bool:
        """Whether the proxy still runs; a failed one has its instances removed."""
        if proxy.state is ProxyState.FAILED:
            await self._provisioner.remove(proxy.id)
            self._applied.pop(proxy.id, None)
            return False
        return proxy.active

    def _schedule(self, proxy: Proxy) -> None:
        settling = proxy.state is ProxyState.PROVISIONING or any(
            i.health is not InstanceHealth.HEALTHY for i in proxy.instances
        )
        period = FAST_CHECKS if settling else proxy.config.health_check_interval
        self._next_check[proxy.id] = self._clock() + period

    async def _restart_unhealthy(self, proxy: Proxy) -> None:
        now = datetime.now(UTC)
        due = [i for i in proxy.instances if restart_due(i, now)]
        for instance in due:
            facts = {"proxy": proxy.name, "instance": instance.id, "error": instance.last_error}
            log.warning("restarting an unhealthy proxy instance", extra=facts)
            await self._provisioner.restart(proxy.id, instance.id)
        if due:
            await self._upkeep.placed(proxy.id, await self._provisioner.instances(proxy.id))

    async def _check_all(self, proxy: Proxy) -> dict[str, Check]:
        results = await asyncio.gather(*(self._check(proxy, i) for i in proxy.instances))
        return {i.id: r for i, r in zip(proxy.instances, results, strict=True)}

    async def _check(self, proxy: Proxy, instance: Instance) -> Check:
        """Ask one instance for its health; push the proxy's config if it has an older one."""
        limit = proxy.config.health_check_timeout
        try:
            health = await self._admin.get(proxy, instance, "/_proxy/health", limit)
            if health.get("config_version") != proxy.config_version:
                body = {"version": proxy.config_version, "config": asdict(proxy.config)}
                await self._admin.put(proxy, instance, "/_proxy/config", body, limit)
                facts = {"proxy": proxy.name, "instance": instance.id,
                         "config_version": proxy.config_version}  # fmt: skip
                log.info("proxy config pushed", extra=facts)
        except AdminError as exc:
            return Check(ok=False, error=f"health check failed: {exc}")
        last = health.get("last_request_time")
        try:
            return Check(
                ok=True,
                degraded=health.get("status") != "SERVING",
                cpu_percent=float(health.get("cpu_percent", -1.0)),
                streams=int(health.get("streams", 0)),
                last_request=datetime.fromtimestamp(float(last), UTC) if last else None,
            )
        except (TypeError, ValueError, OverflowError):
            return Check(ok=False, error="health check failed: an answer that does not parse")


def fleet_loop(loop: ProxyFleetLoop) -> Loop:
    """The supervised loop: a round a second; stopping it stops every instance."""
    return Loop("proxy-fleet", loop.step, 1.0, drain=loop.close, backoff=Backoff(cap=10.0))
