"""Instances of one proxy find each other's agents: each publishes the tunnels it holds
agents' lanes for in a registry the instances share (Redis; in one process, a map), and
a request for a tunnel whose agent has no lane here is relayed to an instance that holds
one, streaming both ways, once (a relayed request is never relayed again).

The hop carries the instance's admin token (``X-Tunnelplane-Hop``): only then does the
next instance take the web client's address from ``X-Tunnelplane-Client-Ip`` (for
``ip_allowlist``); the receiving instance checks access again with the client's own
credential, which the hop forwards unchanged. WebSocket upgrades are not relayed.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterable
from typing import Protocol

import aiohttp
import redis.asyncio as redis
from aiohttp import web

from proxy import fields

log = logging.getLogger("tunnelplane.proxy.peers")

HOP = "X-Tunnelplane-Hop"
CLIENT_IP = "X-Tunnelplane-Client-Ip"
#: How long a published holding lasts unless renewed, s (renewed every :data:`RENEW`).
HOLD_FOR, RENEW = 15.0, 5.0
#: Where a request keeps the client's address the proxy decided on, and whether a relayed
#: answer has started going back (too late then to try another instance).
CLIENT_KEY = web.RequestKey("tp_client_ip", str)
STARTED = web.RequestKey("tp_relay_started", bool)


class Peers(Protocol):
    """The registry the instances share."""

    async def publish(self, tunnels: Iterable[str]) -> None:
        """Say that this instance holds lanes for ``tunnels`` (and no others)."""
        ...

    async def holders(self, tunnel: str) -> list[str]:
        """Base URLs of the other instances that hold lanes for ``tunnel`` now."""
        ...

    async def close(self) -> None:
        """Withdraw what this instance published."""
        ...


class MemoryPeers:
    """Instances in one process (tests, or a single embedded proxy: nobody to relay to)."""

    def __init__(self, me: str, shared: dict[str, dict[str, float]] | None = None) -> None:
        self.me = me
        self._shared: dict[str, dict[str, float]] = {} if shared is None else shared

    async def publish(self, tunnels: Iterable[str]) -> None:
        until, wanted = time.time() + HOLD_FOR, set(tunnels)
        for tunnel, holders in self._shared.items():
            if tunnel not in wanted:
                holders.pop(self.me, None)
        for tunnel in wanted:
            self._shared.setdefault(tunnel, {})[self.me] = until

    async def holders(self, tunnel: str) -> list[str]:
        now = time.time()
        found = self._shared.get(tunnel, {})
        return [url for url, until in found.items() if until > now and url != self.me]

    async def close(self) -> None:
        await self.publish(())


class RedisPeers:
    """The registry in Redis: a sorted set per tunnel, holder URL scored by its expiry."""

    def __init__(self, client: redis.Redis, me: str, prefix: str = "tp:") -> None:
        self._redis = client
        self.me = me
        self._prefix = prefix
        self._published: set[str] = set()

    def _key(self, tunnel: str) -> str:
        return f"{self._prefix}proxy:lanes:{tunnel}"

    async def publish(self, tunnels: Iterable[str]) -> None:
        wanted, until = set(tunnels), time.time() + HOLD_FOR
        async with self._redis.pipeline(transaction=False) as pipe:
            for tunnel in self._published - wanted:
                pipe.zrem(self._key(tunnel), self.me)
            for tunnel in wanted:
                pipe.zadd(self._key(tunnel), {self.me: until})
                pipe.expire(self._key(tunnel), int(HOLD_FOR * 4))
            await pipe.execute()
        self._published = wanted

    async def holders(self, tunnel: str) -> list[str]:
        found = await self._redis.zrangebyscore(self._key(tunnel), time.time(), "+inf")
        urls = [item.decode() if isinstance(item, bytes) else str(item) for item in found]
        return [url for url in urls if url != self.me]

    async def close(self) -> None:
        try:
            await self.publish(())
        finally:
            await self._redis.aclose()


def client_ip(request: web.BaseRequest, token: str) -> tuple[str, bool]:
    """The web client's address and whether the request came through a hop: the address a
    verified hop names, else the connection's."""
    hop = request.headers.get(HOP)
    if hop is None:
        return request.remote or "", False
    trusted = bool(token) and hmac.compare_digest(hop.encode(), token.encode())
    claimed = request.headers.get(CLIENT_IP, "")
    return (claimed if trusted and claimed else request.remote or ""), True


async def relay(
    request: web.BaseRequest,
    base_url: str,
    token: str,
    session: aiohttp.ClientSession,
    first_byte_timeout: float,
) -> web.StreamResponse:
    """``request`` relayed to the instance at ``base_url``, its answer streamed back;
    ``aiohttp.ClientError`` when that instance cannot be reached (before anything went
    back to the client)."""
    headers = [
        (name, value)
        for name, value in request.headers.items()
        if name.lower()
        not in fields.HOP_BY_HOP | {"content-length", HOP.lower(), CLIENT_IP.lower()}
    ]
    headers += [(HOP, token), (CLIENT_IP, request.get(CLIENT_KEY, request.remote or ""))]
    body = request.content.iter_any() if request.body_exists else None
    limit = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=first_byte_timeout)
    async with session.request(
        request.method,
        base_url + request.raw_path,
        headers=headers,
        data=body,
        allow_redirects=False,
        timeout=limit,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in fields.HOP_BY_HOP | {"content-length"}:
                response.headers.add(name, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        request[STARTED] = True
        async for piece in upstream.content.iter_any():
            await response.write(piece)
        await response.write_eof()
        return response
