"""Tunnel rules: the state machine, health, names, and what a valid configuration is.

Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from server.domain.common import validation
from server.domain.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreconditionViolation,
    QuotaViolation,
    ResourceExhausted,
    Violations,
)
from server.domain.common.ids import is_id
from server.domain.common.listing import FilterField, ListSpec, OrderKey
from server.domain.common.names import user_id_of
from server.domain.identity.model import Principal, Tier, TierLimits
from server.domain.limits.rules import month_bounds
from server.domain.tunnels.endpoints import choose_active, next_best, validate_endpoints
from server.domain.tunnels.model import (
    EndpointHealth,
    EndpointSpec,
    Status,
    Transition,
    Tunnel,
    TunnelConfig,
    TunnelDraft,
    TunnelHealth,
    TunnelState,
)
from server.domain.tunnels.web_access import check_web_access

MAX_NAME = 255
MAX_DESCRIPTION = 1000
MIN_IDLE_TIMEOUT, MAX_IDLE_TIMEOUT = 1.0, 3600.0
#: How an owner's tunnels may be filtered and ordered.
TUNNEL_LIST_SPEC = ListSpec(
    filter_fields={
        "display_name": FilterField("string"),
        "state": FilterField("enum", frozenset(s.value for s in TunnelState)),
        "health": FilterField("enum", frozenset(h.value for h in TunnelHealth)),
        "create_time": FilterField("timestamp"),
        "update_time": FilterField("timestamp"),
    },
    order_fields=frozenset({"display_name", "create_time", "update_time"}),
    default_order=(OrderKey("create_time"),),
)


def transition(  # noqa: PLR0911 - one return per edge of the machine reads best
    status: Status, event: Transition, *, agents: int, reason: str = ""
) -> Status:
    """The status after ``event``; ``FailedPrecondition`` naming the state if illegal.

    ``created → connecting → connected ⇄ disconnected``, any state → ``error``; stop
    brings a started tunnel to ``disconnected``. Agent comings and goings only move a
    running tunnel. Every move into ``disconnected`` or ``error`` says why (``reason``, or
    a default); a start, or an agent connecting, clears the reason.
    """
    state = status.state
    if event is Transition.FAIL:
        return Status(TunnelState.ERROR, status.running, reason or "failed")
    if event is Transition.START:
        if status.running and state is not TunnelState.ERROR:
            raise _illegal(state, event)
        return Status(TunnelState.CONNECTED if agents else TunnelState.CONNECTING, running=True)
    if event is Transition.STOP:
        if not status.running and state is not TunnelState.ERROR:
            raise _illegal(state, event)
        return Status(TunnelState.DISCONNECTED, running=False, reason=reason or "stopped")
    if not status.running or state is TunnelState.ERROR:
        return status  # agents of a stopped or failed tunnel change nothing
    if event is Transition.AGENT_UP:
        return replace(status, state=TunnelState.CONNECTED, reason="")
    if state is TunnelState.CONNECTED:  # AGENT_DOWN
        return Status(TunnelState.DISCONNECTED, running=True, reason=reason or "no agent is left")
    return status


#: Every (from, to) pair the machine can produce; anything else is a bug.
LEGAL = frozenset(
    {
        (TunnelState.CREATED, TunnelState.CONNECTING),
        (TunnelState.CREATED, TunnelState.CONNECTED),
        (TunnelState.CONNECTING, TunnelState.CONNECTED),
        (TunnelState.CONNECTING, TunnelState.DISCONNECTED),
        (TunnelState.CONNECTED, TunnelState.DISCONNECTED),
        (TunnelState.DISCONNECTED, TunnelState.CONNECTING),
        (TunnelState.DISCONNECTED, TunnelState.CONNECTED),
        (TunnelState.ERROR, TunnelState.CONNECTING),
        (TunnelState.ERROR, TunnelState.CONNECTED),
        (TunnelState.ERROR, TunnelState.DISCONNECTED),
    }
    | {(s, TunnelState.ERROR) for s in TunnelState}
)


def _illegal(state: TunnelState, event: Transition) -> FailedPrecondition:
    return FailedPrecondition(
        f"cannot {event.value} a tunnel that is {state.value}",
        [PreconditionViolation("STATE", "tunnel", f"the tunnel is {state.value}")],
        reason="ILLEGAL_TRANSITION",
        metadata={"state": state.value, "transition": event.value},
    )


def stop_reason(owner_id: str, actor: str) -> str:
    """What a stopped tunnel's ``state_reason`` says: who stopped it."""
    by = "the owner" if actor == f"users/{owner_id}" else actor
    return f"stopped by {by}" if by else "stopped"


