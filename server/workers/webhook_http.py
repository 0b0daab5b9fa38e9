"""Delivers one webhook attempt over HTTP: a ``POST`` whose outcome is a value, never an error.

The dispatcher needs a status, a latency, a short excerpt of the answer and ``Retry-After``
for every attempt, and many attempts to the same receivers: :class:`WebhookSender` keeps one
pooled ``aiohttp`` session (keep-alive, no cookies, no proxies from the environment, no
redirects) and turns every network failure into an :class:`AttemptResult` with a short error
that never repeats the URL, headers or body (they may carry secrets).

The SSRF check runs where the address is chosen: a resolver that drops every resolved address
the policy refuses, so each new connection is checked, including after a DNS answer changed
(rebinding). aiohttp does not ask the resolver about IP-literal hosts, so :meth:`send` checks
those itself; a reused keep-alive connection was checked when it was opened.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from yarl import URL

from server.domain.tunnels.endpoints import short_error

EXCERPT_BYTES = 1024
#: The most of a response body read: enough to drain a small answer (so its connection can be
#: reused), little enough that a huge one costs nothing; the rest is dropped with the connection.
MAX_READ = 64 * 1024
#: Seconds a resolved (and checked) answer is reused; every answer in the cache was checked.
DNS_CACHE_TTL = 10

AddressRule = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt saw. ``status`` is None when no response arrived, and then ``error``
    says why; ``excerpt`` is the start of the body, ``latency`` in seconds."""

    status: int | None
    latency: float
    excerpt: str
    error: str
    retry_after: str | None


class AddressNotAllowed(OSError):  # noqa: N818 - the dispatcher's name for it
    """Every address of the host is refused by the address policy."""


_ERRNO_TEXT = {errno.ECONNREFUSED: "connection refused", errno.ECONNRESET: "connection reset"}
#: Failures by kind, first match wins (ValueError last: header values aiohttp rejects).
_FIXED: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (AddressNotAllowed, "address not allowed"),
    (socket.gaierror, "could not resolve host"),
    (aiohttp.ServerDisconnectedError, "connection closed before a response"),
    ((aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError), "invalid URL"),
    (aiohttp.ClientResponseError, "invalid HTTP response"),
    (ValueError, "invalid request"),
)


