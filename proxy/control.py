"""The proxy's questions to the control plane, with each answer cached for as long as the
answer says (ProxyService.CheckTunnelAccess and AuthorizeAgentLink).

Concurrent identical questions share one call. Credentials are kept only as their
SHA-256 in cache keys: a Tunnelplane credential goes as the call's ``authorization``,
basic credentials in the request. A control plane that cannot be reached is
:class:`UnreachableError`; the web side answers 503 then.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from tunnelplane.v1 import proxies_pb2, proxies_pb2_grpc

from proxy.credentials import Offered

T = TypeVar("T")
Decision = proxies_pb2.TunnelAccessDecision
#: Codes that mean "try again later", not "no".
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}
)


class UnreachableError(Exception):
    """The control plane did not answer."""


class RefusedError(Exception):
    """The control plane refused the caller's credential (its gRPC code and message)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Access:
    """A web request's admission: allowed, or refused with a reason."""

    allowed: bool
    refusal: Decision.Refusal.ValueType
    tunnel: str
    #: The tunnel takes basic credentials: ask for them, and strip them.
    basic: bool = False


class TtlCache(Generic[T]):
    """A bounded map whose entries expire; concurrent misses of a key share one load."""

    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, T]] = OrderedDict()
        self._loading: dict[Hashable, asyncio.Future[tuple[T, float]]] = {}

    async def get(self, key: Hashable, load: Callable[[], Awaitable[tuple[T, float]]]) -> T:
        """The cached value of ``key``, or ``load()``'s (value, seconds to keep it)."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            return entry[1]
        pending = self._loading.get(key)
        if pending is not None:
            return (await asyncio.shield(pending))[0]
        future: asyncio.Future[tuple[T, float]] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            value, keep = await load()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, no "never retrieved" noise
            raise
        finally:
            self._loading.pop(key, None)
        future.set_result((value, keep))
        if keep > 0:
            self._entries[key] = (self._clock() + keep, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _seconds(duration: object) -> float:
    return float(duration.ToTimedelta().total_seconds())  # type: ignore[attr-defined]


class ControlPlane:
    """Asks the control plane who may use a tunnel and who may link to it."""

    def __init__(
        self, channel: grpc.aio.Channel, *, timeout: float = 5.0, cache_size: int = 10_000
    ) -> None:
        self._stub = proxies_pb2_grpc.ProxyServiceStub(channel)
        self._timeout = timeout
        self._access: TtlCache[Access] = TtlCache(cache_size)
        self._links: TtlCache[str] = TtlCache(cache_size)

    async def check_access(self, tunnel_id: str, offered: Offered, client_ip: str) -> Access:
        """May a web request from ``client_ip`` with the credentials ``offered`` go in?"""
        key = (tunnel_id, offered.digest(), client_ip)

        async def load() -> tuple[Access, float]:
            metadata = [("x-forwarded-for", client_ip)]
            if offered.bearer:
                metadata.append(("authorization", f"Bearer {offered.bearer}"))
            request = proxies_pb2.CheckTunnelAccessRequest(
                tunnel_id=tunnel_id,
                client_ip=client_ip,
                basic_username=offered.username,
                basic_password=offered.password,
            )
            answer = await self._call(
                self._stub.CheckTunnelAccess(request, metadata=metadata, timeout=self._timeout)
            )
            access = Access(answer.allowed, answer.refusal, answer.tunnel, answer.basic_auth)
            return access, _seconds(answer.cache_for)

        return await self._access.get(key, load)

    async def authorize_link(self, key: str, tunnel: str) -> str:
        """The tunnel's name when the agent key may link to it; :class:`RefusedError` if not."""

        async def load() -> tuple[str, float]:
            metadata = [("authorization", f"Bearer {key}")]
            request = proxies_pb2.AuthorizeAgentLinkRequest(tunnel=tunnel)
            grant = await self._call(
                self._stub.AuthorizeAgentLink(request, metadata=metadata, timeout=self._timeout)
            )
            return grant.tunnel, _seconds(grant.cache_for)

        return await self._links.get((_digest(key), tunnel), load)

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _TRANSIENT:
                raise UnreachableError(exc.details() or exc.code().name) from exc
            raise RefusedError(exc.code(), exc.details() or "") from exc
