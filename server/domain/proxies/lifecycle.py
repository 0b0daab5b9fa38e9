"""How a proxy's state and its instances' health change. Pure functions, no I/O.

A proxy is ``provisioning`` until every instance it should have is healthy, then
``running``; an instance that fails its checks (or goes missing) makes it ``degraded``
until it is healthy again. Stopping goes through ``stopping`` to ``stopped``; anything but
``stopped`` may end in ``failed``. Both end states are final. An instance is unhealthy
after :data:`UNHEALTHY_AFTER` failed checks in a row and healthy after
:data:`HEALTHY_AFTER` good ones; an unhealthy instance is restarted with a back-off, at
most :data:`MAX_RESTARTS` times in a row before the proxy fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from server.domain.proxies.model import (
    ACTIVE_STATES,
    CHECKS_KEPT,
    HealthCheck,
    Instance,
    InstanceHealth,
    Proxy,
    ProxyState,
    Transition,
)

S, T = ProxyState, Transition
#: Every legal move; a transition missing from a state's row is refused.
MOVES: Mapping[ProxyState, Mapping[Transition, ProxyState]] = {
    S.PROVISIONING: {T.READY: S.RUNNING, T.STOP: S.STOPPING, T.FAIL: S.FAILED},
    S.RUNNING: {T.DEGRADE: S.DEGRADED, T.STOP: S.STOPPING, T.FAIL: S.FAILED},
    S.DEGRADED: {T.READY: S.RUNNING, T.STOP: S.STOPPING, T.FAIL: S.FAILED},
    S.STOPPING: {T.STOPPED: S.STOPPED, T.FAIL: S.FAILED},
    S.STOPPED: {},
    S.FAILED: {},
}
#: The state changes :data:`MOVES` allows, as (from, to) pairs.
LEGAL = frozenset((a, b) for a, row in MOVES.items() for b in row.values())

UNHEALTHY_AFTER, HEALTHY_AFTER = 3, 2
#: Restarts of one instance, in a row without a healthy spell, before the proxy fails.
MAX_RESTARTS = 5
#: Longest wait before an unhealthy instance is restarted again, s.
MAX_BACKOFF = 60.0
#: How long a proxy may stay ``provisioning`` before it fails.
PROVISIONING_DEADLINE = timedelta(minutes=3)


#: Instance health that makes a running proxy degraded (one coming up does not).
FAILING = frozenset({InstanceHealth.UNHEALTHY, InstanceHealth.DEGRADED})


def move(state: ProxyState, transition: Transition) -> ProxyState | None:
    """The state ``transition`` leads to from ``state``; None when it is not allowed."""
    return MOVES[state].get(transition)


def checked(
    instance: Instance, now: datetime, *, ok: bool, degraded: bool = False, error: str = ""
) -> Instance:
    """``instance`` after one health check: ``ok`` (it answered), ``degraded`` (it said
    it cannot serve fully), or failed with ``error``; the check joins its history."""
    history = (*instance.checks, HealthCheck(now, ok, "" if ok else error[:300]))
    instance = replace(instance, checks=history[-CHECKS_KEPT:])
    if ok:
        successes = instance.successes + 1
        health = instance.health
        if successes >= HEALTHY_AFTER or instance.health is InstanceHealth.HEALTHY:
            health = InstanceHealth.DEGRADED if degraded else InstanceHealth.HEALTHY
        restarts = 0 if health is InstanceHealth.HEALTHY else instance.restarts
        return replace(
            instance,
            health=health,
            successes=successes,
            failures=0,
            restarts=restarts,
            last_check_time=now,
            last_error="",
        )
    failures = instance.failures + 1
    health = InstanceHealth.UNHEALTHY if failures >= UNHEALTHY_AFTER else instance.health
    return replace(
        instance,
        health=health,
        failures=failures,
        successes=0,
        last_check_time=now,
        last_error=error[:300],
    )


def backoff(restarts: int) -> float:
    """Seconds to wait before the next restart of an instance restarted ``restarts``
    times in a row: 1, 2, 4 ... up to :data:`MAX_BACKOFF`."""
    return float(min(MAX_BACKOFF, 2.0**restarts))


def restart_due(instance: Instance, now: datetime) -> bool:
    """Whether an unhealthy instance should be restarted now (its back-off has passed)."""
    if instance.health is not InstanceHealth.UNHEALTHY:
        return False
    since = instance.start_time or instance.last_check_time or now
    return (now - since).total_seconds() >= backoff(instance.restarts)


def gave_up(instance: Instance) -> bool:
    """Whether an instance has been restarted too often in a row to try again."""
    return instance.health is InstanceHealth.UNHEALTHY and instance.restarts >= MAX_RESTARTS


def settle(proxy: Proxy, now: datetime) -> tuple[Transition, str] | None:
    """What the instances' health says should happen to an active proxy, with the
    reason; None when nothing should. A proxy is running once as many instances as it
    should have are healthy, and degraded while one fails its checks or is missing (an
    instance still coming up, after a scale-up, degrades nothing)."""
    if proxy.state not in ACTIVE_STATES:
        return None
    if any(gave_up(i) for i in proxy.instances):
        return T.FAIL, f"an instance failed its checks after {MAX_RESTARTS} restarts"
    healthy = sum(i.health is InstanceHealth.HEALTHY for i in proxy.instances)
    if healthy >= proxy.desired_instances:
        return (T.READY, "") if proxy.state is not S.RUNNING else None
    if proxy.state is S.PROVISIONING:
        return _provisioning(proxy, now)
    failing = [i for i in proxy.instances if i.health in FAILING]
    missing = proxy.desired_instances - len(proxy.instances)
    if proxy.state is S.RUNNING and (failing or missing > 0):
        return T.DEGRADE, f"{healthy} of {proxy.desired_instances} instances healthy"
    return None


def _provisioning(proxy: Proxy, now: datetime) -> tuple[Transition, str] | None:
    """A proxy still coming up fails once it has taken too long."""
    if now - proxy.state_time <= PROVISIONING_DEADLINE:
        return None
    seconds = int(PROVISIONING_DEADLINE.total_seconds())
    return T.FAIL, f"instances did not become healthy within {seconds} s"


def idle(proxy: Proxy, now: datetime) -> bool:
    """Whether an active proxy has served nothing for its config's idle time."""
    limit = proxy.config.idle_stop
    return proxy.active and limit > 0 and (now - proxy.last_active_time).total_seconds() >= limit


