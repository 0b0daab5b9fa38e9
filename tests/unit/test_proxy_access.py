"""The access rule of server/domain/proxies/rules.py, case by case, and the address and
network reading it relies on (server/domain/common/addresses.py); basic access case by
case and as a law."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.domain.common.addresses import in_any, parse_address, parse_network
from server.domain.common.errors import InvalidArgument
from server.domain.identity.model import CredentialKind, Principal, Role, Tier
from server.domain.identity.rules import AGENT_PERMISSIONS, SELF_PERMISSIONS, permissions_for
from server.domain.proxies.model import Refusal
from server.domain.proxies.rules import client_address, decide, needs_share, takes_basic
from server.domain.tunnels.model import (
    Status,
    Tunnel,
    TunnelConfig,
    TunnelHealth,
    TunnelState,
    WebAccess,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
OWNER, OTHER = "usr_01jd3k0000000000000000000a", "usr_01jd3k0000000000000000000b"
RUNNING = Status(TunnelState.CONNECTED, running=True)
TUNNEL = Tunnel(
    id="tun_01jd3k0000000000000000000a",
    user_id=OWNER,
    display_name="t",
    description="",
    status=RUNNING,
    health=TunnelHealth.HEALTHY,
    config=TunnelConfig(),
    endpoints=(),
    active_endpoint="",
    listen_port=20000,
    connected_agents=1,
    lost_agents=0,
    version=1,
    create_time=NOW,
    update_time=NOW,
    state_time=NOW,
)


def principal(user_id: str, permissions: frozenset[str] = SELF_PERMISSIONS) -> Principal:
    return Principal(user_id, Role.USER, Tier.FREE, CredentialKind.API_KEY, permissions)


def tunnel(access: WebAccess = WebAccess.PRIVATE, *networks: str, **status: bool) -> Tunnel:
    config = TunnelConfig(web_access=access, allowed_networks=networks)
    running = Status(TunnelState.DISCONNECTED, running=False) if status else RUNNING
    return replace(TUNNEL, config=config, status=running)


NO_USE = frozenset(SELF_PERMISSIONS - {"tunnels.use"})
ADMIN = Principal(
    OTHER, Role.SUPER_ADMIN, Tier.FREE, CredentialKind.SESSION, permissions_for(Role.SUPER_ADMIN)
)
LAN = parse_address("10.0.0.9")


@pytest.mark.parametrize(
    ("case", "who", "client", "shared", "refusal"),
    [
        (tunnel(WebAccess.PUBLIC), None, None, False, None),
        (tunnel(WebAccess.PUBLIC, stopped=True), None, None, False, Refusal.NOT_RUNNING),
        (tunnel(WebAccess.IP_ALLOWLIST, "10.0.0.0/8"), None, LAN, False, None),
        (tunnel(WebAccess.IP_ALLOWLIST, "10.0.0.0/8"), None, None, False, Refusal.FORBIDDEN),
        (
            tunnel(WebAccess.IP_ALLOWLIST, "192.0.2.0/24"),
            principal(OWNER),
            LAN,
            False,
            Refusal.FORBIDDEN,
        ),
        (
            tunnel(WebAccess.IP_ALLOWLIST, "10.0.0.0/8", stopped=True),
            None,
            LAN,
            False,
            Refusal.NOT_RUNNING,
        ),
        (tunnel(), None, LAN, False, Refusal.UNAUTHENTICATED),
        (tunnel(stopped=True), None, None, False, Refusal.UNAUTHENTICATED),
        (tunnel(), principal(OWNER), None, False, None),
        (tunnel(stopped=True), principal(OWNER), None, False, Refusal.NOT_RUNNING),
        (tunnel(), principal(OWNER, NO_USE), None, False, Refusal.FORBIDDEN),
        (tunnel(), principal(OWNER, AGENT_PERMISSIONS), None, False, Refusal.FORBIDDEN),
        (tunnel(), principal(OTHER), None, False, Refusal.NOT_FOUND),
        (tunnel(stopped=True), principal(OTHER), None, False, Refusal.NOT_FOUND),
        (tunnel(), principal(OTHER), None, True, None),
        (tunnel(stopped=True), principal(OTHER), None, True, Refusal.NOT_RUNNING),
        (tunnel(), principal(OTHER, NO_USE), None, True, Refusal.FORBIDDEN),
        (tunnel(), ADMIN, None, False, Refusal.NOT_FOUND),  # no bypass
        (None, principal(OWNER), None, False, Refusal.NOT_FOUND),
    ],
)
def test_each_case_gets_its_decision(
    case: Tunnel | None,
    who: Principal | None,
    client: object,
    shared: bool,
    refusal: Refusal | None,
) -> None:
    decision = decide(case, who, client, shared=shared)
    assert decision.refusal is refusal
    assert decision.allowed is (refusal is None)
    assert decision.cache_for == (5.0 if refusal is None else 1.0)
    # The tunnel is named only to callers who would be let in.
    named = refusal in (None, Refusal.NOT_RUNNING)
    assert decision.tunnel == (TUNNEL.name if named else "")


def test_a_failed_tunnel_is_not_running() -> None:
    failed = replace(tunnel(WebAccess.PUBLIC), status=Status(TunnelState.ERROR, running=True))
    assert decide(failed, None, None, shared=False).refusal is Refusal.NOT_RUNNING


def test_a_share_is_looked_up_only_when_it_could_decide() -> None:
    assert needs_share(tunnel(), principal(OTHER))
    assert not needs_share(tunnel(), principal(OWNER))
    assert not needs_share(tunnel(), principal(OTHER, NO_USE))
    assert not needs_share(tunnel(), None)
    assert not needs_share(tunnel(WebAccess.PUBLIC), principal(OTHER))


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("203.0.113.7", "203.0.113.7/32"),
        ("2001:DB8::1/32", "2001:db8::/32"),
        ("::1", "::1/128"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ],
)
def test_networks_are_normalized(text: str, network: str) -> None:
    assert str(parse_network(text)) == network


@pytest.mark.parametrize(
    "text", ["", "10.0.0.0/33", "fe80::1%eth0/64", " 10.0.0.0/8", "10.0.0.0/8\x00", "example.com"]
)
def test_what_is_no_network_is_refused(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - ipaddress says no more than ValueError
        parse_network(text)


def test_client_addresses_are_read_as_the_allowlist_compares_them() -> None:
    assert client_address("") is None
    assert in_any(client_address("::ffff:10.0.0.1"), ("10.0.0.0/8",))
    assert in_any(client_address("fe80::1%eth0"), ("fe80::/64",))
    assert not in_any(client_address("10.0.0.1"), ("::/0", "not a network"))
    for bad in ("10.0.0.256", "10.0.0.1:80", "1" * 100, "10.0.0.0/8"):
        with pytest.raises(InvalidArgument) as caught:
            client_address(bad)
        assert [v.field for v in caught.value.violations] == ["client_ip"]


# --- basic access ------------------------------------------------------------------------

BASIC = WebAccess.BASIC


@pytest.mark.parametrize(
    ("case", "who", "basic", "refusal"),
    [
        (tunnel(BASIC), None, True, None),
        (tunnel(BASIC), None, False, Refusal.UNAUTHENTICATED),  # none given, or wrong ones
        (tunnel(BASIC, stopped=True), None, True, Refusal.NOT_RUNNING),
        (tunnel(BASIC, stopped=True), None, False, Refusal.UNAUTHENTICATED),
        # The credentials decide alone: the owner's own token does not open it.
        (tunnel(BASIC), principal(OWNER), False, Refusal.UNAUTHENTICATED),
        (tunnel(BASIC), principal(OTHER, NO_USE), True, None),
        (tunnel(BASIC), ADMIN, False, Refusal.UNAUTHENTICATED),
    ],
)
def test_a_basic_tunnel_lets_in_whoever_gives_its_credentials(
    case: Tunnel, who: Principal | None, basic: bool, refusal: Refusal | None
) -> None:
    decision = decide(case, who, LAN, shared=False, basic=basic)
    assert decision.refusal is refusal
    assert decision.basic  # the proxy asks a browser for them, and strips them
    named = refusal in (None, Refusal.NOT_RUNNING)
    assert decision.tunnel == (TUNNEL.name if named else "")


def test_only_a_basic_tunnel_takes_basic_credentials() -> None:
    assert takes_basic(tunnel(BASIC))
    assert not any(takes_basic(tunnel(a)) for a in WebAccess if a is not BASIC)
    assert not takes_basic(None)
    assert not decide(None, None, None, shared=False, basic=True).basic


principals = st.sampled_from(
    [None, principal(OWNER), principal(OTHER), principal(OWNER, NO_USE), ADMIN]
)


@given(
    access=st.sampled_from(list(WebAccess)),
    who=principals,
    client=st.sampled_from([None, LAN, parse_address("192.0.2.1")]),
    shared=st.booleans(),
    stopped=st.booleans(),
)
def test_basic_credentials_count_for_a_basic_tunnel_and_nothing_else(
    access: WebAccess, who: Principal | None, client: Any, shared: bool, stopped: bool
) -> None:
    """A basic tunnel is let into with its credentials alone, whoever the caller and
    wherever from; for any other tunnel they change no decision."""
    case = tunnel(access, "10.0.0.0/8", stopped=True) if stopped else tunnel(access, "10.0.0.0/8")
    with_basic = decide(case, who, client, shared=shared, basic=True)
    without = decide(case, who, client, shared=shared, basic=False)
    if access is BASIC:
        assert with_basic.refusal is (Refusal.NOT_RUNNING if stopped else None)
        assert without.refusal is Refusal.UNAUTHENTICATED
        assert with_basic.basic
        assert without.basic
    else:
        assert with_basic == without
        assert not with_basic.basic
