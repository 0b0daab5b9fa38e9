"""Which network addresses the control plane may dial on a user's behalf (the SSRF rule).

Webhook endpoints and tunnel endpoints are URLs users type. In production the control plane
dials only global addresses, so such a URL cannot reach into its own network: the sender
and the prober both apply :func:`public_only` to every address they would connect to.

Addresses and networks that callers write (a tunnel's allowed networks, a web client's
address) are read here too, the same way everywhere.
"""

from __future__ import annotations

import ipaddress
from typing import TypeAlias

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_allowed(
    ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address, *, allow_private: bool
) -> bool:
    """Whether a resolved address may receive webhooks (the SSRF check).

    Refuses loopback, private, shared, link-local, reserved and other non-global addresses
    (IPv4 inside IPv6 — mapped, 6to4, Teredo, NAT64 — is judged as the IPv4) unless
    ``allow_private``; multicast and unspecified addresses, and anything unparsable, are
    always refused.
    """
    try:
        address = _embedded_v4(ipaddress.ip_address(ip))
    except ValueError:
        return False
    if address.is_multicast or address.is_unspecified:
        return False
    return allow_private or (address.is_global and not _special(address))


def _special(address: Address) -> bool:
    site_local = isinstance(address, ipaddress.IPv6Address) and address.is_site_local
    return site_local or any(
        (address.is_loopback, address.is_private, address.is_link_local, address.is_reserved)
    )


def _embedded_v4(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def public_only(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` may be dialled in production: a global address, judged as
    :func:`address_allowed` does without private addresses."""
    return address_allowed(ip, allow_private=False)


# --- addresses and networks as callers write them --------------------------------------

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """A CIDR, or a single address as a /32 or /128, with its host bits cleared
    (``10.1.2.3/8`` is ``10.0.0.0/8``); ``ValueError`` for anything else, a zone (``%eth0``)
    included."""
    if "%" in text:
        raise ValueError("a network has no zone")
    return ipaddress.ip_network(text, strict=False)


def parse_address(text: str) -> Address:
    """An IPv4 or IPv6 address, an IPv4-mapped IPv6 one as the IPv4 and without any zone
    (``fe80::1%eth0`` is ``fe80::1``); ``ValueError`` for anything else."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        return ipaddress.IPv6Address(int(address))
    return address


def in_any(address: Address, networks: tuple[str, ...]) -> bool:
    """Whether ``address`` is in any of ``networks`` (CIDRs as :func:`parse_network` reads
    them; one that does not parse matches nothing)."""
    for text in networks:
        try:
            if address in parse_network(text):
                return True
        except ValueError:
            continue
    return False