def health_of(
    running: bool, connected: int, lost: int, endpoints: list[EndpointHealth]
) -> TunnelHealth:
    """Health from the agents and the endpoints: unknown until the tunnel is started and an
    agent has connected to it (healthy endpoints carry nothing without an agent)."""
    if not running or (connected == 0 and lost == 0):
        return TunnelHealth.UNKNOWN
    if connected == 0:
        return TunnelHealth.DOWN
    by_endpoints = _endpoints(endpoints) if endpoints else TunnelHealth.HEALTHY
    if by_endpoints is TunnelHealth.DOWN:
        return TunnelHealth.DOWN
    if lost or by_endpoints is TunnelHealth.DEGRADED:
        return TunnelHealth.DEGRADED
    return by_endpoints


def _endpoints(endpoints: list[EndpointHealth]) -> TunnelHealth:
    if all(h is EndpointHealth.UNHEALTHY for h in endpoints):
        return TunnelHealth.DOWN
    if any(h is EndpointHealth.UNHEALTHY for h in endpoints):
        return TunnelHealth.DEGRADED
    if all(h is EndpointHealth.UNKNOWN for h in endpoints):
        return TunnelHealth.UNKNOWN
    return TunnelHealth.HEALTHY


def probe_now(tunnel: Tunnel) -> Tunnel:
    """The tunnel with every endpoint due for a probe at once (a start: endpoints of a
    tunnel that is not started are not probed, so what is known of them may be old)."""
    endpoints = tuple(replace(e, next_probe_time=None) for e in tunnel.endpoints)
    return replace(tunnel, endpoints=endpoints)


def tunnel_parts(
    name: str, field_name: str, caller_id: str | None, *, suffix: str = ""
) -> tuple[str, str]:
    """(owner id, tunnel id) of ``users/{user}/tunnels/{tunnel}{suffix}``."""
    parts = name.split("/")
    tail = suffix.strip("/").split("/") if suffix else []
    if len(parts) != 4 + len(tail) or parts[2] != "tunnels" or parts[4:] != tail:
        raise InvalidArgument.single(
            field_name, f"must look like users/{{user}}/tunnels/{{tunnel}}{suffix}"
        )
    owner = user_id_of("/".join(parts[:2]), field_name, caller_id)
    if not is_id(parts[3], "tun"):
        raise InvalidArgument.single(field_name, "is not a valid tunnel id")
    return owner, parts[3]


def owned(tunnel: Tunnel | None, owner_id: str, tunnel_id: str) -> Tunnel:
    """``tunnel`` if it is there and ``owner_id``'s; ``NotFound`` naming it otherwise."""
    if tunnel is None or tunnel.user_id != owner_id:
        raise NotFound("tunnel", f"users/{owner_id}/tunnels/{tunnel_id}")
    return tunnel


def carried_tunnel(principal: Principal, name: str, field: str) -> tuple[str, str]:
    """(owner id, tunnel id) of the tunnel ``name`` that an agent key may carry (serve, or
    link to proxies for): its owner's own, and the one it is bound to if it is bound;
    ``PermissionDenied`` otherwise. Whether the tunnel exists is the caller's to check."""
    owner_id, tunnel_id = tunnel_parts(name, field, principal.user_id)
    if owner_id != principal.user_id:
        raise PermissionDenied("an agent key carries its owner's tunnels only", reason="NOT_OWNER")
    if principal.bound_tunnel and principal.bound_tunnel != tunnel_id:
        raise PermissionDenied(
            "this agent key is bound to another tunnel", reason="KEY_BOUND_TO_ANOTHER_TUNNEL"
        )
    return owner_id, tunnel_id


def carrying(tunnel: Tunnel) -> bool:
    """Whether the tunnel should carry traffic: started by its owner and not failed."""
    return tunnel.status.running and tunnel.state is not TunnelState.ERROR


