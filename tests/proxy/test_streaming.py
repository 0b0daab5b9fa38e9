"""The data path in one process: web client -> proxy -> agent's exchange -> local service.

Every content type streams chunk by chunk (nothing waits for the end of the response),
bodies stream both ways, and failures answer with a JSON body that says which."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from agent.exchange import LinkSettings, ReversePath
from proxy.web import WebSettings
from tests.certs import self_signed
from tests.helpers import eventually
from tests.proxy.conftest import OTHER_ID, TUNNEL, TUNNEL_ID, Stack, close_stack, open_stack
from tests.proxy.fake_plane import KEY


async def test_a_request_reaches_the_local_service_and_back(stack: Stack) -> None:
    response = await stack.client.post(
        f"{stack.base}/echo/x?q=1", content=b"hello", headers={"X-Custom": "v"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body == {"method": "POST", "path": "/echo/x?q=1", "body": "hello",
                    "host": f"127.0.0.1:{stack.local.port}"}  # fmt: skip
    assert response.headers["x-local"] == "yes"
    seen = stack.local.seen_headers[-1]
    assert seen["X-Custom"] == "v"
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{stack.proxy.port}"


async def test_routing_by_host(stack: Stack) -> None:
    host = f"tun-{TUNNEL_ID.removeprefix('tun_')}.localhost:{stack.proxy.port}"
    response = await stack.client.get(
        f"http://127.0.0.1:{stack.proxy.port}/echo/by-host", headers={"Host": host}
    )
    assert response.status_code == 200
    assert response.json()["path"] == "/echo/by-host"


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/api/generate?n=6&every=0.3", "application/x-ndjson"),
        ("/sse?n=6&every=0.3", "text/event-stream"),
        ("/text?n=6&every=0.3&type=text/plain", "text/plain"),
        ("/text?n=6&every=0.3&type=text/html", "text/html"),
        ("/text?n=6&every=0.3&type=application/octet-stream", "application/octet-stream"),
    ],
)
async def test_every_content_type_streams_chunk_by_chunk(
    stack: Stack, path: str, content_type: str
) -> None:
    """Each piece arrives about when the local service wrote it: six pieces 0.3 s apart
    arrive over 1.5 s or more, not all at the end."""
    async with stack.client.stream("GET", stack.base + path) as response:
        assert response.headers["content-type"].startswith(content_type)
        started = time.monotonic()
        arrivals = [time.monotonic() - started async for _ in response.aiter_raw()]
    assert len(arrivals) >= 5, arrivals
    assert arrivals[0] < 0.25, arrivals  # the first piece did not wait for the others
    assert arrivals[-1] - arrivals[0] > 1.0, arrivals


async def test_a_late_first_token_is_waited_for() -> None:
    stack = await open_stack(WebSettings(first_byte_timeout=5, idle_timeout=0.5))
    try:
        response = await stack.client.get(stack.base + "/late?after=1.5")
        assert response.status_code == 200
        assert response.text == '{"response":"first"}\n'
    finally:
        await close_stack(stack)


async def test_no_first_byte_in_time_is_504_with_a_body() -> None:
    stack = await open_stack(WebSettings(first_byte_timeout=0.5, idle_timeout=5))
    try:
        response = await stack.client.get(stack.base + "/hang")
        assert response.status_code == 504
        assert response.json()["error"]["reason"] == "FIRST_BYTE_TIMEOUT"
        await asyncio.wait_for(stack.local.dropped.wait(), 5)  # the local request was dropped
    finally:
        await close_stack(stack)


async def test_a_flowing_response_outlives_the_idle_timeout() -> None:
    """Pieces 0.3 s apart for 3 s with a 1 s idle timeout: never cut."""
    stack = await open_stack(WebSettings(first_byte_timeout=5, idle_timeout=1))
    try:
        response = await stack.client.get(stack.base + "/sse?n=10&every=0.3")
        assert response.status_code == 200
        assert response.text.count("data: token") == 10
    finally:
        await close_stack(stack)


async def test_a_large_download_arrives_whole(stack: Stack) -> None:
    size = 50 * 1024 * 1024
    digest, got = hashlib.sha256(), 0
    async with stack.client.stream("GET", f"{stack.base}/download?size={size}") as response:
        assert response.headers["content-length"] == str(size)
        async for chunk in response.aiter_raw():
            digest.update(chunk)
            got += len(chunk)
    block = bytes(range(256)) * 256
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()
    assert got == size
    assert digest.hexdigest() == expected


async def test_a_large_upload_streams_through(stack: Stack) -> None:
    size = 20 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def pieces():
        for offset in range(0, size, 1 << 20):
            yield payload[offset : offset + (1 << 20)]

    response = await stack.client.post(f"{stack.base}/upload", content=pieces())
    assert response.status_code == 200
    assert response.json() == {"size": size, "sha256": hashlib.sha256(payload).hexdigest()}


async def test_a_client_that_goes_away_cancels_the_local_request(stack: Stack) -> None:
    task = asyncio.create_task(stack.client.get(stack.base + "/hang"))
    await asyncio.wait_for(stack.local.started.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.wait_for(stack.local.dropped.wait(), 5)


async def test_refused_and_reset_local_service_are_502(stack: Stack) -> None:
    response = await stack.client.get(stack.base + "/reset")
    assert response.status_code == 502
    assert response.json()["error"]["reason"] == "UPSTREAM_RESET"
    await stack.local.close()
    response = await stack.client.get(stack.base + "/echo")
    assert response.status_code == 502
    assert response.json()["error"]["reason"] == "UPSTREAM_REFUSED"
    stack.local = await type(stack.local)().start()  # for the fixture's close


async def test_no_agent_is_503_and_unknown_tunnel_is_404(stack: Stack) -> None:
    stack.plane.tunnels[OTHER_ID] = (TUNNEL.replace(TUNNEL_ID, OTHER_ID), "public")
    response = await stack.client.get(f"http://127.0.0.1:{stack.proxy.port}/t/{OTHER_ID}/")
    assert response.status_code == 503
    assert response.json()["error"]["reason"] == "NO_AGENT"
    unknown = "tun_01jd3k0000000000000000000c"
    response = await stack.client.get(f"http://127.0.0.1:{stack.proxy.port}/t/{unknown}/")
    assert response.status_code == 404
    response = await stack.client.get(f"http://127.0.0.1:{stack.proxy.port}/elsewhere")
    assert response.status_code == 404


async def test_private_tunnel_needs_a_credential_which_never_reaches_the_local_service(
    stack: Stack,
) -> None:
    stack.plane.tunnels[TUNNEL_ID] = (TUNNEL, "private")
    stack.proxy.control._access.clear()
    response = await stack.client.get(stack.base + "/echo")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    response = await stack.client.get(stack.base + "/echo", headers={"Authorization": "Bearer x"})
    assert response.status_code == 401
    assert response.json()["error"]["reason"] == "INVALID_CREDENTIAL"
    response = await stack.client.get(
        stack.base + "/echo", headers={"Authorization": "Bearer good-token"}
    )
    assert response.status_code == 200
    assert "Authorization" not in stack.local.seen_headers[-1]


async def test_many_concurrent_streams_share_one_link(stack: Stack) -> None:
    async def one(i: int) -> int:
        response = await stack.client.get(f"{stack.base}/api/generate?n=5&every=0.05")
        lines = [orjson.loads(line) for line in response.text.splitlines()]
        assert lines[-1] == {"done": True}
        return len(lines)

    counts = await asyncio.gather(*(one(i) for i in range(200)))
    assert counts == [6] * 200
    await eventually(lambda: stack.proxy.registry.links(TUNNEL) == 1)


async def test_a_slow_reader_holds_back_the_local_service(stack: Stack) -> None:
    """A client that stops reading a 400 MB download: the local service is held back
    after a bounded amount (socket buffers and one flow-control window per hop), and that
    amount does not grow while the client waits."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)  # noqa: FBT003
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", stack.proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=65536)
    size = 400 * 1024 * 1024
    writer.write(f"GET /t/{TUNNEL_ID}/download?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.read(65536)
    held = await eventually(lambda: stack.local.written > 0 and stack.local.written)
    await asyncio.sleep(0.5)  # whatever flows now would keep flowing without back-pressure
    settled = stack.local.written
    await asyncio.sleep(1.0)
    assert stack.local.written == settled, (held, settled, stack.local.written)
    assert settled < 32 * 1024 * 1024, settled
    writer.close()


async def test_the_link_runs_over_tls_and_an_agent_that_cannot_verify_it_stays_out(
    tmp_path: Path,
) -> None:
    cert, key = self_signed(tmp_path)
    stack = await open_stack(link_tls=(cert, key))
    try:
        response = await stack.client.get(stack.base + "/sse?n=3&every=0.01")
        assert response.text.count("data:") == 3
        (tmp_path / "other").mkdir()
        other_cert, _ = self_signed(tmp_path / "other")
        doubtful = ReversePath(
            LinkSettings(tunnel=TUNNEL, agent_id="a2", key=KEY, tls=True,
                         root_certificates=other_cert.read_bytes())
        )  # fmt: skip
        lanes = stack.proxy.registry.links(TUNNEL)
        await doubtful.configure([stack.link], stack.local.url)
        await asyncio.sleep(0.5)
        assert stack.proxy.registry.links(TUNNEL) == lanes  # the first agent's only
        await doubtful.stop()
    finally:
        await close_stack(stack)


async def test_websocket_upgrades_pass_through(stack: Stack) -> None:
    url = stack.base.replace("http://", "ws://") + "/ws"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, protocols=("chat.v1",)) as ws:
            assert ws.protocol == "chat.v1"
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=5) == "HELLO"
            await ws.send_bytes(b"\x00\x01\x02")
            assert await ws.receive_bytes(timeout=5) == b"\x02\x01\x00"
            await ws.send_str("close")  # the local service closes: the client sees its code
            message = await ws.receive(timeout=5)
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 4000
        async with session.ws_connect(url) as ws:  # the client closes: the local side sees it
            stack.local.ws_closed.clear()
            await ws.send_str("x")
            assert await ws.receive_str(timeout=5) == "X"
        await asyncio.wait_for(stack.local.ws_closed.wait(), 5)
        refused = stack.base.replace("http://", "ws://") + "/echo/not-a-websocket"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
            await session.ws_connect(refused)
        assert refusal.value.status != 101


