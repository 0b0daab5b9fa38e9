"""Endpoint probes (server/workers/prober.py) against real loopback servers: HTTP that
answers what the test says, TLS, a plain TCP listener, a closed port and a peer that never
answers; then the prober worker against an in-memory store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from server.domain.common.addresses import public_only
from server.domain.tunnels.endpoints import (
    EndpointStatus,
    ProbeThresholds,
    apply_probe,
    parse_endpoint_url,
)
from server.domain.tunnels.model import EndpointHealth
from server.workers.prober import EndpointProber, ProbeResult, ProbeTarget, probe
from server.workers.supervisor import Supervisor, WorkerMetrics
from server.workers.tunnels import probe_loop
from tests.certs import self_signed

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TIMEOUT = 2.0
LOG = logging.getLogger("tests.prober")


# --- loopback peers ---------------------------------------------------------------------


class Servers:
    """asyncio servers on 127.0.0.1, port 0, closed at the end of the test."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []

    async def start(self, handler: Handler, tls: ssl.SSLContext | None = None) -> int:
        """Serve ``handler``; the port."""
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()


@pytest_asyncio.fixture
async def servers() -> AsyncIterator[Servers]:
    started = Servers()
    yield started
    await started.close()


async def finish(writer: asyncio.StreamWriter) -> None:
    """Close our side, whatever state the prober left the connection in."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@dataclass
class HttpStub:
    """Minimal HTTP/1.1: reads the request head, answers ``status``, closes. With a gate,
    holds each answer until the gate opens and counts the requests held at once."""

    status: int = 200
    requests: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    gate: asyncio.Event | None = None
    waiting: int = 0
    peak: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.put_nowait(head)
            await self._hold()
            writer.write(f"HTTP/1.1 {self.status} Status\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the prober hangs up once it has what it needs
        finally:
            await finish(writer)

    async def _hold(self) -> None:
        if self.gate is None:
            return
        self.waiting += 1
        self.peak = max(self.peak, self.waiting)
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1


async def start_http(
    servers: Servers, status: int = 200, tls: ssl.SSLContext | None = None
) -> tuple[HttpStub, int]:
    """An :class:`HttpStub` answering ``status``, and its port."""
    stub = HttpStub(status)
    return stub, await servers.start(stub.handle, tls)


def replying(data: bytes) -> Handler:
    """A peer that reads the request (if any), sends ``data`` and hangs up. (Hanging up on
    an unread request would reset the connection instead.)"""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(data)
            await writer.drain()
        await finish(writer)

    return handle


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener never accepts: connections complete, nothing is ever said."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def at(url: str) -> ProbeTarget:
    return ProbeTarget("tun_1", url, parse_endpoint_url(url, "url"))


# --- one probe --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [(200, ""), (204, ""), (301, ""), (302, ""), (399, ""), (404, "HTTP 404"), (500, "HTTP 500"),
     (503, "HTTP 503")],
)  # fmt: skip
async def test_http_status_decides(servers: Servers, status: int, error: str) -> None:
    _, port = await start_http(servers, status)
    result = await probe(at(f"http://127.0.0.1:{port}/").address, TIMEOUT)
    assert (result.ok, result.error) == (not error, error)
    assert 0 < result.latency < TIMEOUT


async def test_http_request_is_a_polite_get(servers: Servers) -> None:
    stub, port = await start_http(servers)
    result = await probe(at(f"http://127.0.0.1:{port}/healthz?deep=1").address, TIMEOUT)
    assert result.ok
    head = (await stub.requests.get()).decode()
    assert head.split("\r\n") == [
        "GET /healthz?deep=1 HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "User-Agent: tunnelplane-prober",
        "Accept: */*",
        "Connection: close",
        "",
        "",
    ]


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"", "connection closed before a response"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200", ""),  # no line end before the peer hung up: still a status line
        (b"HTTP/1.1 20 OK\r\n", "not an HTTP/1.x response"),
        (b"HTTP/2 200\r\n", "not an HTTP/1.x response"),
        (b"A" * 5000, "not an HTTP/1.x response (status line too long)"),
    ],
)
async def test_odd_replies_fail_plainly(servers: Servers, reply: bytes, error: str) -> None:
    port = await servers.start(replying(reply))
    result = await probe(at(f"http://127.0.0.1:{port}/").address, TIMEOUT)
    assert (result.ok, result.error) == (not error, error)


async def test_https_verifies_the_certificate(servers: Servers, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    stub, port = await start_http(servers, tls=tls)
    address = at(f"https://localhost:{port}/").address

    untrusted = await probe(address, TIMEOUT)
    assert not untrusted.ok
    assert untrusted.error.startswith("TLS certificate not trusted: ")

    trusting = ssl.create_default_context(cafile=str(cert))
    trusted = await probe(address, TIMEOUT, ssl_context=trusting)
    assert (trusted.ok, trusted.error) == (True, "")
    assert (await stub.requests.get()).startswith(b"GET / HTTP/1.1\r\nHost: localhost:")


async def test_tcp_connects_and_hangs_up(servers: Servers) -> None:
    accepted: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait(await reader.read())  # b"" once the prober closes
        await finish(writer)

    port = await servers.start(handle)
    result = await probe(at(f"tcp://127.0.0.1:{port}").address, TIMEOUT)
    assert (result.ok, result.error) == (True, "")
    assert await accepted.get() == b""  # connected, sent nothing, closed


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
async def test_public_only_refuses_to_dial_local_addresses(servers: Servers, host: str) -> None:
    dialled: asyncio.Queue[str] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialled.put_nowait("dialled")
        await finish(writer)

    port = await servers.start(handle)
    address = at(f"tcp://{host}:{port}").address
    refused = await probe(address, TIMEOUT, allow=public_only)
    assert (refused.ok, refused.error) == (
        False,
        "address not allowed (loopback, private or link-local)",
    )
    assert dialled.empty()
    if host != "[::1]":  # the test server listens on IPv4 only
        assert (await probe(address, TIMEOUT)).ok  # by default (development) it is probed


@pytest.mark.parametrize("scheme", ["http", "https", "tcp"])
async def test_a_closed_port_is_refused(closed_port: int, scheme: str) -> None:
    result = await probe(at(f"{scheme}://127.0.0.1:{closed_port}").address, TIMEOUT)
    assert (result.ok, result.error) == (False, "connection refused")


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_silent_peer_times_out_within_the_budget(silent_port: int, scheme: str) -> None:
    result = await probe(at(f"{scheme}://127.0.0.1:{silent_port}/").address, 0.2)
    assert (result.ok, result.error) == (False, "timed out after 0.2 s")
    assert 0.2 <= result.latency < 1.0


async def test_an_unknown_host_fails_its_dns_lookup() -> None:
    result = await probe(at("http://no-such-host.invalid/").address, 5.0)
    assert not result.ok
    assert result.error.startswith("DNS lookup failed")


# --- the worker -------------------------------------------------------------------------


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float = 1_764_000_000.0) -> None:
        self.time = now

    def now(self) -> float:
        return self.time


@dataclass
class MemoryTargets:
    """ProbeTargets kept in dicts, scheduling as a repository would."""

    thresholds: ProbeThresholds
    targets: list[ProbeTarget]
    start: float
    broken: set[str] = field(default_factory=set)  # URLs whose record fails
    unavailable: int = 0  # calls of due() that fail before it works
    status: dict[str, EndpointStatus] = field(default_factory=dict)
    results: dict[str, ProbeResult] = field(default_factory=dict)
    recorded: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.next_at = dict.fromkeys((t.url for t in self.targets), self.start)

    async def due(self, now: float, limit: int) -> list[ProbeTarget]:
        if self.unavailable:
            self.unavailable -= 1
            raise ConnectionError("database is down")
        return [t for t in self.targets if self.next_at[t.url] <= now][:limit]

    async def record(self, target: ProbeTarget, result: ProbeResult, at: float) -> None:
        if target.url in self.broken:
            raise ConnectionError("database is down")
        before = self.status.get(target.url, EndpointStatus())
        self.status[target.url] = apply_probe(before, result.ok, result.error, at, self.thresholds)
        self.results[target.url] = result
        self.next_at[target.url] = at + self.thresholds.interval
        self.recorded.put_nowait(target.url)

    def health(self) -> dict[str, EndpointHealth]:
        return {url: status.health for url, status in self.status.items()}


def prober_for(targets: MemoryTargets, clock: Clock, concurrency: int = 20) -> EndpointProber:
    return EndpointProber(
        targets,
        log=LOG,
        thresholds=targets.thresholds,
        now=clock.now,
        concurrency=concurrency,
    )


async def test_run_once_probes_what_is_due_and_records_it(
    servers: Servers, closed_port: int
) -> None:
    _, up = await start_http(servers, 200)
    _, failing = await start_http(servers, 503)
    tcp = await servers.start(replying(b""))
    urls = [
        f"http://127.0.0.1:{up}/",
        f"http://127.0.0.1:{failing}/",
        f"tcp://127.0.0.1:{tcp}",
        f"tcp://127.0.0.1:{closed_port}",
    ]
    clock = Clock()
    thresholds = ProbeThresholds(interval=30.0, timeout=TIMEOUT)
    store = MemoryTargets(thresholds, [at(url) for url in urls], clock.time)
    prober = prober_for(store, clock)

    assert await prober.run_once() == 4
    assert {u: (r.ok, r.error) for u, r in store.results.items()} == {
        urls[0]: (True, ""),
        urls[1]: (False, "HTTP 503"),
        urls[2]: (True, ""),
        urls[3]: (False, "connection refused"),
    }
    assert await prober.run_once() == 0  # rescheduled 30 s ahead

    for _ in range(2):
        clock.time += 30.0
        assert await prober.run_once() == 4
    healthy, unhealthy = EndpointHealth.HEALTHY, EndpointHealth.UNHEALTHY
    assert store.health() == dict(zip(urls, [healthy, unhealthy, healthy, unhealthy], strict=True))
    assert store.status[urls[1]].last_error == "HTTP 503"


async def test_a_failing_record_is_logged_and_spares_the_others(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    _, port = await start_http(servers)
    good, bad = f"http://127.0.0.1:{port}/a", f"http://127.0.0.1:{port}/b?token=s3cret"
    clock = Clock()
    store = MemoryTargets(ProbeThresholds(), [at(good), at(bad)], clock.time, broken={bad})
    with caplog.at_level(logging.ERROR, LOG.name):
        assert await prober_for(store, clock).run_once() == 1
    assert set(store.results) == {good}
    [entry] = caplog.records
    assert entry.getMessage() == "probing an endpoint failed"
    assert entry.__dict__["tunnel_id"] == "tun_1"
    assert "s3cret" not in caplog.text


async def test_probes_run_at_most_concurrency_at_once(servers: Servers) -> None:
    stub, port = await start_http(servers)
    stub.gate = asyncio.Event()
    clock = Clock()
    targets = [at(f"http://127.0.0.1:{port}/{i}") for i in range(5)]
    store = MemoryTargets(ProbeThresholds(), targets, clock.time)
    running = asyncio.create_task(prober_for(store, clock, concurrency=2).run_once())
    async with asyncio.timeout(TIMEOUT):
        for _ in range(2):
            await stub.requests.get()
    with pytest.raises(TimeoutError):  # a third would come now if the bound leaked
        async with asyncio.timeout(0.2):
            await stub.requests.get()
    stub.gate.set()
    assert await running == 5
    assert stub.peak == 2


async def test_run_survives_errors_and_cancels_cleanly(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    stub, port = await start_http(servers)
    clock = Clock()
    store = MemoryTargets(ProbeThresholds(), [at(f"http://127.0.0.1:{port}/")], clock.time)
    store.unavailable = 2
    registry = CollectorRegistry()
    supervisor = Supervisor(WorkerMetrics(registry))
    with caplog.at_level(logging.ERROR, "tunnelplane.workers"):
        supervisor.start([probe_loop(prober_for(store, clock), poll_interval=0.01)])
        async with asyncio.timeout(TIMEOUT):
            assert await store.recorded.get() == f"http://127.0.0.1:{port}/"
        await supervisor.stop()
    assert [getattr(r, "loop", None) for r in caplog.records] == ["prober"] * 2
    assert registry.get_sample_value("tunnelplane_worker_errors_total", {"loop": "prober"}) == 2
    assert stub.requests.qsize() == 1


async def test_cancelling_mid_probe_leaves_nothing_behind(servers: Servers) -> None:
    stub, port = await start_http(servers)
    stub.gate = asyncio.Event()
    clock = Clock()
    store = MemoryTargets(ProbeThresholds(), [at(f"http://127.0.0.1:{port}/")], clock.time)
    running = asyncio.create_task(prober_for(store, clock).run_once())
    async with asyncio.timeout(TIMEOUT):
        await stub.requests.get()  # the probe is waiting for its answer
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    stub.gate.set()
    assert store.results == {}
