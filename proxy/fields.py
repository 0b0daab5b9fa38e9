"""Header fields across the proxy: what is hop-by-hop, and what the proxy adds.

RFC 9110 section 7.6.1: ``Connection`` and the fields it names, plus the classic
hop-by-hop set, describe one connection and never cross a proxy. ``Authorization`` is
removed too when it was the Tunnelplane credential that let the request in (a private
tunnel), so the user's token never reaches the local service.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tunnelplane.v1 import proxy_link_pb2

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Fields the proxy sets itself on the way to the local service.
FORWARDED = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        # Between instances of one proxy (proxy/peers.py), never further.
        "x-tunnelplane-hop",
        "x-tunnelplane-client-ip",
    }
)


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00\r\n]")


def well_formed(name: str, value: str) -> bool:
    """Whether a field can be written as it is: a token name, no CR, LF or NUL in the value."""
    return bool(_TOKEN.fullmatch(name)) and not _BAD_VALUE.search(value)


def _connection_named(pairs: list[tuple[str, str]]) -> frozenset[str]:
    named: set[str] = set()
    for name, value in pairs:
        if name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(","))
    return frozenset(named)


def end_to_end(
    pairs: Iterable[tuple[str, str]], *, drop: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """The fields of ``pairs`` that may cross the proxy, in order."""
    listed = list(pairs)
    gone = HOP_BY_HOP | _connection_named(listed) | drop
    return [
        (name, value)
        for name, value in listed
        if name.lower() not in gone and well_formed(name, value)
    ]


def to_proto(pairs: Iterable[tuple[str, str]]) -> list[proxy_link_pb2.HttpHeader]:
    """Fields as link messages (values as bytes: they need not be UTF-8)."""
    return [
        proxy_link_pb2.HttpHeader(name=name, value=value.encode("utf-8", "surrogateescape"))
        for name, value in pairs
    ]


def from_proto(headers: Iterable[proxy_link_pb2.HttpHeader]) -> list[tuple[str, str]]:
    """Link messages' fields as text pairs (undecodable bytes kept as surrogates)."""
    return [(h.name, h.value.decode("utf-8", "surrogateescape")) for h in headers]
