"""A TCP relay: accepts client connections and pipes each one to the current target."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from agent.counters import Counters

log = logging.getLogger("tunnelplane.agent.relay")

#: Bytes read at a time from either side.
CHUNK = 64 * 1024
#: Idle timeout of a connection when the tunnel's configuration sets none.
DEFAULT_IDLE_TIMEOUT = 60.0
#: Longest wait for the target to accept a connection.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Longest wait for a closed connection's buffered bytes to flush before it is aborted.
CLOSE_GRACE = 1.0


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) into host and port; the host may be empty."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not a host:port address: {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@dataclass(frozen=True)
class _Stream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class _Outcome:
    """How one relayed connection went: counted when it ends."""

    ok: bool = True  # a connection cut short by stop() is not the tunnel's error
    connect_seconds: float | None = None  # None: the target was never reached


class Relay:
    """Listens on ``listen_host:listen_port`` and relays each connection to a target.

    A port of 0 picks a free one (see :attr:`port`). Every connection is bounded by an
    idle timeout (no byte either way for that long closes it) and the number open at once
    by ``max_connections`` (0: unlimited); a connection over the limit is closed at once
    and counted as an error, as is one whose target cannot be reached.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        target_host_port: str,
        counters: Counters,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = 0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        parse_address(target_host_port)
        self._listen = (listen_host, listen_port)
        self._target = target_host_port
        self._counters = counters
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False

    @property
    def port(self) -> int:
        """The port the relay listens on; known once started.

        With port 0 and a host of several addresses (or none: every interface), each
        address gets its own port; this is the first one's.
        """
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the relay is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def listen_address(self) -> tuple[str, int]:
        """The host and port the relay was asked to listen on (port 0: any)."""
        return self._listen

    @property
    def target(self) -> str:
        """Where new connections go, ``host:port``."""
        return self._target

    @property
    def open_connections(self) -> int:
        """Connections being relayed now."""
        return len(self._tasks)

    async def wait_until_idle(self) -> None:
        """Wait until no connection is open (counters are final for those that ended)."""
        await self._drained.wait()

    async def start(self) -> None:
        """Start listening."""
        host, port = self._listen
        self._server = await asyncio.start_server(self._accept, host or None, port)
        log.info("relay listening", extra={"listen_port": self.port, "target": self._target})

    def refuse_new(self) -> None:
        """Close the listener now: new connections are refused, open ones go on."""
        self._closing = True
        if self._server is not None:
            self._server.close()

    async def drain(self, grace: float) -> None:
        """Stop accepting at once (new connections are refused), let the open ones go on
        for at most ``grace`` seconds, then close whatever is still open."""
        self.refuse_new()
        if grace > 0 and self._tasks:
            log.info("relay draining", extra={"open_connections": len(self._tasks)})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._drained.wait()
        await self.stop()

    async def stop(self) -> None:
        """Close the listener and every open connection, and wait until they are closed."""
        self.refuse_new()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            log.info("relay stopped", extra={"closed_connections": len(tasks)})
        self._server = None

    def retarget(self, target: str) -> None:
        """Send new connections to ``target`` (``host:port``); open ones stay where they are."""
        parse_address(target)
        if target != self._target:
            log.info("relay retargeted", extra={"target": target, "previous": self._target})
            self._target = target

    def configure(self, *, idle_timeout: float, max_connections: int) -> None:
        """Change the idle timeout (open connections included) and the connection limit."""
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or self._full():
            if not self._closing:
                self._counters.rejected()
                log.warning("connection limit reached", extra={"limit": self._max_connections})
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._drained.clear()
        try:
            await self._serve(_Stream(reader, writer))
        finally:
            self._tasks.discard(task)
            if not self._tasks:
                self._drained.set()

    def _full(self) -> bool:
        return 0 < self._max_connections <= len(self._tasks)

    async def _serve(self, client: _Stream) -> None:
        self._counters.opened()
        outcome = _Outcome()
        opened = time.monotonic()
        try:
            await self._relay(client, outcome)
        except ConnectionError as exc:  # a peer reset or closed the connection: its choice
            log.debug("connection closed by a peer", extra={"error": repr(exc)})
        except OSError as exc:
            log.warning("connection failed", extra={"error": repr(exc)})
            outcome.ok = False
        finally:
            # The whole connection is counted now, its connect latency included, so that
            # no report holds a latency whose request belongs to a later report.
            self._counters.closed(
                ok=outcome.ok,
                connect_seconds=outcome.connect_seconds,
                open_seconds=time.monotonic() - opened,
            )
            await _close(client.writer)

    async def _relay(self, client: _Stream, outcome: _Outcome) -> None:
        target = await self._connect(self._target, outcome)
        if target is None:
            outcome.ok = False
            return
        try:
            await self._carry(client, target)
        finally:
            await _close(target.writer)

    async def _connect(self, address: str, outcome: _Outcome) -> _Stream | None:
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:  # TimeoutError is an OSError
            log.warning("target unreachable", extra={"target": address, "error": repr(exc)})
            return None
        outcome.connect_seconds = loop.time() - started
        return _Stream(reader, writer)

    async def _carry(self, client: _Stream, target: _Stream) -> None:
        """Pipe both ways until both directions end, one fails, or the connection idles."""
        loop = asyncio.get_running_loop()
        idle = asyncio.timeout(self._idle_timeout)

        def touch() -> None:
            idle.reschedule(loop.time() + self._idle_timeout)

        try:
            async with idle:
                await _all_or_first_error(
                    self._pipe(client.reader, target.writer, touch, inbound=True),
                    self._pipe(target.reader, client.writer, touch, inbound=False),
                )
        except TimeoutError:
            if not idle.expired():
                raise  # a socket timeout, not the idle timeout
            log.debug("connection idle", extra={"idle_timeout": self._idle_timeout})

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        touch: Callable[[], None],
        *,
        inbound: bool,
    ) -> None:
        """Copy one direction until end of file, then half-close the other side."""
        while data := await reader.read(CHUNK):
            touch()
            writer.write(data)
            await writer.drain()
            touch()
            if inbound:
                self._counters.bytes_in += len(data)
            else:
                self._counters.bytes_out += len(data)
        if writer.can_write_eof():
            writer.write_eof()


async def _all_or_first_error(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run concurrently until all end or one fails; then cancel the rest and raise."""
    pending = {asyncio.ensure_future(coroutine) for coroutine in coroutines}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a stream, flushing what is buffered for a moment, then aborting."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_GRACE):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass  # the peer reset the connection: it is closed all the same
