"""Who may use a tunnel through a streaming proxy. Pure functions, no I/O.

The tunnel's web access decides first: ``public`` lets anyone in, ``ip_allowlist`` the
clients whose address is in its networks, ``basic`` the clients that give its user name
and password (checked by :mod:`server.domain.proxies.basic`), and ``private`` a credential
that holds ``tunnels.use`` of the owner or of someone the tunnel is shared with
(administrators get no way around it: a tunnel is its owner's data plane). A caller who
may not know of a private tunnel is told it does not exist; only a caller who would be let
in learns that the tunnel is not running.
"""

from __future__ import annotations

from server.domain.common.addresses import Address, in_any, parse_address
from server.domain.common.errors import InvalidArgument
from server.domain.identity.model import Principal
from server.domain.identity.rules import TUNNEL_USE
from server.domain.proxies.model import AccessDecision, Refusal
from server.domain.tunnels.model import Tunnel, WebAccess
from server.domain.tunnels.rules import carrying

#: How long a proxy may reuse an answer, s: a refusal briefly (the owner may be fixing
#: what caused it), a grant a little longer.
ALLOWED_FOR, REFUSED_FOR, LINK_GRANT_FOR = 5.0, 1.0, 30.0
#: Longer than any IPv6 address with a zone.
MAX_CLIENT_IP = 64


def client_address(text: str) -> Address | None:
    """The web client's address as the proxy saw it (None when it did not say);
    ``InvalidArgument`` naming ``client_ip`` when it is not an address."""
    if not text:
        return None
    try:
        address = parse_address(text) if len(text) <= MAX_CLIENT_IP else None
    except ValueError:
        address = None
    if address is None:
        raise InvalidArgument.single("client_ip", "must be an IPv4 or IPv6 address")
    return address


def by_web_access(
    tunnel: Tunnel, principal: Principal | None, client: Address | None, *, basic: bool = False
) -> Refusal | None:
    """The refusal the tunnel's web access makes before ownership and shares count;
    ``basic``: the request's basic credentials are the tunnel's."""
    config = tunnel.config
    if config.web_access is WebAccess.PUBLIC:
        return None
    if config.web_access is WebAccess.IP_ALLOWLIST:
        allowed = client is not None and in_any(client, config.allowed_networks)
        return None if allowed else Refusal.FORBIDDEN
    if config.web_access is WebAccess.BASIC:
        # No credentials and wrong ones alike: a browser asks its user again.
        return None if basic else Refusal.UNAUTHENTICATED
    if principal is None:
        return Refusal.UNAUTHENTICATED
    return None if principal.has(TUNNEL_USE) else Refusal.FORBIDDEN


def needs_share(tunnel: Tunnel, principal: Principal | None) -> bool:
    """Whether only a share of the tunnel could let ``principal`` in (so look one up)."""
    return (
        tunnel.config.web_access is WebAccess.PRIVATE
        and principal is not None
        and principal.has(TUNNEL_USE)
        and principal.user_id != tunnel.user_id
    )


def takes_basic(tunnel: Tunnel | None) -> bool:
    """Whether ``tunnel`` admits by basic credentials (so check those a request gives)."""
    return tunnel is not None and tunnel.config.web_access is WebAccess.BASIC


def decide(
    tunnel: Tunnel | None,
    principal: Principal | None,
    client: Address | None,
    *,
    shared: bool,
    basic: bool = False,
) -> AccessDecision:
    """Whether a web request of ``principal`` (None: it carries no credential) from
    ``client`` may use ``tunnel`` (None: there is none); ``shared``: the principal holds an
    unexpired share of it (looked up when :func:`needs_share` says so); ``basic``: the
    request gave the tunnel's basic credentials (checked when :func:`takes_basic` says so)."""
    if tunnel is None:
        return refused(Refusal.NOT_FOUND)
    asks = takes_basic(tunnel)
    refusal = by_web_access(tunnel, principal, client, basic=basic)
    if refusal is not None:
        return refused(refusal, basic=asks)
    if needs_share(tunnel, principal) and not shared:
        return refused(Refusal.NOT_FOUND)  # a private tunnel of someone else: not there
    if not carrying(tunnel):
        return refused(Refusal.NOT_RUNNING, tunnel.name, basic=asks)
    return AccessDecision(None, tunnel.name, ALLOWED_FOR, basic=asks)


def refused(refusal: Refusal, tunnel: str = "", *, basic: bool = False) -> AccessDecision:
    """A refusal; ``tunnel`` is named only to a caller who would otherwise be let in;
    ``basic``: the tunnel takes basic credentials."""
    return AccessDecision(refusal, tunnel, REFUSED_FOR, basic=basic)
