"""Real peers for the agent's tests: an echo TCP service and a test-double control plane
(a real grpc.aio server on loopback implementing AgentService); and the reference agent's
session run in the test's own process, against either control plane."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from tunnelplane.v1 import agents_pb2, agents_pb2_grpc

from agent.session import Session, SessionSettings

DesiredState = agents_pb2.DesiredState
T = TypeVar("T")


class EchoServer:
    """Echoes every byte (through ``transform``); on end of file it answers ``marker``."""

    def __init__(self, transform: Callable[[bytes], bytes] = bytes, marker: bytes = b"") -> None:
        self._transform = transform
        self._marker = marker
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.accepted = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> EchoServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        try:
            while data := await reader.read(65536):
                writer.write(self._transform(data))
                await writer.drain()
            if self._marker:
                writer.write(self._marker)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self._handlers.discard(task)


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection to 127.0.0.1:port, closed at the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def round_trip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    """Send ``data`` and read as many bytes back."""
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(5):
        return await reader.readexactly(len(data))


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Whether the peer closes the connection (end of file or reset) without sending."""
    try:
        async with asyncio.timeout(5):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True


def unused_port() -> int:
    """A loopback port that nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def desired(
    version: int,
    run: DesiredState.Run.ValueType = DesiredState.RUN_STARTED,
    *,
    listen: str = "127.0.0.1:0",
    target: str = "",
    max_connections: int = 0,
    idle_seconds: int = 0,
    stop_grace: float | None = None,
) -> DesiredState:
    """A desired state."""
    state = DesiredState(run=run, listen_address=listen, target=target, version=version)
    state.config.max_connections = max_connections
    if idle_seconds:
        state.config.idle_timeout.FromSeconds(idle_seconds)
    if stop_grace is not None:
        state.stop_grace.FromNanoseconds(int(stop_grace * 1e9))
    return state


class FakeControlPlane(agents_pb2_grpc.AgentServiceServicer):
    """AgentService over real loopback gRPC, recording what agents send.

    It welcomes each stream with ``last_sequence``, sends the current desired state after
    welcome and on every :meth:`push`, and acknowledges reports when ``ack`` is set,
    counting each sequence once, and refusing those whose sequence is in ``refuse_reports``.
    :meth:`go_away` tells every agent to reconnect and ends its stream.
    """

    def __init__(
        self,
        *,
        last_sequence: int = 0,
        ack: bool = True,
        desired_state: DesiredState | None = None,
        refuse: grpc.StatusCode | None = None,
        heartbeat_seconds: int = 0,
        welcome: bool = True,
    ) -> None:
        self.last_sequence = last_sequence
        self.ack = ack
        self.desired = desired_state
        self.refuse = refuse
        self.heartbeat_seconds = heartbeat_seconds
        self.welcome = welcome
        self.metadata: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.hellos: asyncio.Queue[agents_pb2.AgentHello] = asyncio.Queue()
        self.reports: asyncio.Queue[agents_pb2.AgentReport] = asyncio.Queue()
        self.heartbeats: asyncio.Queue[agents_pb2.AgentHeartbeat] = asyncio.Queue()
        self.counted: set[int] = set()
        self.refuse_reports: set[int] = set()
        self._outboxes: set[asyncio.Queue[agents_pb2.ConnectResponse | None]] = set()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(
        self, port: int = 0, credentials: grpc.ServerCredentials | None = None
    ) -> FakeControlPlane:
        """Serve on 127.0.0.1:port (0: a free one)."""
        self._server = grpc.aio.server()
        agents_pb2_grpc.add_AgentServiceServicer_to_server(self, self._server)
        address = f"127.0.0.1:{port}"
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        await self._server.start()
        return self

    async def stop(self) -> None:
        """Stop at once, cutting every stream, as a crashing control plane would."""
        assert self._server is not None
        await self._server.stop(grace=None)

    def push(self, state: DesiredState) -> None:
        """Make ``state`` the desired state and send it to every connected agent."""
        self.desired = state
        for outbox in self._outboxes:
            outbox.put_nowait(agents_pb2.ConnectResponse(desired_state=state))

    def go_away(self, reconnect_within: float = 0.0) -> None:
        """Tell every connected agent to reconnect, and end their streams."""
        message = agents_pb2.GoAway(reason="going away for the test")
        message.reconnect_within.FromNanoseconds(int(reconnect_within * 1e9))
        for outbox in self._outboxes:
            outbox.put_nowait(agents_pb2.ConnectResponse(go_away=message))
            outbox.put_nowait(None)

    async def Connect(  # noqa: N802 - the RPC's name
        self,
        request_iterator: AsyncIterator[agents_pb2.ConnectRequest],
        context: grpc.aio.ServicerContext[agents_pb2.ConnectRequest, agents_pb2.ConnectResponse],
    ) -> AsyncIterator[agents_pb2.ConnectResponse]:
        self.metadata.put_nowait(dict(context.invocation_metadata() or ()))
        if self.refuse is not None:
            await context.abort(self.refuse, "refused by the test")
        first = await anext(aiter(request_iterator))
        self.hellos.put_nowait(first.hello)
        if not self.welcome:
            await asyncio.Event().wait()  # a hung control plane: never answers
        yield agents_pb2.ConnectResponse(welcome=self._welcome(first.hello))
        outbox: asyncio.Queue[agents_pb2.ConnectResponse | None] = asyncio.Queue()
        if self.desired is not None:
            outbox.put_nowait(agents_pb2.ConnectResponse(desired_state=self.desired))
        self._outboxes.add(outbox)
        reader = asyncio.create_task(self._consume(request_iterator, outbox))
        try:
            while (response := await outbox.get()) is not None:
                yield response
        finally:
            self._outboxes.discard(outbox)
            reader.cancel()

    def _welcome(self, hello: agents_pb2.AgentHello) -> agents_pb2.AgentWelcome:
        return agents_pb2.AgentWelcome(
            session=f"{hello.tunnel}/agents/{hello.agent_id}",
            heartbeat_interval=duration_pb2.Duration(seconds=self.heartbeat_seconds),
            last_sequence=self.last_sequence,
        )

    async def _consume(
        self,
        requests: AsyncIterator[agents_pb2.ConnectRequest],
        outbox: asyncio.Queue[agents_pb2.ConnectResponse | None],
    ) -> None:
        async for request in requests:
            if request.HasField("heartbeat"):
                self.heartbeats.put_nowait(request.heartbeat)
            elif request.HasField("report"):
                self.reports.put_nowait(request.report)
                if self.ack:
                    outbox.put_nowait(agents_pb2.ConnectResponse(ack=self._ack(request.report)))
        outbox.put_nowait(None)

    def _ack(self, report: agents_pb2.AgentReport) -> agents_pb2.ReportAck:
        if report.sequence in self.refuse_reports:
            return agents_pb2.ReportAck(
                sequence=report.sequence, refused=True, refusal="report.sequence: refused"
            )
        counted = report.sequence not in self.counted
        self.counted.add(report.sequence)
        return agents_pb2.ReportAck(sequence=report.sequence, counted=counted)


async def next_item(queue: asyncio.Queue[T], seconds: float = 10) -> T:
    """The next item of ``queue``, waiting at most ``seconds``."""
    async with asyncio.timeout(seconds):
        return await queue.get()


@contextlib.asynccontextmanager
async def running(session: Session) -> AsyncIterator[Session]:
    """Run the session for the block; then stop it and check that it ends."""
    task = asyncio.create_task(session.run())
    try:
        yield session
    finally:
        session.stop()
        async with asyncio.timeout(10):
            await task


@contextlib.asynccontextmanager
async def reference_agent(
    port: int, key: str, tunnel: str, agent_id: str, report_interval: float = 0.2
) -> AsyncIterator[Session]:
    """The reference agent's session for ``tunnel``, connecting to 127.0.0.1:``port``."""
    settings = SessionSettings(
        control_plane=f"127.0.0.1:{port}",
        tunnel=tunnel,
        agent_id=agent_id,
        key=key,
        heartbeat_interval=1.0,
        report_interval=report_interval,
    )
    async with running(Session(settings)) as session:
        yield session
