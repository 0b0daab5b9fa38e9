"""ProxyService: what the streaming proxies ask about tunnels."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from google.protobuf.message import Message
from tunnelplane.v1 import proxies_pb2

from server.api import convert
from server.api import proxy_convert as pc
from server.api.proxy_watch import ProxyWatch
from server.api.tunnel_convert import duration
from server.domain.common.errors import InvalidArgument
from server.domain.common.ids import is_id
from server.domain.common.names import user_id_of
from server.domain.events.service import EventLog
from server.domain.proxies.fleet import UPDATABLE_PATHS, ProxyFleet
from server.domain.proxies.insight import ProxyInsight
from server.domain.proxies.model import AccessDecision, BasicCredentials, Proxy, Refusal
from server.domain.proxies.service import ProxyAccess
from server.pipeline import Call

X = proxies_pb2
_D = X.TunnelAccessDecision
REFUSALS: Mapping[Refusal | None, int] = {
    None: _D.REFUSAL_UNSPECIFIED,
    Refusal.NOT_FOUND: _D.REFUSAL_NOT_FOUND,
    Refusal.UNAUTHENTICATED: _D.REFUSAL_UNAUTHENTICATED,
    Refusal.FORBIDDEN: _D.REFUSAL_FORBIDDEN,
    Refusal.NOT_RUNNING: _D.REFUSAL_NOT_RUNNING,
}


def decision(d: AccessDecision) -> X.TunnelAccessDecision:
    """The API form of an access decision."""
    return X.TunnelAccessDecision(
        allowed=d.allowed,
        refusal=REFUSALS[d.refusal],  # type: ignore[arg-type]
        tunnel=d.tunnel,
        cache_for=duration(d.cache_for),
        basic_auth=d.basic,
    )


def _wire(path: str) -> str:
    """The API's name of an updatable path."""
    for domain, wire in pc.POLICY_WIRE.items():
        if path == f"config.scaling.{domain}":
            return f"config.scaling.{wire}"
    return path


#: The mask paths a request may name, to the config's paths they change.
WIRE_PATHS = {_wire(p): p for p in UPDATABLE_PATHS} | {"config.never_idle_stop": "config.idle_stop"}


def caller(call: Call) -> str:
    """The caller's user id (the policy made sure there is one)."""
    assert call.principal is not None
    return call.principal.user_id


def actor(call: Call) -> str:
    """The caller as an event's actor."""
    return f"users/{caller(call)}"


def proxy_parts(name: str, field: str, call: Call, suffix: str = "") -> tuple[str, str]:
    """(owner id, proxy id) of ``users/{user}/proxies/{proxy}{suffix}``."""
    parts = name.split("/")
    tail = [suffix.strip("/")] if suffix else []
    if len(parts) != 4 + len(tail) or parts[2] != "proxies" or parts[4:] != tail:
        raise InvalidArgument.single(
            field, f"must look like users/{{user}}/proxies/{{proxy}}{suffix}"
        )
    owner = user_id_of("/".join(parts[:2]), field, caller(call))
    if not is_id(parts[3], "prx"):
        raise InvalidArgument.single(field, "is not a valid proxy id")
    return owner, parts[3]


def offered(request: X.CheckTunnelAccessRequest) -> BasicCredentials | None:
    """The web client's basic credentials, if the proxy sent any."""
    if not request.basic_username and not request.basic_password:
        return None
    return BasicCredentials(request.basic_username, request.basic_password)


