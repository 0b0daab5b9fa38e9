"""What the streaming proxies ask: whether a web request may use a tunnel, and whether an
agent may link to proxies for one. Both only read."""

from __future__ import annotations

from server.domain.common.ids import is_id
from server.domain.identity.model import Principal, ShareRole
from server.domain.proxies.basic import BasicCheck
from server.domain.proxies.model import AccessDecision, BasicCredentials, LinkGrant
from server.domain.proxies.ports import ShareLookup, TunnelLookup
from server.domain.proxies.rules import (
    LINK_GRANT_FOR,
    client_address,
    decide,
    needs_share,
    takes_basic,
)
from server.domain.tunnels.model import Tunnel
from server.domain.tunnels.rules import carried_tunnel, owned


class ProxyAccess:
    """The proxies' questions about tunnels, after authorization has allowed the call."""

    def __init__(self, tunnels: TunnelLookup, shares: ShareLookup, basic: BasicCheck) -> None:
        self._tunnels = tunnels
        self._shares = shares
        self._basic = basic

    async def check(
        self,
        principal: Principal | None,
        tunnel_id: str,
        client_ip: str,
        offered: BasicCredentials | None = None,
    ) -> AccessDecision:
        """Whether a web request from ``client_ip``, with the credential of ``principal``
        (None: none) and the basic credentials ``offered`` (None: none), may use the tunnel
        ``tunnel_id``: a decision for any tunnel id, an error only for an address that is
        not one, or while guesses at the tunnel's basic password must wait."""
        client = client_address(client_ip)
        tunnel = await self._find(tunnel_id)
        shared = basic = False
        if tunnel is not None and principal is not None and needs_share(tunnel, principal):
            role = await self._shares.share_role(tunnel.name, principal.user_id)
            shared = role is not ShareRole.NONE
        if tunnel is not None and offered is not None and takes_basic(tunnel):
            basic = await self._basic.admits(tunnel, offered, client_ip)
        return decide(tunnel, principal, client, shared=shared, basic=basic)

    async def authorize_link(self, principal: Principal, name: str) -> LinkGrant:
        """Whether the agent key of ``principal`` may link to proxies for the tunnel
        ``name``: as it may carry it on its Connect stream (the same rules)."""
        owner_id, tunnel_id = carried_tunnel(principal, name, "tunnel")
        tunnel = owned(await self._tunnels.get(tunnel_id), owner_id, tunnel_id)
        return LinkGrant(tunnel.name, LINK_GRANT_FOR)

    async def _find(self, tunnel_id: str) -> Tunnel | None:
        if not is_id(tunnel_id, "tun"):
            return None
        return await self._tunnels.get(tunnel_id)