def check_text(display_name: str, description: str, violations: Violations) -> tuple[str, str]:
    """The cleaned name (1-255 characters) and description (at most 1000)."""
    name = validation.display_name(display_name, "tunnel.display_name", violations, MAX_NAME)
    text = validation.free_text(description, "tunnel.description", violations, MAX_DESCRIPTION)
    return name, text


def check_config(config: TunnelConfig, limits: TierLimits, violations: Violations) -> TunnelConfig:
    """The config cleaned: max connections within the tier's limit, timeout within bounds,
    web access as :func:`~server.domain.tunnels.web_access.check_web_access` says."""
    prefix = "tunnel.config."
    tier_max = limits.max_concurrent_connections
    if config.max_connections < 0:
        violations.add(prefix + "max_connections", "must not be negative")
    elif tier_max >= 0 and config.max_connections > tier_max:
        violations.add(
            prefix + "max_connections", f"the tier allows at most {tier_max} connections"
        )
    if not MIN_IDLE_TIMEOUT <= config.idle_timeout <= MAX_IDLE_TIMEOUT:
        violations.add(prefix + "idle_timeout", "must be between 1 s and 1 h")
    return check_web_access(config, prefix, violations)


def draft_of(tunnel: Tunnel) -> TunnelDraft:
    """The writable part of a stored tunnel."""
    return TunnelDraft(
        tunnel.display_name,
        tunnel.description,
        tunnel.config,
        tuple(e.spec for e in tunnel.endpoints),
    )


def snapshot(tunnel: Tunnel) -> dict[str, Any]:
    """What an event says about a tunnel."""
    return {
        "name": tunnel.name,
        "display_name": tunnel.display_name,
        "state": tunnel.state.value,
        "health": tunnel.health.value,
        "active_endpoint": tunnel.active_endpoint,
        "endpoints": [{"url": e.spec.url, "health": e.health.value} for e in tunnel.endpoints],
    }


def refreshed(tunnel: Tunnel) -> Tunnel:
    """Health and active endpoint recomputed from agents and endpoint health."""
    health = health_of(
        tunnel.status.running,
        tunnel.connected_agents,
        tunnel.lost_agents,
        [e.health for e in tunnel.endpoints],
    )
    return replace(tunnel, health=health, active_endpoint=active_endpoint(tunnel))


def active_endpoint(tunnel: Tunnel) -> str:
    """The URL traffic goes to: the best healthy endpoint, or the current one while it
    stays healthy and of the best priority ("" when none is healthy)."""
    chosen = choose_active([(e.spec, e.health) for e in tunnel.endpoints], tunnel.id)
    if chosen is None:
        return ""
    current = next((e for e in tunnel.endpoints if e.spec.url == tunnel.active_endpoint), None)
    # A manual choice sticks while its endpoint stays healthy and of the best priority.
    if (
        current is not None
        and current.health is not EndpointHealth.UNHEALTHY
        and current.spec.priority <= chosen.priority
    ):
        return current.spec.url
    return chosen.url


def failover_target(tunnel: Tunnel, url: str, *, force: bool) -> str:
    """The endpoint a failover switches to: ``url`` (healthy, unless ``force``), or else
    the next best one; ``FailedPrecondition`` if there is none."""
    pairs = [(e.spec, e.health) for e in tunnel.endpoints]
    if url:
        found = next((e for e in tunnel.endpoints if e.spec.url == url), None)
        if found is None:
            raise InvalidArgument.single("endpoint", "is not one of the tunnel's endpoints")
        if found.health is EndpointHealth.UNHEALTHY and not force:
            raise _no_endpoint("the endpoint is unhealthy; use force to switch anyway")
        return url
    chosen = next_best(pairs, tunnel.id, tunnel.active_endpoint)
    if chosen is None:
        raise _no_endpoint("no other endpoint is healthy")
    return chosen.url


def _no_endpoint(message: str) -> FailedPrecondition:
    return FailedPrecondition(
        message,
        [PreconditionViolation("HEALTH", "endpoint", message)],
        reason="NO_HEALTHY_ENDPOINT",
    )


def check_etag(tunnel: Tunnel, etag: str, field: str) -> None:
    """``Aborted`` if ``etag`` is given and is not the tunnel's (AIP-154)."""
    if etag and etag != tunnel.etag:
        raise Aborted(
            "the tunnel changed since it was read; read it again",
            reason="ETAG_MISMATCH",
            metadata={"field": field},
        )