class ProxyApi:
    """Serves ``tunnelplane.v1.ProxyService``."""

    def __init__(
        self,
        access: ProxyAccess,
        fleet: ProxyFleet,
        insight: ProxyInsight,
        events: EventLog,
        recheck: Callable[[Call], Awaitable[object]],
    ) -> None:
        self._access = access
        self._fleet = fleet
        self._insight = insight
        #: ``recheck`` verifies the call's credential again at each change it sends.
        self._watch = ProxyWatch(fleet, events, recheck)

    async def CheckTunnelAccess(
        self, request: X.CheckTunnelAccessRequest, call: Call
    ) -> X.TunnelAccessDecision:
        # The principal is the web client's, from the credential the proxy forwarded.
        found = await self._access.check(
            call.principal, request.tunnel_id, request.client_ip, offered(request)
        )
        return decision(found)

    async def AuthorizeAgentLink(
        self, request: X.AuthorizeAgentLinkRequest, call: Call
    ) -> X.AgentLinkGrant:
        assert call.principal is not None  # the policy needs an agent key
        grant = await self._access.authorize_link(call.principal, request.tunnel)
        return X.AgentLinkGrant(tunnel=grant.tunnel, cache_for=duration(grant.cache_for))

    # -- proxies ---------------------------------------------------------------------------

    async def StartProxy(self, request: X.StartProxyRequest, call: Call) -> X.Proxy:
        owner = user_id_of(request.parent, "parent", caller(call))
        started = await self._fleet.start(
            owner,
            pc.draft(request.proxy),
            request_id=request.request_id,
            actor=actor(call),
            trail=call.audit,
        )
        return pc.proxy(started)

    async def GetProxy(self, request: X.GetProxyRequest, call: Call) -> X.Proxy:
        return pc.proxy(await self._load(request.name, "name", call))

    async def ListProxies(self, request: X.ListProxiesRequest, call: Call) -> X.ListProxiesResponse:
        owner = user_id_of(request.parent, "parent", caller(call))
        page = await self._fleet.list(
            owner,
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
            order_by=request.order_by,
        )
        return X.ListProxiesResponse(
            proxies=[pc.proxy(p) for p in page.items], next_page_token=page.next_page_token
        )

    async def StopProxy(self, request: X.StopProxyRequest, call: Call) -> X.Proxy:
        owner, proxy_id = proxy_parts(request.name, "name", call)
        stopped = await self._fleet.stop(owner, proxy_id, actor=actor(call), trail=call.audit)
        return pc.proxy(stopped)

    async def UpdateProxy(self, request: X.UpdateProxyRequest, call: Call) -> X.Proxy:
        owner, proxy_id = proxy_parts(request.proxy.name, "proxy.name", call)
        wire = convert.mask_paths(request.update_mask, request.proxy, frozenset(WIRE_PATHS))
        paths = tuple(WIRE_PATHS.get(p, p) for p in wire)
        updated = await self._fleet.update(
            owner,
            proxy_id,
            pc.draft(request.proxy),
            paths,
            etag=request.proxy.etag,
            actor=actor(call),
            trail=call.audit,
        )
        return pc.proxy(updated)

    async def ListProxyConfigRevisions(
        self, request: X.ListProxyConfigRevisionsRequest, call: Call
    ) -> X.ListProxyConfigRevisionsResponse:
        owner, proxy_id = proxy_parts(request.parent, "parent", call)
        page = await self._fleet.revisions(
            owner, proxy_id, page_size=request.page_size, page_token=request.page_token
        )
        name = f"users/{owner}/proxies/{proxy_id}"
        return X.ListProxyConfigRevisionsResponse(
            revisions=[pc.revision(r, name) for r in page.items],
            next_page_token=page.next_page_token,
        )

    async def RollbackProxyConfig(
        self, request: X.RollbackProxyConfigRequest, call: Call
    ) -> X.Proxy:
        owner, proxy_id = proxy_parts(request.name, "name", call)
        rolled = await self._fleet.rollback(
            owner,
            proxy_id,
            request.version,
            etag=request.etag,
            actor=actor(call),
            trail=call.audit,
        )
        return pc.proxy(rolled)

    async def ScaleProxy(self, request: X.ScaleProxyRequest, call: Call) -> X.Proxy:
        owner, proxy_id = proxy_parts(request.name, "name", call)
        scaled = await self._fleet.scale(
            owner,
            proxy_id,
            request.instances,
            validate_only=request.validate_only,
            actor=actor(call),
            trail=call.audit,
        )
        return pc.proxy(scaled)

    async def ListProxyScalingEvents(
        self, request: X.ListProxyScalingEventsRequest, call: Call
    ) -> X.ListProxyScalingEventsResponse:
        owner, proxy_id = proxy_parts(request.parent, "parent", call)
        page = await self._fleet.scaling_events(
            owner, proxy_id, page_size=request.page_size, page_token=request.page_token
        )
        name = f"users/{owner}/proxies/{proxy_id}"
        return X.ListProxyScalingEventsResponse(
            events=[pc.scaling_event(e, name) for e in page.items],
            next_page_token=page.next_page_token,
        )

    async def GetProxyMetrics(
        self, request: X.GetProxyMetricsRequest, call: Call
    ) -> X.ProxyMetrics:
        owner, proxy_id = proxy_parts(request.name, "name", call, "/metrics")
        asked, total = await self._insight.traffic(owner, proxy_id)
        return X.ProxyMetrics(
            name=request.name,
            total=pc.traffic(total, ""),
            instances=[pc.instance_traffic(t) for t in asked],
        )

    async def GetProxyDiagnostics(
        self, request: X.GetProxyDiagnosticsRequest, call: Call
    ) -> X.ProxyDiagnostics:
        owner, proxy_id = proxy_parts(request.name, "name", call, "/diagnostics")
        return pc.diagnostics(request.name, await self._insight.diagnostics(owner, proxy_id))

    async def WatchProxies(self, request: X.WatchProxiesRequest, call: Call) -> Message:
        """The current state (or the changes since ``resume_after``), then each change."""
        return await self._watch.watch(request, call)

    async def _load(self, name: str, field: str, call: Call) -> Proxy:
        owner, proxy_id = proxy_parts(name, field, call)
        return await self._fleet.get(owner, proxy_id)
