"""Peer addresses and request metadata as the pipeline sees them (server/grpc_server.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

from server.grpc_server import metadata_dict, peer_address


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.1:50051", "127.0.0.1"),
        ("ipv4:203.0.113.9:1", "203.0.113.9"),
        ("ipv6:[::1]:50051", "::1"),
        ("ipv6:[2001:db8::42]:443", "2001:db8::42"),
        ("ipv6:[::ffff:192.0.2.1]:8080", "::ffff:192.0.2.1"),
        ("ipv6:%5B::1%5D:50051", "::1"),
        ("ipv6:%5B2001:db8::42%5D:443", "2001:db8::42"),
        ("ipv6:[fe80::1%25eth0]:80", "fe80::1%eth0"),
        ("unix:/run/tunnelplane.sock", "/run/tunnelplane.sock"),
        ("unix:/run/with%20space.sock", "/run/with space.sock"),
        ("unix-abstract:tunnelplane", "tunnelplane"),
        ("", ""),
    ],
)
def test_peer_address(peer: str, address: str) -> None:
    assert peer_address(peer) == address


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], {}),
        ([("authorization", "Bearer t")], {"authorization": "Bearer t"}),
        (
            [("x-forwarded-for", "192.0.2.1"), ("x-forwarded-for", "198.51.100.2")],
            {"x-forwarded-for": "192.0.2.1, 198.51.100.2"},
        ),
        ([("accept", "a"), ("accept", "b"), ("accept", "c")], {"accept": "a, b, c"}),
        ([("cookie", "a=1"), ("cookie", "b=2; c=3")], {"cookie": "a=1; b=2; c=3"}),
        ([("trace-bin", b"\x00\x01"), ("user-agent", "ua")], {"user-agent": "ua"}),
        ([("x-id", "1"), ("x-id", b"\xff"), ("x-id", "2")], {"x-id": "1, 2"}),
        ([("a", ""), ("a", "")], {"a": ", "}),
        (
            grpc.aio.Metadata(("k", "1"), ("k", "2"), ("cookie", "x=1")),
            {"k": "1, 2", "cookie": "x=1"},
        ),
    ],
)
def test_metadata_dict(pairs: Any, expected: dict[str, str]) -> None:
    assert metadata_dict(pairs) == expected


# --- what a real server hands to these functions ---------------------------------------


async def _echo(_request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    seen = {
        "peer": peer_address(context.peer()),
        "metadata": metadata_dict(context.invocation_metadata() or ()),
    }
    return json.dumps(seen).encode()


@pytest_asyncio.fixture
async def echo_server() -> AsyncIterator[tuple[int, int | None]]:
    """A server on 127.0.0.1 and, where the host has IPv6, on [::1]; both on port 0."""
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.Echo", {"E": handler}),)
    )
    port4 = server.add_insecure_port("127.0.0.1:0")
    try:
        port6: int | None = server.add_insecure_port("[::1]:0")
    except RuntimeError:
        port6 = None
    await server.start()
    yield port4, port6
    await server.stop(None)


async def _call(target: str, metadata: tuple[tuple[str, str | bytes], ...] = ()) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        echo = channel.unary_unary("/t.Echo/E")
        return json.loads(await echo(b"", metadata=metadata, timeout=5))


async def test_real_ipv4_peer(echo_server: tuple[int, int | None]) -> None:
    port4, _ = echo_server
    assert (await _call(f"127.0.0.1:{port4}"))["peer"] == "127.0.0.1"


async def test_real_ipv6_peer(echo_server: tuple[int, int | None]) -> None:
    _, port6 = echo_server
    if port6 is None:
        pytest.skip("this host has no IPv6 loopback")
    assert (await _call(f"[::1]:{port6}"))["peer"] == "::1"


async def test_real_metadata(echo_server: tuple[int, int | None]) -> None:
    port4, _ = echo_server
    sent = (
        ("cookie", "a=1"),
        ("cookie", "b=2"),
        # Not x-forwarded-for: grpc-core keeps only the last value of that header.
        ("x-tag", "one"),
        ("x-tag", "two"),
        ("trace-bin", b"\x00\xff"),
        ("authorization", "Bearer token"),
    )
    seen = (await _call(f"127.0.0.1:{port4}", sent))["metadata"]
    assert seen["cookie"] == "a=1; b=2"
    assert seen["x-tag"] == "one, two"
    assert seen["authorization"] == "Bearer token"
    assert "trace-bin" not in seen
    assert "user-agent" in seen  # grpc's own metadata comes through as well
