"""The webhook HTTP sender (server/workers/webhook_http.py) against real loopback receivers:
an aiohttp.web app that records what it got, raw sockets that never answer or cut a body
short, a closed port, a self-signed TLS receiver and the SSRF address policy."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from server.domain.common.addresses import public_only
from server.storage.tracing import http_trace_config
from server.workers.webhook_http import EXCERPT_BYTES, AttemptResult, WebhookSender
from tests.certs import self_signed

BIG = b"0123456789" * 10_000  # 100 KB
PAYLOAD = b'{"type":"tunnel.created","data":{"id":"tun_1"}}'


@dataclass(frozen=True)
class Seen:
    """One request as the receiver got it."""

    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes
    peer: tuple[str, int]


class Receiver:
    """An aiohttp.web app on 127.0.0.1 (and ::1 when there is one), port 0.

    ``/ok`` answers 200; ``/big`` 100 KB; ``/status/N`` answers N (429 and 503 with
    ``Retry-After: 120``, 302 with a ``Location`` back to ``/ok``); ``/bytes`` invalid UTF-8.
    """

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.port = 0
        self.port6: int | None = None
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = _last_port(self._runner)
        if socket.has_ipv6:
            with contextlib.suppress(OSError):
                site6 = web.TCPSite(self._runner, "::1", 0)
                await site6.start()
                self.port6 = _last_port(self._runner)

    async def close(self) -> None:
        await self._runner.cleanup()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        port = self.port6 if host == "[::1]" and self.port6 else self.port
        return f"http://{host}:{port}{path}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        assert request.transport is not None
        host, port = request.transport.get_extra_info("peername")[:2]
        body = await request.read()
        self.seen.append(Seen(request.method, request.path, headers, body, (host, port)))
        path = request.path
        if path == "/big":
            return web.Response(body=BIG)
        if path == "/bytes":
            return web.Response(body=b"bad \xff byte")
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            extra = {"Retry-After": "120"} if status in (429, 503) else {}
            if status == 302:
                extra = {"Location": "/ok"}
            return web.Response(status=status, text=f"status {status}", headers=extra)
        return web.Response(text="ok")


def _last_port(runner: web.AppRunner) -> int:
    """The port of the site started last (sites listen on port 0)."""
    return int(runner.addresses[-1][1])


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = Receiver()
    await started.start()
    yield started
    await started.close()


@pytest_asyncio.fixture
async def sender() -> AsyncIterator[WebhookSender]:
    opened = WebhookSender(timeout=5.0)
    yield opened
    await opened.close()


@pytest_asyncio.fixture
async def guarded() -> AsyncIterator[WebhookSender]:
    opened = WebhookSender(timeout=5.0, allow=public_only)
    yield opened
    await opened.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def raw_server(response: bytes | None) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A socket server that reads the request head and writes ``response`` then closes, or
    with None never answers (until the client goes away); its port and an event set on the
    first connection."""
    connected = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            if response is None:
                await reader.read()  # until the client hangs up
            else:
                writer.write(response)
                await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), connected
    finally:
        server.close()
        await server.wait_closed()


# --- responses ---------------------------------------------------------------------------


async def test_delivers_body_and_headers_exactly(receiver: Receiver, sender: WebhookSender) -> None:
    headers = {"webhook-id": "msg_1", "webhook-signature": "v1,c2ln", "X-Custom": "Value"}
    result = await sender.send(receiver.url("/ok?x=1"), PAYLOAD, headers)
    assert result == AttemptResult(200, result.latency, "ok", "", None)
    assert result.latency > 0
    [seen] = receiver.seen
    assert (seen.method, seen.path, seen.body) == ("POST", "/ok", PAYLOAD)
    assert seen.headers["webhook-id"] == ["msg_1"]
    assert seen.headers["webhook-signature"] == ["v1,c2ln"]
    assert seen.headers["x-custom"] == ["Value"]
    assert seen.headers["content-type"] == ["application/json"]
    assert seen.headers["user-agent"] == ["Tunnelplane-Webhooks/1"]
    assert seen.headers["content-length"] == [str(len(PAYLOAD))]
    assert "cookie" not in seen.headers


