"""TunnelService."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import Message
from tunnelplane.v1 import tunnels_pb2

from server.api import convert
from server.api import tunnel_convert as tc
from server.api.watch import TunnelWatch
from server.domain.common.clock import Clock
from server.domain.common.errors import InvalidArgument
from server.domain.common.ids import is_id
from server.domain.common.names import user_id_of
from server.domain.events.service import EventLog
from server.domain.identity.model import Tier
from server.domain.identity.rules import needs_share_lookup
from server.domain.identity.users import UserService
from server.domain.tunnels.agents import AgentSessions, today
from server.domain.tunnels.model import Tunnel
from server.domain.tunnels.rules import tunnel_parts
from server.domain.tunnels.service import UPDATABLE_PATHS, TunnelService
from server.domain.tunnels.sharing import ShareService
from server.domain.tunnels.traffic import DailyUsage, date_range, total
from server.pipeline import Call

P = tunnels_pb2


def caller(call: Call) -> str:
    """The caller's user id (the policy made sure there is one)."""
    assert call.principal is not None
    return call.principal.user_id


def actor(call: Call) -> str:
    """The caller as an event's actor."""
    return f"users/{caller(call)}"


class TunnelApi:
    """Serves ``tunnelplane.v1.TunnelService``."""

    def __init__(
        self,
        tunnels: TunnelService,
        shares: ShareService,
        agents: AgentSessions,
        users: UserService,
        clock: Clock,
        recheck: Callable[[Call], Awaitable[object]],
        events: EventLog,
    ) -> None:
        self._tunnels = tunnels
        self._shares = shares
        self._agents = agents
        self._users = users
        self._clock = clock
        #: ``recheck`` verifies the call's credential again at each change (a watch ends
        #: when it is revoked or its session ends; the pipeline also re-checks on a timer).
        self._watch = TunnelWatch(tunnels, shares, events, recheck, self._out)

    def _out(self, t: Tunnel) -> tunnels_pb2.Tunnel:
        return tc.tunnel(t, self._tunnels.listen_address(t))

    async def _tier(self, owner_id: str, call: Call) -> Tier:
        principal = call.principal
        if principal is not None and principal.user_id == owner_id:
            return principal.tier
        return (await self._users.get(owner_id)).tier

    async def _load(self, name: str, field: str, call: Call, suffix: str = "") -> Tunnel:
        owner, tunnel_id = tunnel_parts(name, field, caller(call), suffix=suffix)
        return await self._tunnels.get(owner, tunnel_id)

    # -- life cycle ------------------------------------------------------------------------

    async def CreateTunnel(self, request: P.CreateTunnelRequest, call: Call) -> P.Tunnel:
        owner = user_id_of(request.parent, "parent", caller(call))
        created = await self._tunnels.create(
            owner,
            await self._tier(owner, call),
            tc.draft(request.tunnel),
            request_id=request.request_id,
            actor=actor(call),
            trail=call.audit,
        )
        return self._out(created)

    async def GetTunnel(self, request: P.GetTunnelRequest, call: Call) -> P.Tunnel:
        return self._out(await self._load(request.name, "name", call))

    async def ListTunnels(self, request: P.ListTunnelsRequest, call: Call) -> P.ListTunnelsResponse:
        owner = user_id_of(request.parent, "parent", caller(call))
        page = await self._tunnels.list(
            owner,
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
            order_by=request.order_by,
        )
        return P.ListTunnelsResponse(
            tunnels=[self._out(t) for t in page.items], next_page_token=page.next_page_token
        )

    async def UpdateTunnel(self, request: P.UpdateTunnelRequest, call: Call) -> P.Tunnel:
        owner, tunnel_id = tunnel_parts(request.tunnel.name, "tunnel.name", caller(call))
        paths = convert.mask_paths(request.update_mask, request.tunnel, UPDATABLE_PATHS)
        updated = await self._tunnels.update(
            owner,
            tunnel_id,
            await self._tier(owner, call),
            tc.draft(request.tunnel),
            paths,
            etag=request.tunnel.etag,
            actor=actor(call),
            trail=call.audit,
        )
        return self._out(updated)

    async def DeleteTunnel(self, request: P.DeleteTunnelRequest, call: Call) -> P.Tunnel:
        owner, tunnel_id = tunnel_parts(request.name, "name", caller(call))
        deleted = await self._tunnels.delete(
            owner,
            tunnel_id,
            force=request.force,
            etag=request.etag,
            actor=actor(call),
            trail=call.audit,
        )
        return self._out(deleted)

    async def StartTunnel(self, request: P.StartTunnelRequest, call: Call) -> P.Tunnel:
        owner, tunnel_id = tunnel_parts(request.name, "name", caller(call))
        tier = await self._tier(owner, call)
        started = await self._tunnels.start(
            owner, tunnel_id, tier, actor=actor(call), trail=call.audit
        )
        return self._out(started)

    async def StopTunnel(self, request: P.StopTunnelRequest, call: Call) -> P.Tunnel:
        owner, tunnel_id = tunnel_parts(request.name, "name", caller(call))
        stopped = await self._tunnels.stop(owner, tunnel_id, actor=actor(call), trail=call.audit)
        return self._out(stopped)

    async def FailoverTunnel(self, request: P.FailoverTunnelRequest, call: Call) -> P.Tunnel:
        owner, tunnel_id = tunnel_parts(request.name, "name", caller(call))
        moved = await self._tunnels.failover(
            owner,
            tunnel_id,
            request.endpoint,
            force=request.force,
            actor=actor(call),
            trail=call.audit,
        )
        return self._out(moved)

    # -- traffic and usage -----------------------------------------------------------------

    async def GetTunnelMetrics(
        self, request: P.GetTunnelMetricsRequest, call: Call
    ) -> P.TunnelMetrics:
        found = await self._load(request.name, "name", call, "/metrics")
        traffic = await self._agents.traffic(found)
        totals = traffic.totals
        p50, p95 = totals.percentile(0.5), totals.percentile(0.95)
        return P.TunnelMetrics(
            name=request.name,
            request_count=totals.request_count,
            success_count=totals.success_count,
            error_count=totals.error_count,
            success_rate=totals.success_rate,
            latency_p50=tc.duration((p50 or 0) / 1000),
            latency_p95=tc.duration((p95 or 0) / 1000),
            connection_count=totals.connections,
            active_connections=traffic.active_connections,
            bytes_in=totals.bytes_in,
            bytes_out=totals.bytes_out,
            last_report_time=convert.timestamp(traffic.last_report_time),
        )

    async def GetTunnelUsage(self, request: P.GetTunnelUsageRequest, call: Call) -> P.TunnelUsage:
        found = await self._load(request.name, "name", call, "/usage")
        days = self._range(request)
        rows = await self._agents.usage(user_id=None, tunnel_id=found.id, days=days)
        usage = [row.usage for row in rows]
        return P.TunnelUsage(
            name=request.name,
            days=[tc.daily(u) for u in usage],
            total=tc.daily(total(usage, days.start), with_date=False),
        )

    async def GetUsageReport(self, request: P.GetUsageReportRequest, call: Call) -> P.UsageReport:
        user_id = user_id_of(request.name, "name", caller(call), suffix="/usageReport")
        user = await self._users.get(user_id)
        days = self._range(request)
        rows = await self._agents.usage(user_id=user_id, tunnel_id=None, days=days)
        by_day: dict[Any, list[DailyUsage]] = defaultdict(list)
        by_tunnel: dict[str, list[DailyUsage]] = defaultdict(list)
        for row in rows:
            by_day[row.usage.day].append(row.usage)
            by_tunnel[row.tunnel_name].append(row.usage)
        return P.UsageReport(
            name=request.name,
            tier=tc.TIERS[user.tier],  # type: ignore[arg-type]
            days=[tc.daily(total(items, day)) for day, items in sorted(by_day.items())],
            tunnels=[
                P.TunnelUsageTotal(tunnel=name, total=tc.daily(total(items), with_date=False))
                for name, items in sorted(by_tunnel.items())
            ],
            total=tc.daily(total(r.usage for r in rows), with_date=False),
        )

    async def SummarizeUsage(
        self, request: P.SummarizeUsageRequest, call: Call
    ) -> P.SummarizeUsageResponse:
        days = self._range(request)
        rows = await self._agents.usage(user_id=None, tunnel_id=None, days=days)
        by_tier: dict[Tier, list[DailyUsage]] = defaultdict(list)
        users: dict[Tier, set[str]] = defaultdict(set)
        for row in rows:
            by_tier[row.tier].append(row.usage)
            users[row.tier].add(row.user_id)
        return P.SummarizeUsageResponse(
            tiers=[
                P.TierUsage(
                    tier=tc.TIERS[tier],  # type: ignore[arg-type]
                    users=len(users[tier]),
                    total=tc.daily(total(by_tier[tier]), with_date=False),
                )
                for tier in Tier
                if tier in by_tier
            ]
        )

    def _range(self, request: Any) -> Any:
        return date_range(tc.ymd(request.start_date), tc.ymd(request.end_date), today(self._clock))

    # -- sharing ---------------------------------------------------------------------------

    async def CreateTunnelShare(
        self, request: P.CreateTunnelShareRequest, call: Call
    ) -> P.TunnelShare:
        found = await self._load(request.parent, "parent", call)
        grantee = user_id_of(request.share.grantee, "share.grantee", caller(call))
        expire = None
        if request.share.HasField("expire_time"):
            expire = convert.from_timestamp(request.share.expire_time, "share.expire_time")
        made = await self._shares.grant(
            found,
            grantee,
            tc.share_role(request.share.role, "share.role"),
            expire,
            creator_id=caller(call),
            through_share=_through_share(call, found),
            trail=call.audit,
        )
        return tc.share(made, self._clock.now())

    async def ListTunnelShares(
        self, request: P.ListTunnelSharesRequest, call: Call
    ) -> P.ListTunnelSharesResponse:
        found = await self._load(request.parent, "parent", call)
        page = await self._shares.list(
            found, page_size=request.page_size, page_token=request.page_token
        )
        now = self._clock.now()
        return P.ListTunnelSharesResponse(
            shares=[tc.share(s, now) for s in page.items], next_page_token=page.next_page_token
        )

    async def DeleteTunnelShare(
        self, request: P.DeleteTunnelShareRequest, call: Call
    ) -> P.TunnelShare:
        tunnel_name, grantee = _child(request.name, "shares", "usr")
        found = await self._load(tunnel_name, "name", call)
        revoked = await self._shares.revoke(
            found,
            grantee,
            by=caller(call),
            through_share=_through_share(call, found),
            trail=call.audit,
        )
        return tc.share(revoked, self._clock.now())

    async def CreateShareLink(self, request: P.CreateShareLinkRequest, call: Call) -> P.ShareLink:
        found = await self._load(request.parent, "parent", call)
        spec = request.share_link
        expire = ttl = None
        if spec.HasField("expire_time"):
            expire = convert.from_timestamp(spec.expire_time, "share_link.expire_time")
        if spec.HasField("share_ttl"):
            ttl = convert.from_duration(spec.share_ttl, "share_link.share_ttl")
        link, token = await self._shares.create_link(
            found,
            tc.share_role(spec.role, "share_link.role"),
            spec.max_uses,
            expire,
            ttl,
            creator_id=caller(call),
            through_share=_through_share(call, found),
            trail=call.audit,
        )
        return tc.share_link(link, self._clock.now(), token)

    async def ListShareLinks(
        self, request: P.ListShareLinksRequest, call: Call
    ) -> P.ListShareLinksResponse:
        found = await self._load(request.parent, "parent", call)
        page = await self._shares.list_links(
            found, page_size=request.page_size, page_token=request.page_token
        )
        now = self._clock.now()
        return P.ListShareLinksResponse(
            share_links=[tc.share_link(link, now) for link in page.items],
            next_page_token=page.next_page_token,
        )

    async def DeleteShareLink(self, request: P.DeleteShareLinkRequest, call: Call) -> P.ShareLink:
        tunnel_name, link_id = _child(request.name, "shareLinks", "lnk")
        found = await self._load(tunnel_name, "name", call)
        revoked = await self._shares.revoke_link(
            found,
            link_id,
            by=caller(call),
            through_share=_through_share(call, found),
            trail=call.audit,
        )
        return tc.share_link(revoked, self._clock.now())

    async def AcceptShareLink(self, request: P.AcceptShareLinkRequest, call: Call) -> P.TunnelShare:
        made = await self._shares.accept(request.token, caller(call), call.audit)
        return tc.share(made, self._clock.now())

    async def ListSharedWithMe(
        self, request: P.ListSharedWithMeRequest, call: Call
    ) -> P.ListSharedWithMeResponse:
        grantee = user_id_of(request.parent, "parent", caller(call))
        page = await self._shares.shared_with(
            grantee, page_size=request.page_size, page_token=request.page_token
        )
        return P.ListSharedWithMeResponse(
            tunnels=[
                tc.shared_tunnel(s, self._tunnels.listen_address(s.tunnel)) for s in page.items
            ],
            next_page_token=page.next_page_token,
        )

    # -- watch -----------------------------------------------------------------------------

    async def WatchTunnels(self, request: P.WatchTunnelsRequest, call: Call) -> Message:
        """The current state (or the changes since ``resume_after``), then each change."""
        return await self._watch.watch(request, call)


def _through_share(call: Call, tunnel: Tunnel) -> bool:
    """Whether only a share let the caller act on ``tunnel`` (not ownership, not the
    method's admin permission): then what they grant must stay within that share."""
    return needs_share_lookup(call.method.policy.rule, call.principal, tunnel.user_id)


def _child(name: str, collection: str, prefix: str) -> tuple[str, str]:
    """(tunnel name, child id) of ``users/{u}/tunnels/{t}/{collection}/{id}``."""
    parent, _, child = name.rpartition(f"/{collection}/")
    if not parent or not child or "/" in child:
        raise InvalidArgument.single(
            "name", f"must look like users/{{user}}/tunnels/{{tunnel}}/{collection}/{{id}}"
        )
    if not is_id(child, prefix):
        raise InvalidArgument.single("name", f"does not end in a valid {collection} id")
    return parent, child
