"""Which tunnel a web request is for, and the path the local service sees.

Two forms, as ``TP_PUBLIC_DOMAIN`` decides: by host, ``tun-{id}.{domain}`` (a DNS label
cannot hold the id's underscore, so ``tun-`` stands for ``tun_``; ``tun_`` is accepted
too), and by path prefix, ``/t/{tunnel}/...`` on any host, the prefix removed. Pure
functions: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ID = re.compile(r"tun[_-]([0-9a-hjkmnp-tv-z]{26})")


@dataclass(frozen=True, slots=True)
class Route:
    """A request's tunnel id (``tun_…``) and the target the local service gets."""

    tunnel_id: str
    target: str


def tunnel_id(label: str) -> str | None:
    """The tunnel id a host label or path segment names, if it names one."""
    match = _ID.fullmatch(label.lower())
    return f"tun_{match.group(1)}" if match else None


def host_label(host: str, domain: str) -> str | None:
    """The first label of ``host`` when ``host`` is one label under ``domain``."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.rstrip(".").lower()
    suffix = "." + domain.rstrip(".").lower()
    if not name.endswith(suffix):
        return None
    label = name[: -len(suffix)]
    return label if label and "." not in label else None


def route(host: str, target: str, domain: str) -> Route | None:
    """The route of a request for ``host`` and ``target`` (path and query), or None."""
    if not target.startswith("/"):
        return None
    label = host_label(host, domain)
    if label is not None:
        found = tunnel_id(label)
        return Route(found, target) if found else None
    if not target.startswith("/t/"):
        return None
    segment, slash, rest = target[3:].partition("/")
    segment, query_mark, query = segment.partition("?")
    found = tunnel_id(segment)
    if found is None:
        return None
    path = "/" + rest if slash else "/"
    if query_mark:  # /t/{id}?q: the query belongs to the root
        path = "/?" + query
    return Route(found, path)


def public_url(tunnel_id: str, domain: str, scheme: str = "http", port: int | None = None) -> str:
    """The host-routed URL of a tunnel."""
    body = tunnel_id.removeprefix("tun_")
    suffix = f":{port}" if port else ""
    return f"{scheme}://tun-{body}.{domain}{suffix}/"
