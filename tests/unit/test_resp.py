"""The lean Redis protocol client: URLs, encoding and parsing replies however they are cut."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from server.storage.resp import Address, _Incomplete, encode, parse


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", Address()),
        ("redis://localhost", Address(host="localhost")),
        ("redis://h:6380/3", Address(host="h", port=6380, db=3)),
        ("redis://h/?db=4", Address(host="h", db=4)),
        (
            "rediss://us%40er:p%3Ass@h:6390/2",
            Address(host="h", port=6390, tls=True, username="us@er", password="p:ss", db=2),
        ),
        ("redis://:secret@h", Address(host="h", password="secret")),
        ("unix:///run/redis.sock?db=5", Address(path="/run/redis.sock", db=5)),
    ],
)
def test_urls(url: str, expected: Address) -> None:
    assert Address.parse(url) == expected


def test_encode() -> None:
    assert encode((b"EVALSHA", "ab", 6, 1.5)) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n6\r\n$3\r\n1.5\r\n"
    )


SCRIPT_REPLY = b"*7\r\n:0\r\n:12\r\n:0\r\n:-1\r\n:500\r\n:3\r\n:0\r\n"


def test_parse_the_kinds_of_reply() -> None:
    assert parse(SCRIPT_REPLY, 0) == ([0, 12, 0, -1, 500, 3, 0], len(SCRIPT_REPLY))
    assert parse(b"$3\r\nabc\r\n", 0) == (b"abc", 9)
    assert parse(b"$-1\r\n", 0) == (None, 5)
    assert parse(b"+OK\r\n", 0) == (b"OK", 5)
    error, _ = parse(b"-NOSCRIPT No matching script\r\n", 0)
    assert isinstance(error, NoScriptError)
    error, _ = parse(b"-ERR wrong\r\n", 0)
    assert type(error) is ResponseError
    with pytest.raises(RedisConnectionError):
        parse(b"?what\r\n", 0)


@given(st.lists(st.integers(0, len(SCRIPT_REPLY) * 3), max_size=4))
def test_replies_cut_anywhere_parse_the_same(cuts: list[int]) -> None:
    """Bytes arrive in arbitrary pieces: only complete replies are taken, in order."""
    stream = SCRIPT_REPLY + b"$5\r\nhello\r\n" + SCRIPT_REPLY
    buffer, replies = bytearray(), []
    edges = sorted({0, *cuts, len(stream)})
    for start, end in itertools.pairwise(edges):
        buffer += stream[start:end]
        pos = 0
        try:
            while pos < len(buffer):
                reply, pos = parse(buffer, pos)
                replies.append(reply)
        except _Incomplete:
            pass
        del buffer[:pos]
    assert replies == [[0, 12, 0, -1, 500, 3, 0], b"hello", [0, 12, 0, -1, 500, 3, 0]]
    assert not buffer


async def test_a_silent_redis_times_out_and_the_connection_is_replaced() -> None:
    """A Redis that accepts and never answers: commands fail after the timeout, and the
    next one opens a new connection instead of queueing behind the stuck one."""
    import asyncio

    from server.storage.resp import RespConnection

    accepted = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = RespConnection(Address(port=port), timeout=0.05)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            *(connection.execute("PING") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert loop.time() - started < 1.0
        with pytest.raises(TimeoutError):
            await connection.execute("PING")
        assert accepted == 2
    finally:
        await connection.close()
        server.close()
        await server.wait_closed()


def test_the_limiter_command_is_the_generic_encoding_of_its_keys_and_args() -> None:
    from server.domain.limits.model import Bucket, Check, Enforcement
    from server.storage.limiter_script import args_of, evalsha_of, keys_of

    for check in (
        Check("users/u", "10.0.0.1", Bucket(60, 3), Bucket(600, 20)),
        Check(
            "apiKeys/k", "::1", Bucket(7, 1), Bucket(1200, 200), cost=3, max_wait_ms=500.0,
            quota_key="quota:requests:u:202611", quota_limit=10, quota_reset_ms=1234.5,
            dedupe="apiKeys/k:r-1", enforcement=Enforcement.COUNT_ONLY, now_ms=1.5e12,
        ),
    ):  # fmt: skip
        sha = b"f" * 40
        generic = encode((b"EVALSHA", sha, 6, *keys_of(check, "tp:"), *args_of(check)))
        assert evalsha_of(check, "tp:", sha) == generic
