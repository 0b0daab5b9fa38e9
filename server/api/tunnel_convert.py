"""Tunnels, shares, usage and events between their proto and domain forms."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from google.protobuf import duration_pb2, struct_pb2
from google.type import date_pb2
from tunnelplane.v1 import common_pb2, events_pb2, tunnels_pb2

from server.api.convert import from_duration, timestamp
from server.domain.common.errors import InvalidArgument
from server.domain.events.model import Event
from server.domain.identity.model import ShareRole, Tier
from server.domain.tunnels.model import (
    DEFAULT_IDLE_TIMEOUT,
    EndpointHealth,
    EndpointSpec,
    Share,
    SharedTunnel,
    ShareLink,
    Tunnel,
    TunnelConfig,
    TunnelDraft,
    TunnelHealth,
    TunnelState,
    WebAccess,
    share_name,
)
from server.domain.tunnels.traffic import DailyUsage

P = tunnels_pb2
STATES: Mapping[TunnelState, int] = {
    TunnelState.CREATED: P.Tunnel.STATE_CREATED,
    TunnelState.CONNECTING: P.Tunnel.STATE_CONNECTING,
    TunnelState.CONNECTED: P.Tunnel.STATE_CONNECTED,
    TunnelState.DISCONNECTED: P.Tunnel.STATE_DISCONNECTED,
    TunnelState.ERROR: P.Tunnel.STATE_ERROR,
}
HEALTH: Mapping[TunnelHealth, int] = {
    TunnelHealth.UNKNOWN: P.Tunnel.HEALTH_UNKNOWN,
    TunnelHealth.HEALTHY: P.Tunnel.HEALTH_HEALTHY,
    TunnelHealth.DEGRADED: P.Tunnel.HEALTH_DEGRADED,
    TunnelHealth.DOWN: P.Tunnel.HEALTH_DOWN,
}
ENDPOINT_HEALTH: Mapping[EndpointHealth, int] = {
    EndpointHealth.UNKNOWN: P.TunnelEndpoint.HEALTH_UNKNOWN,
    EndpointHealth.HEALTHY: P.TunnelEndpoint.HEALTH_HEALTHY,
    EndpointHealth.UNHEALTHY: P.TunnelEndpoint.HEALTH_UNHEALTHY,
}
WEB_ACCESS: Mapping[WebAccess, int] = {
    WebAccess.PRIVATE: P.WEB_ACCESS_PRIVATE,
    WebAccess.PUBLIC: P.WEB_ACCESS_PUBLIC,
    WebAccess.IP_ALLOWLIST: P.WEB_ACCESS_IP_ALLOWLIST,
    WebAccess.BASIC: P.WEB_ACCESS_BASIC,
}
_WEB_ACCESS_OF = {number: access for access, number in WEB_ACCESS.items()}
TIERS: Mapping[Tier, int] = {
    Tier.FREE: common_pb2.TIER_FREE,
    Tier.PREMIUM: common_pb2.TIER_PREMIUM,
    Tier.ENTERPRISE: common_pb2.TIER_ENTERPRISE,
}


def duration(seconds: float) -> duration_pb2.Duration:
    """A Duration of ``seconds``."""
    value = duration_pb2.Duration()
    value.FromTimedelta(timedelta(seconds=seconds))
    return value


def tunnel(t: Tunnel, listen_address: str) -> tunnels_pb2.Tunnel:
    """The API form of a tunnel."""
    return P.Tunnel(
        name=t.name,
        display_name=t.display_name,
        description=t.description,
        state=STATES[t.state],  # type: ignore[arg-type]
        state_reason=t.status.reason,
        health=HEALTH[t.health],  # type: ignore[arg-type]
        config=config(t.config),
        endpoints=[
            P.TunnelEndpoint(
                url=e.spec.url,
                priority=e.spec.priority,
                weight=e.spec.weight,
                health=ENDPOINT_HEALTH[e.health],  # type: ignore[arg-type]
                last_probe_time=timestamp(e.last_probe_time),
                last_error=e.last_error,
            )
            for e in t.endpoints
        ],
        active_endpoint=t.active_endpoint,
        listen_address=listen_address,
        connected_agents=t.connected_agents,
        lost_agents=t.lost_agents,
        create_time=timestamp(t.create_time),
        update_time=timestamp(t.update_time),
        state_time=timestamp(t.state_time),
        etag=t.etag,
        owner=f"users/{t.user_id}",
    )


def config(c: TunnelConfig) -> tunnels_pb2.TunnelConfig:
    """The API form of a configuration."""
    return P.TunnelConfig(
        max_connections=c.max_connections,
        idle_timeout=duration(c.idle_timeout),
        compression=c.compression,
        web_access=WEB_ACCESS[c.web_access],  # type: ignore[arg-type]
        allowed_networks=list(c.allowed_networks),
        basic_username=c.basic_username,
        basic_password_set=bool(c.basic_password_hash),
    )


def web_access(number: int, field: str) -> WebAccess:
    """The web access a request asks for (unset: private)."""
    if number == P.WEB_ACCESS_UNSPECIFIED:
        return WebAccess.PRIVATE
    if number not in _WEB_ACCESS_OF:
        raise InvalidArgument.single(field, "must be PRIVATE, PUBLIC, IP_ALLOWLIST or BASIC")
    return _WEB_ACCESS_OF[number]


def draft(message: tunnels_pb2.Tunnel) -> TunnelDraft:
    """The writable part of a tunnel from a request."""
    c = message.config
    idle = DEFAULT_IDLE_TIMEOUT
    if c.HasField("idle_timeout"):
        idle = from_duration(c.idle_timeout, "tunnel.config.idle_timeout").total_seconds()
    return TunnelDraft(
        display_name=message.display_name,
        description=message.description,
        config=TunnelConfig(
            c.max_connections,
            idle,
            c.compression,
            web_access(c.web_access, "tunnel.config.web_access"),
            tuple(c.allowed_networks),
            basic_username=c.basic_username,
            basic_password=c.basic_password,
        ),
        endpoints=tuple(EndpointSpec(e.url, e.priority, e.weight) for e in message.endpoints),
    )


def share_role(number: int, field: str) -> ShareRole:
    """A required share role."""
    if number not in (1, 2, 3):
        raise InvalidArgument.single(field, "must be READ, WRITE or ADMIN", "REQUIRED")
    return ShareRole(number)


def share(s: Share, now: Any) -> tunnels_pb2.TunnelShare:
    """The API form of a share."""
    return P.TunnelShare(
        name=s.name,
        grantee=f"users/{s.grantee_id}",
        role=int(s.role),  # type: ignore[arg-type]
        expire_time=timestamp(s.expire_time),
        create_time=timestamp(s.create_time),
        creator=f"users/{s.creator_id}",
        tunnel=s.name.rsplit("/shares/", 1)[0],
        expired=s.expired(now),
        grantor_share=share_name(s.owner_id, s.tunnel_id, s.parent_grantee_id),
    )


def share_link(link: ShareLink, now: Any, token: str = "") -> tunnels_pb2.ShareLink:
    """The API form of a share link (the token only when just made)."""
    return P.ShareLink(
        name=link.name,
        role=int(link.role),  # type: ignore[arg-type]
        max_uses=link.max_uses,
        use_count=link.use_count,
        expire_time=timestamp(link.expire_time),
        share_ttl=None if link.share_ttl is None else duration(link.share_ttl.total_seconds()),
        token=token,
        create_time=timestamp(link.create_time),
        active=link.active(now),
        creator=f"users/{link.creator_id or link.owner_id}",
        grantor_share=share_name(link.owner_id, link.tunnel_id, link.parent_grantee_id),
    )


def shared_tunnel(s: SharedTunnel, listen_address: str) -> tunnels_pb2.SharedTunnel:
    """A tunnel someone shares with the caller."""
    return P.SharedTunnel(
        tunnel=tunnel(s.tunnel, listen_address),
        role=int(s.role),  # type: ignore[arg-type]
        expire_time=timestamp(s.expire_time),
    )


def ymd(value: date_pb2.Date) -> tuple[int, int, int] | None:
    """A date field as (year, month, day), or None when unset."""
    return None if value.ByteSize() == 0 else (value.year, value.month, value.day)


def daily(usage: DailyUsage, *, with_date: bool = True) -> tunnels_pb2.DailyUsage:
    """One day's usage."""
    day = usage.day
    return P.DailyUsage(
        date=date_pb2.Date(year=day.year, month=day.month, day=day.day) if with_date else None,
        connections=usage.connections,
        bytes_in=usage.bytes_in,
        bytes_out=usage.bytes_out,
        peak_concurrency=usage.peak_concurrency,
        requests=usage.requests,
        stream_seconds=usage.stream_milliseconds / 1000.0,
    )


def event(e: Event) -> events_pb2.Event:
    """The API form of an event."""
    payload = struct_pb2.Struct()
    payload.update(e.payload)
    return events_pb2.Event(
        name=e.name,
        type=e.type,
        subject=e.subject,
        actor=e.actor,
        create_time=timestamp(e.time),
        payload=payload,
        id=e.id,
    )


def deleted_tunnel(e: Event) -> tunnels_pb2.Tunnel:
    """What a ``tunnel.deleted`` event still says about the tunnel."""
    p = e.payload
    return P.Tunnel(
        name=str(p.get("name", e.subject)),
        display_name=str(p.get("display_name", "")),
        owner=f"users/{e.user_id}",
    )