async def test_a_given_content_type_is_kept(receiver: Receiver, sender: WebhookSender) -> None:
    result = await sender.send(
        receiver.url("/ok"), PAYLOAD, {"Content-Type": "application/cloudevents+json"}
    )
    assert result.status == 200
    assert receiver.seen[0].headers["content-type"] == ["application/cloudevents+json"]


async def test_excerpt_is_the_first_kilobyte(receiver: Receiver, sender: WebhookSender) -> None:
    result = await sender.send(receiver.url("/big"), PAYLOAD, {})
    assert (result.status, result.error) == (200, "")
    assert result.excerpt == BIG[:EXCERPT_BYTES].decode()
    assert len(result.excerpt) == EXCERPT_BYTES == 1024


async def test_excerpt_replaces_invalid_utf8(receiver: Receiver, sender: WebhookSender) -> None:
    result = await sender.send(receiver.url("/bytes"), PAYLOAD, {})
    assert result.excerpt == "bad \ufffd byte"


@pytest.mark.parametrize(
    ("status", "retry_after"), [(500, None), (410, None), (429, "120"), (503, "120")]
)
async def test_error_statuses_are_results(
    receiver: Receiver, sender: WebhookSender, status: int, retry_after: str | None
) -> None:
    result = await sender.send(receiver.url(f"/status/{status}"), PAYLOAD, {})
    assert result == AttemptResult(status, result.latency, f"status {status}", "", retry_after)


async def test_redirects_are_not_followed(receiver: Receiver, sender: WebhookSender) -> None:
    result = await sender.send(receiver.url("/status/302"), PAYLOAD, {})
    assert (result.status, result.error) == (302, "")
    assert [seen.path for seen in receiver.seen] == ["/status/302"]


async def test_a_body_cut_short_keeps_the_status(sender: WebhookSender) -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
    async with raw_server(response) as (port, _):
        result = await sender.send(f"http://127.0.0.1:{port}/", PAYLOAD, {})
    assert (result.status, result.excerpt, result.error) == (200, "partial", "")


async def test_keep_alive_reuses_one_connection(receiver: Receiver) -> None:
    loopback = WebhookSender(allow=lambda ip: ip.is_loopback)
    try:
        results = [await loopback.send(receiver.url("/ok"), PAYLOAD, {}) for _ in range(3)]
    finally:
        await loopback.close()
    assert [r.status for r in results] == [200, 200, 200]
    assert len({seen.peer for seen in receiver.seen}) == 1


# --- failures ----------------------------------------------------------------------------


async def test_timeout() -> None:
    timed = WebhookSender(timeout=0.5)
    try:
        async with raw_server(None) as (port, connected):
            started = time.perf_counter()
            result = await timed.send(f"http://127.0.0.1:{port}/", PAYLOAD, {})
            elapsed = time.perf_counter() - started
            assert connected.is_set()
    finally:
        await timed.close()
    assert (result.status, result.error) == (None, "timed out after 0.5 s")
    assert 0.5 <= result.latency <= elapsed < 2.0


async def test_connection_refused(sender: WebhookSender, closed_port: int) -> None:
    result = await sender.send(f"http://127.0.0.1:{closed_port}/", PAYLOAD, {})
    assert result == AttemptResult(None, result.latency, "", "connection refused", None)


async def test_untrusted_certificate_is_a_tls_error(tmp_path: Path, sender: WebhookSender) -> None:
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    try:
        result = await sender.send(f"https://127.0.0.1:{_last_port(runner)}/", PAYLOAD, {})
    finally:
        await runner.cleanup()
    assert result.status is None
    assert result.error.startswith("TLS error: ")
    assert "certificate" in result.error, result.error


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/?token=s3cr3t",
        "http://[::1/?token=s3cr3t",
        "ftp://127.0.0.1:{port}/?token=s3cr3t",
        "http://user:s3cr3t@127.0.0.1:{port}/",
    ],
)
async def test_errors_never_repeat_the_url(
    sender: WebhookSender, closed_port: int, url: str
) -> None:
    result = await sender.send(url.format(port=closed_port), b"s3cr3t", {"auth": "s3cr3t"})
    assert result.status is None
    assert result.error
    assert "s3cr3t" not in result.error
    assert str(closed_port) not in result.error


