"""Probes tunnel endpoints: a TCP connect, or an HTTP GET whose status line decides.

:func:`probe` does one probe and never raises for network trouble; :class:`EndpointProber`
probes whatever a :class:`ProbeTargets` store says is due and hands each result back to
it, which applies :func:`server.domain.tunnels.endpoints.apply_probe` and schedules the next probe.
Replicas may run side by side when the store's ``due`` claims what it returns (by moving
the next probe time forward, say); otherwise an endpoint is just probed more than once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from server.domain.tunnels.endpoints import EndpointAddress, ProbeThresholds, short_error

USER_AGENT = "tunnelplane-prober"
#: The longest status line read; a peer sending more is not an HTTP server worth trusting.
MAX_STATUS_LINE = 4096
BATCH = 200
CONCURRENCY = 20
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9]{2})(?: [^\r\n]*)?(?:\r?\n)?")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe saw: whether it passed, why not (short, '' if it passed), and how
    long it took in seconds."""

    ok: bool
    error: str
    latency: float


async def probe(
    address: EndpointAddress,
    timeout: float,  # noqa: ASYNC109 - the probe's whole budget: connect, TLS and read
    *,
    ssl_context: ssl.SSLContext | None = None,
    allow: AddressRule | None = None,
) -> ProbeResult:
    """Probe ``address`` once, within ``timeout`` seconds in all.

    ``tcp``: connect and close. ``http``/``https``: ``GET`` the path over HTTP/1.1 (TLS
    with certificate verification, by ``ssl_context`` or the system's defaults) and read
    the status line only; 2xx and 3xx pass. Network failures become a failed result.
    With ``allow``, the host is resolved first and only an address it allows is dialled
    (the same address: no second lookup that could answer differently).
    """
    started = time.perf_counter()
    error = await _attempt(address, timeout, ssl_context, allow)
    return ProbeResult(not error, error, time.perf_counter() - started)


async def _attempt(
    address: EndpointAddress,
    budget: float,
    context: ssl.SSLContext | None,
    allow: AddressRule | None,
) -> str:
    try:
        async with asyncio.timeout(budget):
            dial = address.host
            if allow is not None:
                allowed = await _allowed_address(address, allow)
                if allowed is None:
                    return "address not allowed (loopback, private or link-local)"
                dial = allowed
            if address.scheme == "tcp":
                return await _connect(dial, address.port)
            return await _get(address, dial, _tls(address, context))
    except TimeoutError:
        return f"timed out after {budget:g} s"
    except (OSError, ValueError) as exc:
        return _describe(exc)


def _tls(address: EndpointAddress, context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    if address.scheme != "https":
        return None
    return context or ssl.create_default_context()


AddressRule = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]


async def _allowed_address(address: EndpointAddress, allow: AddressRule) -> str | None:
    infos = await asyncio.get_running_loop().getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM
    )
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if allow(ip):
            return str(ip)
    return None


async def _connect(host: str, port: int) -> str:
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ""


async def _get(address: EndpointAddress, dial: str, context: ssl.SSLContext | None) -> str:
    reader, writer = await asyncio.open_connection(
        dial,
        address.port,
        ssl=context,
        server_hostname=address.host if context is not None else None,
        limit=MAX_STATUS_LINE,
    )
    try:
        writer.write(_request(address))
        await writer.drain()
        line = await reader.readline()
    finally:
        # Only the status line matters: drop the connection instead of waiting for the
        # peer's side of a TLS shutdown, which a slow peer would turn into a timeout.
        writer.transport.abort()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return _verdict(line)


def _request(address: EndpointAddress) -> bytes:
    return (
        f"GET {address.path} HTTP/1.1\r\n"
        f"Host: {address.authority}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")


def _verdict(status_line: bytes) -> str:
    if not status_line:
        return "connection closed before a response"
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        return "not an HTTP/1.x response"
    status = int(match.group(1))
    return "" if 200 <= status < 400 else f"HTTP {status}"


def _describe(exc: BaseException) -> str:
    """A short, credential-free description of a network error."""
    match exc:
        case ssl.SSLCertVerificationError():
            text = f"TLS certificate not trusted: {exc.verify_message}"
        case ssl.SSLError():
            text = f"TLS failed: {exc.reason or 'handshake error'}"
        case socket.gaierror():
            text = f"DNS lookup failed: {exc.strerror}"
        case ConnectionRefusedError():
            text = "connection refused"
        case ConnectionResetError():
            text = "connection reset"
        case OSError() if exc.strerror:
            text = exc.strerror.lower()
        case ValueError():
            text = "not an HTTP/1.x response (status line too long)"
        case _:
            text = type(exc).__name__
    return short_error(text)


# --- the worker -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """One endpoint of one tunnel, due for a probe."""

    tunnel_id: str
    url: str
    address: EndpointAddress


class ProbeTargets(Protocol):
    """Where probe targets come from and where their results go (a repository)."""

    async def due(self, now: float, limit: int) -> list[ProbeTarget]:
        """At most ``limit`` targets whose next probe is at or before ``now`` (Unix s)."""
        ...

    async def record(self, target: ProbeTarget, result: ProbeResult, at: float) -> None:
        """Store ``result`` of a probe that ended at ``at`` and schedule the next one."""
        ...


class EndpointProber:
    """Probes due endpoints, a bounded number at a time, and records what it saw."""

    def __init__(
        self,
        targets: ProbeTargets,
        *,
        log: logging.Logger,
        thresholds: ProbeThresholds | None = None,
        now: Callable[[], float] = time.time,
        concurrency: int = CONCURRENCY,
        batch: int = BATCH,
        ssl_context: ssl.SSLContext | None = None,
        allow: AddressRule | None = None,
    ) -> None:
        if concurrency < 1 or batch < 1:
            raise ValueError("concurrency and batch must be at least 1")
        self._targets = targets
        self._log = log
        self._timeout = (thresholds or ProbeThresholds()).timeout
        self._now = now
        self._batch = batch
        self._slots = asyncio.Semaphore(concurrency)
        self._ssl = ssl_context or ssl.create_default_context()
        #: Which resolved addresses may be dialled (None: any).
        self._allow = allow

    async def run_once(self) -> int:
        """Probe every due target (at most ``batch``) concurrently, at most ``concurrency``
        at once, and record each result; the number of results recorded. A failed probe is
        a result like any other; a target whose recording fails is logged and left for its
        store to offer again."""
        targets = await self._targets.due(self._now(), self._batch)
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._probe_and_record(t)) for t in targets]
        recorded = sum(task.result() for task in tasks)
        if targets:
            self._log.debug("probed endpoints", extra={"due": len(targets), "recorded": recorded})
        return recorded

    async def _probe_and_record(self, target: ProbeTarget) -> bool:
        try:
            async with self._slots:
                result = await probe(
                    target.address, self._timeout, ssl_context=self._ssl, allow=self._allow
                )
            await self._targets.record(target, result, self._now())
        except Exception:  # noqa: BLE001 - logged; one target must not sink the others
            # The URL stays out of the log: its query string may carry a secret.
            self._log.exception(
                "probing an endpoint failed",
                extra={"tunnel_id": target.tunnel_id, "endpoint": target.address.target},
            )
            return False
        return True