class _PolicyResolver(AbstractResolver):
    """Resolves with the loop's ``getaddrinfo`` and keeps only the addresses ``allow`` allows."""

    def __init__(self, allow: AddressRule | None) -> None:
        self._resolver = aiohttp.ThreadedResolver()
        self._allow = allow

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The allowed addresses of ``host``; :class:`AddressNotAllowed` if there are none."""
        found = await self._resolver.resolve(host, port, family)
        if self._allow is None:
            return found
        kept = [r for r in found if _allowed(r["host"], self._allow)]
        if not kept:
            raise AddressNotAllowed("address not allowed")
        return kept

    async def close(self) -> None:
        """Release the wrapped resolver."""
        await self._resolver.close()


def _allowed(host: str, allow: AddressRule) -> bool:
    try:
        return allow(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return False


def _parse(url: str) -> URL:
    try:
        return URL(url)
    except ValueError:
        raise aiohttp.InvalidURL("(not shown)") from None


def _is_literal(host: str) -> bool:
    # aiohttp's own test (helpers.is_ip_address): hosts like these skip the resolver.
    return ":" in host or host.replace(".", "").isdigit()


class WebhookSender:
    """Sends webhook attempts through one pooled HTTP session, created on first use."""

    def __init__(
        self,
        *,
        timeout: float = 15.0,
        allow: AddressRule | None = None,
        max_connections: int = 200,
        user_agent: str = "Tunnelplane-Webhooks/1",
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        if timeout <= 0 or max_connections < 1:
            raise ValueError("timeout must be positive and max_connections at least 1")
        self._timeout = timeout
        #: Which resolved addresses may be dialled (None: any).
        self._allow = allow
        self._max_connections = max_connections
        self._user_agent = user_agent
        #: Client spans of each attempt, when spans are exported (server/storage/tracing.py).
        self._trace_configs = list(trace_configs)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, url: str, body: bytes, headers: Mapping[str, str]) -> AttemptResult:
        """``POST`` ``body`` to ``url`` once, without following redirects, within the timeout.

        A response is a result with its status, whatever the status or a failure while
        reading its body; no response is a result with status None and a safe ``error``.
        """
        started = time.perf_counter()
        head = bytearray()
        status: int | None = None
        retry_after: str | None = None
        sent = CIMultiDict(headers)
        sent.setdefault("Content-Type", "application/json")
        sent.setdefault("User-Agent", self._user_agent)
        error = ""
        try:
            async with asyncio.timeout(self._timeout):
                target = _parse(url)
                self._check_literal(target.raw_host)
                session = self._open() if self._session is None else self._session
                async with session.post(
                    target, data=body, headers=sent, allow_redirects=False
                ) as response:
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
                    await _read_head(response.content, head)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            # Once the status line arrived the attempt has its answer; a body that then
            # fails or stalls does not change it.
            error = "" if status is not None else self._describe(exc)
        latency = time.perf_counter() - started
        excerpt = bytes(head).decode("utf-8", errors="replace")
        return AttemptResult(status, latency, excerpt, error, retry_after)

    async def close(self) -> None:
        """Close the pooled connections; safe to call more than once."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _check_literal(self, host: str | None) -> None:
        allow = self._allow
        if allow is not None and host and _is_literal(host) and not _allowed(host, allow):
            raise AddressNotAllowed("address not allowed")

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            resolver=_PolicyResolver(self._allow),
            ttl_dns_cache=DNS_CACHE_TTL,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            # The whole attempt is bounded by asyncio.timeout in send.
            timeout=aiohttp.ClientTimeout(),
            trust_env=False,
            trace_configs=self._trace_configs or None,
        )
        return self._session

    def _describe(self, exc: BaseException) -> str:
        """A short description of a failure that names no part of the request."""
        match exc:
            case TimeoutError():
                text = f"timed out after {self._timeout:g} s"
            case aiohttp.ClientConnectorCertificateError():
                cause = exc.certificate_error
                reason = getattr(cause, "verify_message", "") or "certificate not trusted"
                text = f"TLS error: {reason}"
            case aiohttp.ClientSSLError() | ssl.SSLError():
                cause = exc.os_error if isinstance(exc, aiohttp.ClientSSLError) else exc
                text = f"TLS error: {getattr(cause, 'reason', None) or 'handshake failed'}"
            case aiohttp.ClientConnectorError():
                return self._describe(exc.os_error)
            case _ if fixed := next((text for kind, text in _FIXED if isinstance(exc, kind)), ""):
                text = fixed
            case OSError() if exc.errno:
                # Not exc.strerror: asyncio puts the address in it.
                text = _ERRNO_TEXT.get(exc.errno) or os.strerror(exc.errno).lower()
            case _:
                text = type(exc).__name__
        return short_error(text)


async def _read_head(content: aiohttp.StreamReader, head: bytearray) -> None:
    """Read at most :data:`MAX_READ` bytes of ``content``, keeping the first
    :data:`EXCERPT_BYTES` in ``head``."""
    read = 0
    while read < MAX_READ:
        chunk = await content.read(MAX_READ - read)
        if not chunk:
            return
        read += len(chunk)
        head += chunk[: EXCERPT_BYTES - len(head)]


def answered(result: AttemptResult) -> AttemptResult:
    """``result``, unless it shows no live endpoint (raised: its breaker counts it)."""
    if result.status is None or result.status >= 500 or result.status == 429:
        raise UnansweredError(result)
    return result


class UnansweredError(Exception):
    """The endpoint did not answer as a live one does (counted by its breaker)."""

    def __init__(self, result: AttemptResult) -> None:
        super().__init__(result.error or str(result.status))
        self.result = result
