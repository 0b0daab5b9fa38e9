"""ProxyService: what the streaming proxies ask about tunnels."""

from __future__ import annotations

from collections.abc import Mapping

from tunnelplane.v1 import proxies_pb2

from server.api.tunnel_convert import duration
from server.domain.proxies.model import AccessDecision, BasicCredentials, Refusal
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


def offered(request: X.CheckTunnelAccessRequest) -> BasicCredentials | None:
    """The web client's basic credentials, if the proxy sent any."""
    if not request.basic_username and not request.basic_password:
        return None
    return BasicCredentials(request.basic_username, request.basic_password)


class ProxyApi:
    """Serves ``tunnelplane.v1.ProxyService``."""

    def __init__(self, access: ProxyAccess) -> None:
        self._access = access

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