def change_events(before: Tunnel, after: Tunnel) -> list[tuple[str, dict[str, Any]]]:
    """The events (type, payload) a change from ``before`` to ``after`` makes:
    ``tunnel.status_changed``, ``tunnel.failover``, ``tunnel.health_changed`` as they apply."""
    events: list[tuple[str, dict[str, Any]]] = []
    if before.state is not after.state:
        change = {"from": before.state.value, "to": after.state.value}
        reason = {"reason": after.status.reason}
        events.append(("tunnel.status_changed", snapshot(after) | change | reason))
    # Traffic moved from one endpoint to another. Losing the last healthy one is no
    # failover (there is no "to"): the health change says the tunnel is down.
    if before.active_endpoint and after.active_endpoint not in ("", before.active_endpoint):
        change = {"from": before.active_endpoint, "to": after.active_endpoint}
        events.append(("tunnel.failover", snapshot(after) | change | {"reason": "health"}))
    if before.health is not after.health:
        change = {"from": before.health.value, "to": after.health.value}
        events.append(("tunnel.health_changed", snapshot(after) | change))
    return events


def check_draft(
    draft: TunnelDraft,
    tier: Tier,
    limits: TierLimits,
    features: tuple[str, ...],
    *,
    max_endpoints: int,
) -> TunnelDraft:
    """The draft cleaned, within ``tier``'s limits and features; :class:`InvalidArgument`
    naming every bad field, or :class:`PermissionDenied` for a feature the tier lacks."""
    violations = Violations()
    name, description = check_text(draft.display_name, draft.description, violations)
    config = check_config(draft.config, limits, violations)
    endpoints: list[EndpointSpec] = []
    try:
        endpoints = validate_endpoints(list(draft.endpoints), max_endpoints=max_endpoints)
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    violations.raise_if_any()
    if len(endpoints) > 1 and "endpoint_failover" not in features:
        raise PermissionDenied(
            "several endpoints (failover) need the premium tier or higher",
            reason="TIER_TOO_LOW",
            metadata={"feature": "endpoint_failover", "tier": tier.value},
        )
    return TunnelDraft(name, description, config, tuple(endpoints))


def tunnels_exhausted(owner_id: str, tier: Tier, limit: int) -> ResourceExhausted:
    """The refusal of a tunnel over the tier's ``limit`` of tunnels."""
    return ResourceExhausted(
        f"the {tier.value} tier allows {limit} tunnels",
        violations=[
            QuotaViolation(
                f"users/{owner_id}",
                f"at most {limit} tunnels on the {tier.value} tier",
                quota_id="Tunnels",
                quota_metric="tunnelplane.v1/tunnels",
                quota_value=limit,
            )
        ],
        reason="TUNNEL_QUOTA_EXCEEDED",
    )


def transfer_exhausted(owner_id: str, tier: Tier, limit: int, now: datetime) -> ResourceExhausted:
    """The refusal once the month's transfer (``limit`` bytes) is used up; retry next month."""
    return ResourceExhausted(
        "the monthly transfer quota is used up",
        retry_after=(month_bounds(now)[1] - now).total_seconds(),
        violations=[
            QuotaViolation(
                f"users/{owner_id}",
                f"{limit} bytes per month on the {tier.value} tier",
                quota_id="TransferPerMonth",
                quota_metric="tunnelplane.v1/transfer_bytes",
                quota_value=limit,
            )
        ],
        reason="TRANSFER_QUOTA_EXCEEDED",
    )


def stream_time_exhausted(
    owner_id: str, tier: Tier, limit: int, now: datetime
) -> ResourceExhausted:
    """The refusal once the month's stream time (``limit`` seconds) is used up."""
    return ResourceExhausted(
        "the monthly stream time quota is used up",
        retry_after=(month_bounds(now)[1] - now).total_seconds(),
        violations=[
            QuotaViolation(
                f"users/{owner_id}",
                f"{limit} stream seconds per month on the {tier.value} tier",
                quota_id="StreamSecondsPerMonth",
                quota_metric="tunnelplane.v1/stream_seconds",
                quota_value=limit,
            )
        ],
        reason="STREAM_TIME_QUOTA_EXCEEDED",
    )