async def test_a_state_without_a_target_keeps_the_last_one(stack: Stack) -> None:
    """The control plane names no target when no endpoint is healthy (a service whose
    ``/`` answers 404, say): the agent keeps carrying to the last one it knew."""
    await stack.agent.configure([stack.link], "")
    assert (await stack.client.get(stack.base + "/echo")).status_code == 200
    await stack.agent.configure([], "")
    await eventually(lambda: stack.proxy.registry.links(TUNNEL) == 0)
    assert (await stack.client.get(stack.base + "/echo")).status_code == 503


async def test_metrics_count_requests_bytes_and_first_bytes() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stack = await open_stack(metrics_port=port)
    try:
        await stack.client.get(stack.base + "/sse?n=3&every=0.01")
        await stack.client.get(
            f"http://127.0.0.1:{stack.proxy.port}/t/tun_01jd3k0000000000000000000z/"
        )
        text = (await stack.client.get(f"http://127.0.0.1:{port}/metrics")).text
        assert 'tunnelplane_proxy_requests_total{code_class="2xx",outcome="ok"} 1.0' in text
        assert (
            'tunnelplane_proxy_requests_total{code_class="4xx",outcome="NO_SUCH_TUNNEL"} 1.0'
            in text
        )
        assert (
            'tunnelplane_proxy_bytes_total{direction="out"} 45.0' in text
        )  # 3 x "data: token i\n\n"
        assert "tunnelplane_proxy_first_byte_seconds_count 1.0" in text
        assert "tunnelplane_proxy_active_streams 0.0" in text
    finally:
        await close_stack(stack)


