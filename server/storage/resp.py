"""A lean Redis connection for the hot path: commands written the moment they are made,
replies matched in order (Redis answers a connection's commands in order).

The rate limiter makes one ``EVALSHA`` per call. Through redis-py each cost a pool
checkout, a retry wrapper and a pure-Python reply parse, about 105 us of CPU; here it is
one ``transport.write`` and a parse of seven integers in ``data_received``, about 20 us
(measured; ``bench/README.md``). Everything else keeps using redis-py.

Errors use redis-py's exception classes, so callers handle both the same way: a lost or
refused connection is :class:`~redis.exceptions.ConnectionError`, an error reply is
:class:`~redis.exceptions.ResponseError` (:class:`~redis.exceptions.NoScriptError` for
``NOSCRIPT``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

Reply = int | bytes | list[Any] | ResponseError | None


@dataclass(frozen=True, slots=True)
class Address:
    """Where Redis is and how to sign in, from a ``redis://``, ``rediss://`` or
    ``unix://`` URL (the forms redis-py accepts)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""
    tls: bool = False
    username: str = ""
    password: str = ""
    db: int = 0

    @classmethod
    def parse(cls, url: str) -> Address:
        """Read a Redis URL."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        if parts.scheme == "unix":
            db_text = query.get("db", ["0"])[0]
        else:
            db_text = query.get("db", [""])[0] or parts.path.strip("/") or "0"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            path=parts.path if parts.scheme == "unix" else "",
            tls=parts.scheme == "rediss",
            username=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            db=int(db_text or 0),
        )


def bulk(text: str) -> bytes:
    """One RESP bulk string."""
    data = text.encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def encode(args: tuple[bytes | str | int | float, ...]) -> bytes:
    """A command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Incomplete(Exception):  # noqa: N818 - control flow, not an error
    pass


def parse(buffer: bytes | bytearray, pos: int) -> tuple[Reply, int]:  # noqa: PLR0911
    """One reply from ``buffer`` at ``pos``, and where the next begins."""
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line, pos = buffer[pos], buffer[pos + 1 : end], end + 2
    if kind == 58:  # ':' integer
        return int(line), pos
    if kind == 42:  # '*' array
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = parse(buffer, pos)
            items.append(item)
        return items, pos
    if kind == 36:  # '$' bulk string
        size = int(line)
        if size < 0:
            return None, pos
        if len(buffer) < pos + size + 2:
            raise _Incomplete
        return bytes(buffer[pos : pos + size]), pos + size + 2
    if kind == 43:  # '+' simple string
        return bytes(line), pos
    if kind == 45:  # '-' error
        message = bytes(line).decode(errors="replace")
        error = NoScriptError if message.startswith("NOSCRIPT") else ResponseError
        return error(message), pos
    raise RedisConnectionError(f"unexpected reply type {chr(kind)!r} from Redis")


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[Reply]] = deque()
        self.sent_at: deque[float] = deque()
        self.buffer = bytearray()
        self.lost: Exception | None = None
        self.timeout = timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def send(self, command: bytes) -> asyncio.Future[Reply]:
        """Write a command; the future gets its reply, or fails with the connection (or
        with :class:`TimeoutError` when no reply came within the timeout)."""
        assert self.transport is not None
        future: asyncio.Future[Reply] = self._loop.create_future()
        self.pending.append(future)
        self.sent_at.append(self._loop.time())
        self.transport.write(command)
        if self._watchdog is None:
            # One timer per connection, not one per command.
            self._watchdog = self._loop.call_later(self.timeout, self._check)
        return future

    def _check(self) -> None:
        self._watchdog = None
        if not self.sent_at:
            return
        overdue = self.sent_at[0] + self.timeout - self._loop.time()
        if overdue > 0:
            self._watchdog = self._loop.call_later(overdue, self._check)
            return
        # The oldest command got no reply in time: this connection is stuck. Fail what it
        # holds and drop it; the next command opens a fresh one.
        self._fail(TimeoutError(f"no reply from Redis within {self.timeout} s"))
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        pos = 0
        try:
            while pos < len(buffer):
                reply, pos = parse(buffer, pos)
                future = self.pending.popleft()
                self.sent_at.popleft()
                if not future.done():  # its caller may have timed out
                    future.set_result(reply)
        except _Incomplete:
            pass
        except Exception as exc:  # noqa: BLE001 - a garbled stream ends the connection
            self._fail(RedisConnectionError(f"bad reply from Redis: {exc}"))
            if self.transport is not None:
                self.transport.abort()
            return
        del buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail(self, error: Exception) -> None:
        self.lost = error
        self.sent_at.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)


class RespConnection:
    """One connection, (re)opened on first use after a failure."""

    def __init__(self, address: Address, timeout: float = 1.0) -> None:
        self._address = address
        #: For connecting, and for each reply: a command unanswered this long fails with
        #: :class:`TimeoutError` and the connection is dropped.
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._opening: asyncio.Task[_Protocol] | None = None

    async def execute(self, *args: bytes | str | int | float) -> Reply:
        """Send a command now and await its reply (an error reply is raised)."""
        return await self.execute_encoded(encode(args))

    async def execute_encoded(self, command: bytes) -> Reply:
        """:meth:`execute` for a command already in RESP."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._open()
        reply = await protocol.send(command)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def reset(self) -> None:
        """Drop the connection (after a timeout: the next command opens a fresh one)."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    async def close(self) -> None:
        """Close the connection."""
        self.reset()

    async def _open(self) -> _Protocol:
        # Concurrent first calls share one connection attempt.
        if self._opening is None or self._opening.done():
            self._opening = asyncio.get_running_loop().create_task(self._connect())
        try:
            return await asyncio.shield(self._opening)
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from exc

    async def _connect(self) -> _Protocol:
        address, loop = self._address, asyncio.get_running_loop()

        def factory() -> _Protocol:
            return _Protocol(self._timeout)

        async with asyncio.timeout(self._timeout):
            if address.path:
                _, protocol = await loop.create_unix_connection(factory, address.path)
            else:
                context = ssl.create_default_context() if address.tls else None
                _, protocol = await loop.create_connection(
                    factory, address.host, address.port, ssl=context
                )
            self._protocol = protocol
            try:
                if address.password:
                    credentials = (address.username, address.password)
                    await self.execute("AUTH", *(c for c in credentials if c))
                if address.db:
                    await self.execute("SELECT", address.db)
            except ResponseError as exc:
                self.reset()
                raise RedisConnectionError(f"Redis refused the handshake: {exc}") from exc
        return protocol