async def test_a_header_aiohttp_refuses_is_an_invalid_request(
    receiver: Receiver, sender: WebhookSender
) -> None:
    result = await sender.send(receiver.url("/ok"), PAYLOAD, {"x-token": "s3cr3t\r\nx: y"})
    assert (result.status, result.error) == (None, "invalid request")
    assert receiver.seen == []


async def test_cancellation_propagates(sender: WebhookSender) -> None:
    async with raw_server(None) as (port, connected):
        task = asyncio.create_task(sender.send(f"http://127.0.0.1:{port}/", PAYLOAD, {}))
        await connected.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- the address policy --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost", "[::ffff:127.0.0.1]"])
async def test_private_addresses_are_refused(
    receiver: Receiver, guarded: WebhookSender, host: str
) -> None:
    result = await guarded.send(receiver.url("/ok", host), PAYLOAD, {})
    assert result == AttemptResult(None, result.latency, "", "address not allowed", None)
    assert receiver.seen == []


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost"])
async def test_without_a_policy_everything_is_delivered(
    receiver: Receiver, sender: WebhookSender, host: str
) -> None:
    if host == "[::1]" and receiver.port6 is None:
        pytest.skip("no IPv6 loopback")
    result = await sender.send(receiver.url("/ok", host), PAYLOAD, {})
    assert (result.status, result.error) == (200, "")
    assert len(receiver.seen) == 1


async def test_the_resolver_keeps_only_allowed_addresses(receiver: Receiver) -> None:
    asked: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []

    def only_v4_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        asked.append(ip)
        return ip == ipaddress.IPv4Address("127.0.0.1")

    policy = WebhookSender(allow=only_v4_loopback)
    try:
        delivered = await policy.send(receiver.url("/ok", "localhost"), PAYLOAD, {})
        refused = await policy.send(receiver.url("/ok", "127.0.0.2"), PAYLOAD, {})
    finally:
        await policy.close()
    assert (delivered.status, delivered.error) == (200, "")
    assert ipaddress.IPv4Address("127.0.0.1") in asked
    assert refused.error == "address not allowed"
    assert len(receiver.seen) == 1


async def test_numeric_host_forms_are_refused(guarded: WebhookSender, closed_port: int) -> None:
    for host in ("2130706433", "127.1", "0x7f.1", "017700000001"):
        result = await guarded.send(f"http://{host}:{closed_port}/", PAYLOAD, {})
        assert (result.status, result.error) == (None, "address not allowed"), host


async def test_close_is_idempotent(receiver: Receiver) -> None:
    unused = WebhookSender()
    await unused.close()
    await unused.close()
    used = WebhookSender()
    assert (await used.send(receiver.url("/ok"), PAYLOAD, {})).status == 200
    await used.close()
    await used.close()


async def test_attempts_are_client_spans_without_the_urls_secrets(receiver: Receiver) -> None:
    provider = TracerProvider()
    exported = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    traced = WebhookSender(timeout=5.0, trace_configs=[http_trace_config(provider)])
    try:
        result = await traced.send(
            receiver.url("/ok?token=s3cr3t-in-query"), b"{}", {"X-Test": "1"}
        )
    finally:
        await traced.close()
    assert result.status == 200
    (span,) = exported.get_finished_spans()
    assert span.kind == SpanKind.CLIENT
    attributes = dict(span.attributes or {})
    url = str(attributes.get("http.url") or attributes.get("url.full"))
    assert url == receiver.url("/ok")
    assert "s3cr3t" not in str(attributes)
    assert attributes.get("http.status_code", attributes.get("http.response.status_code")) == 200
