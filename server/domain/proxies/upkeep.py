"""What the fleet loop does to proxies: record where their instances are and what checks
say, move their state to match, restart, stop the idle ones and scale on load.

Called by :mod:`server.workers.proxy_fleet` (the only writer of instances' bookkeeping);
each step is one unit of work, state changes with their events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from server.domain.common.clock import Clock
from server.domain.common.ids import new_id
from server.domain.proxies import config as configs
from server.domain.proxies.fleet import ProxyFleet
from server.domain.proxies.lifecycle import checked, idle, move, settle, snapshot
from server.domain.proxies.model import (
    Instance,
    Proxy,
    ProxyState,
    ScalingEvent,
    ScalingTrigger,
    Transition,
)
from server.domain.unit_of_work import UnitOfWork, UnitOfWorkFactory


@dataclass(frozen=True, slots=True)
class Check:
    """One instance's answer to a health check."""

    ok: bool
    degraded: bool = False
    error: str = ""
    #: What the instance says of itself (when it answered).
    cpu_percent: float = -1.0
    streams: int = 0
    last_request: datetime | None = None


class ProxyUpkeep:
    """The fleet loop's changes to proxies."""

    def __init__(self, uow: UnitOfWorkFactory, fleet: ProxyFleet, clock: Clock) -> None:
        self._uow = uow
        self._fleet = fleet
        self._clock = clock

    async def active(self) -> list[Proxy]:
        """Every proxy the loop has work for (not stopped or failed)."""
        async with self._uow(readonly=True) as uow:
            return await uow.proxies.active()

    async def placed(self, proxy_id: str, placed: Sequence[Instance]) -> Proxy | None:
        """Record where the provisioner has the instances now, keeping each known one's
        check history; None if the proxy is gone."""
        async with self._uow() as uow:
            proxy = await uow.proxies.get(proxy_id, lock=True)
            if proxy is None:
                return None
            known = {i.id: i for i in proxy.instances}
            instances = tuple(_merged(known.get(p.id), p) for p in placed)
            if instances != proxy.instances:
                await uow.proxies.save_instances(proxy.id, instances, proxy.last_active_time)
                proxy = replace(proxy, instances=instances)
            for instance in instances:
                before = known.get(instance.id)
                if before is not None and instance.restarts > before.restarts:
                    payload = snapshot(proxy) | {
                        "instance": instance.id,
                        "restarts": instance.restarts,
                    }
                    await self._fleet.event(uow, "proxy.instance_restarted", proxy, "", payload)
            return await self._settle(uow, proxy)

    async def checked(self, proxy_id: str, checks: Mapping[str, Check]) -> Proxy | None:
        """Count each instance's check and move the proxy's state to match."""
        now = self._clock.now()
        async with self._uow() as uow:
            proxy = await uow.proxies.get(proxy_id, lock=True)
            if proxy is None:
                return None
            instances = tuple(_counted(i, checks.get(i.id), now) for i in proxy.instances)
            served = [c.last_request for c in checks.values() if c.last_request is not None]
            last_active = max([proxy.last_active_time, *served])
            await uow.proxies.save_instances(proxy.id, instances, last_active)
            proxy = replace(proxy, instances=instances, last_active_time=last_active)
            return await self._settle(uow, proxy)

    async def stopped(self, proxy_id: str) -> None:
        """A stopping proxy's instances are gone: ``stopped``."""
        await self._move(proxy_id, Transition.STOPPED, None)

    async def failed(self, proxy_id: str, reason: str) -> None:
        """The provisioner gave up on the proxy: ``failed``."""
        await self._move(proxy_id, Transition.FAIL, reason)

    async def stop_if_idle(self, proxy: Proxy) -> bool:
        """Stop ``proxy`` if it has served nothing for its idle time; whether it did."""
        if not idle(proxy, self._clock.now()):
            return False
        reason = f"idle for {proxy.config.idle_stop:.0f} s"
        return await self._move(proxy.id, Transition.STOP, reason)

    async def autoscale(self, proxy_id: str, load: configs.Load) -> ScalingEvent | None:
        """Decide on ``load``; record the decision (applied unless the policy is a dry run)
        and return it; None when nothing is to change."""
        now = self._clock.now()
        async with self._uow() as uow:
            proxy = await uow.proxies.get(proxy_id, lock=True)
            if proxy is None or not proxy.active or proxy.state is ProxyState.PROVISIONING:
                return None
            policy = proxy.config.scaling
            last = await uow.proxies.last_scaling(proxy.id, applied_only=not policy.dry_run)
            decision = configs.on_load(policy, proxy.desired_instances, load, last, now)
            if decision is None:
                return None
            event = ScalingEvent(
                id=new_id("pse", now.timestamp()),
                proxy_id=proxy.id,
                trigger=ScalingTrigger.LOAD,
                from_instances=proxy.desired_instances,
                to_instances=decision.to_instances,
                applied=not policy.dry_run,
                reason=decision.reason,
                cpu_percent=load.cpu_percent,
                streams=load.streams,
                create_time=now,
            )
            await uow.proxies.add_scaling_event(event)
            if event.applied:
                changed = replace(proxy, desired_instances=event.to_instances, update_time=now)
                await self._fleet.save(uow, proxy, changed, "")
            return event

    async def _move(self, proxy_id: str, transition: Transition, reason: str | None) -> bool:
        async with self._uow() as uow:
            proxy = await uow.proxies.get(proxy_id, lock=True)
            if proxy is None:
                return False
            return await self._apply(uow, proxy, transition, reason) is not proxy

    async def _settle(self, uow: UnitOfWork, proxy: Proxy) -> Proxy:
        verdict = settle(proxy, self._clock.now())
        if verdict is None:
            return proxy
        return await self._apply(uow, proxy, *verdict)

    async def _apply(
        self, uow: UnitOfWork, proxy: Proxy, transition: Transition, reason: str | None
    ) -> Proxy:
        """Move ``proxy`` by ``transition`` with ``reason`` (None: the one it has)."""
        target = move(proxy.state, transition)
        if target is None:
            return proxy
        now = self._clock.now()
        why = proxy.state_reason if reason is None else reason
        changed = replace(proxy, state=target, state_reason=why, state_time=now, update_time=now)
        if target is ProxyState.STOPPED:
            changed = replace(changed, instances=())
        return await self._fleet.save(uow, proxy, changed, "")


def _merged(known: Instance | None, placed: Instance) -> Instance:
    """A placed instance with the check history of the one of that id, if any; one that
    started again since (the provisioner replaced a dead process) starts its checks over
    and counts a restart."""
    if known is None:
        return placed
    again = (
        placed.start_time is not None
        and known.start_time is not None
        and placed.start_time > known.start_time
    )
    if again:
        return replace(placed, restarts=known.restarts + 1)
    return replace(
        known,
        public_url=placed.public_url,
        link_address=placed.link_address,
        admin_url=placed.admin_url,
    )


def _counted(instance: Instance, check: Check | None, now: datetime) -> Instance:
    if check is None:
        return instance
    return checked(instance, now, ok=check.ok, degraded=check.degraded, error=check.error)