def snapshot(proxy: Proxy) -> dict[str, Any]:
    """What events say about a proxy."""
    return {
        "name": proxy.name,
        "display_name": proxy.display_name,
        "state": proxy.state.value,
        "state_reason": proxy.state_reason,
        "desired_instances": proxy.desired_instances,
        "instances": len(proxy.instances),
        "config_version": proxy.config_version,
    }


#: The event a move into a state makes, where it has one of its own.
STATE_EVENTS = {
    S.STOPPED: "proxy.stopped",
    S.FAILED: "proxy.failed",
}


def change_events(before: Proxy, after: Proxy) -> list[tuple[str, dict[str, Any]]]:
    """The events (type, payload) a change from ``before`` to ``after`` makes: one for a
    move of state (``proxy.recovered`` when a degraded proxy is whole again), one for a new
    config, one for a new instance count."""
    events: list[tuple[str, dict[str, Any]]] = []
    payload = snapshot(after)
    if before.state is not after.state:
        moved = {"from": before.state.value, "to": after.state.value}
        kind = STATE_EVENTS.get(after.state, "proxy.state_changed")
        if before.state is S.DEGRADED and after.state is S.RUNNING:
            kind = "proxy.recovered"
        events.append((kind, payload | moved))
    if before.config_version != after.config_version:
        versions = {"from_version": before.config_version, "to_version": after.config_version}
        events.append(("proxy.config_changed", payload | versions))
    if before.desired_instances != after.desired_instances and after.active:
        counts = {"from": before.desired_instances, "to": after.desired_instances}
        events.append(("proxy.scaled", payload | counts))
    return events