async def test_a_body_over_the_limit_is_413_whether_announced_or_streamed() -> None:
    stack = await open_stack(WebSettings(max_body_bytes=1000))
    try:
        response = await stack.client.post(stack.base + "/upload", content=b"x" * 1001)
        assert response.status_code == 413
        assert response.json()["error"]["reason"] == "BODY_TOO_LARGE"

        async def pieces():
            for _ in range(4):
                yield b"y" * 400

        response = await stack.client.post(stack.base + "/upload", content=pieces())
        assert response.status_code == 413
        response = await stack.client.post(stack.base + "/upload", content=b"z" * 1000)
        assert response.json()["size"] == 1000
    finally:
        await close_stack(stack)


async def test_each_request_counts_once_in_the_agents_reports(stack: Stack) -> None:
    """A proxied request counts as a TCP tunnel's connection does: once, when it ends,
    with its bytes both ways and its latency to the response head; a 502 is an error."""
    counters = stack.agent._counters
    counters.take()
    await stack.client.post(stack.base + "/echo", content=b"12345")
    await stack.client.get(stack.base + "/sse?n=3&every=0.01")
    await stack.client.get(stack.base + "/reset")
    await eventually(lambda: counters.active == 0)  # the agent ends its side just after
    snapshot = counters.take()
    assert snapshot.connections == 3
    assert (snapshot.successes, snapshot.errors) == (2, 1)
    assert snapshot.bytes_in == 5
    assert snapshot.bytes_out > 45  # the echo's JSON and the three events
    assert sum(snapshot.latency_buckets) == 2  # the reset one never got a head
    assert snapshot.active == 0
    assert snapshot.stream_milliseconds >= 20  # the event stream was open 2 x 10 ms at least
