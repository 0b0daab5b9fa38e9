"""The parts of the cluster proof (tests/integration/test_cluster.py): server processes on
fixed ports that can be killed, stopped and started again; a tally of calls by outcome;
and the clients that keep the cluster busy (writers over gRPC and HTTP, watchers that
resume after the last event they saw, a caller hammering past its rate limit)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tunnelplane.v1 import tunnels_pb2, tunnels_pb2_grpc, users_pb2, users_pb2_grpc

from tests.helpers import TestUser, free_port
from tests.processes import ROOT

P = tunnels_pb2
W = tunnels_pb2.WatchTunnelsResponse


# --- server processes ----------------------------------------------------------------------


class Node:
    """One ``python -m server serve`` on ports of its own, kept across restarts (so the
    clients' address lists stay true). Its log is read as it is written, each line with
    the monotonic time it arrived."""

    def __init__(self, index: int, env: dict[str, str]) -> None:
        self.index = index
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.env = env | {
            "TP_GRPC_PORT": str(self.grpc_port),
            "TP_HTTP_PORT": str(self.http_port),
            "TP_METRICS_PORT": str(self.metrics_port),
        }
        self.process: asyncio.subprocess.Process | None = None
        self.log: list[tuple[float, dict[str, Any]]] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start it and wait until it serves."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "serve",
            env=self.env, cwd=ROOT, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        serving = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(self.process, serving))
        async with asyncio.timeout(30):
            await serving

    async def _read(
        self, process: asyncio.subprocess.Process, serving: asyncio.Future[None]
    ) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            entry = json.loads(line)
            self.log.append((asyncio.get_running_loop().time(), entry))
            if entry.get("message") == "serving" and not serving.done():
                serving.set_result(None)
        if not serving.done():
            serving.set_exception(AssertionError(f"node {self.index} exited: {self.log[-5:]}"))

    async def kill(self) -> None:
        """``kill -9``."""
        await self._end(signal.SIGKILL)

    async def terminate(self) -> int:
        """SIGTERM, and wait for it to finish its calls and exit; its exit status."""
        return await self._end(signal.SIGTERM)

    async def _end(self, how: signal.Signals) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(how)
        code = await asyncio.wait_for(self.process.wait(), 30)
        if self._reader is not None:
            await self._reader
        return code

    def switches(self) -> list[tuple[float, dict[str, Any]]]:
        """Its rate limiter's switches between Redis and memory, with when each was
        logged (on the test's monotonic clock)."""
        return [
            (at, entry)
            for at, entry in self.log
            if str(entry.get("message", "")).startswith("rate limiter now uses")
        ]


# --- outcomes -------------------------------------------------------------------------------


@dataclass
class Tally:
    """Calls made and how each ended, per kind of call."""

    made: Counter[str] = field(default_factory=Counter)
    failed: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: What the cluster is going through now (set by the scenario).
    phase: str = "steady"
    #: Writes acknowledged, and calls failed (by cause), in each phase.
    writes: Counter[str] = field(default_factory=Counter)
    failed_in: Counter[tuple[str, str]] = field(default_factory=Counter)

    def ok(self, kind: str) -> None:
        self.made[kind] += 1
        if kind != "grpc.limited":
            self.writes[self.phase] += 1

    def fail(self, kind: str, cause: str) -> None:
        self.made[kind] += 1
        self.failed[kind, cause] += 1
        if cause != "RESOURCE_EXHAUSTED":
            self.failed_in[self.phase, cause] += 1

    def failures(self) -> dict[str, int]:
        """Failed calls by cause, all kinds together."""
        causes: Counter[str] = Counter()
        for (_kind, cause), n in self.failed.items():
            causes[cause] += n
        return dict(causes)


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    """What the server's ``RetryInfo`` asks for (a client honouring it), from 0.05 to 0.5 s."""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return min(0.5, max(0.05, info.retry_delay.ToTimedelta().total_seconds()))
    return 0.1


# --- the load -------------------------------------------------------------------------------


@dataclass
class Written:
    """What one writer was told was written: tunnels made, and the last description each
    was acknowledged to have (``v{n}``, n increasing)."""

    owner: TestUser
    tunnels: dict[str, int] = field(default_factory=dict)


class Load:
    """The clients, running until :attr:`stop` is set."""

    def __init__(self, channel: grpc.aio.Channel, gateways: list[int]) -> None:
        self.stop = asyncio.Event()
        self.tally = Tally()
        self._tunnels = tunnels_pb2_grpc.TunnelServiceStub(channel)
        self._users = users_pb2_grpc.UserServiceStub(channel)
        self._http = [
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) for port in gateways
        ]
        self._next_gateway = itertools.cycle(range(len(gateways)))
        #: Calls of the rate-limited caller that were admitted, with when they ended.
        self.admitted: list[float] = []

    async def close(self) -> None:
        for client in self._http:
            await client.aclose()

    # --- gRPC: create and rename tunnels, one call at a time --------------------------------

    async def grpc_writer(self, written: Written) -> None:
        meta = written.owner.metadata
        for n in itertools.count():
            if self.stop.is_set():
                return
            if n % 3 == 0 or not written.tunnels:
                request = P.CreateTunnelRequest(
                    parent="users/me",
                    tunnel=P.Tunnel(display_name=f"t{n}", description="v0"),
                    request_id=f"{written.owner.id[-12:]}-{n}",
                )
                made = await self._unary("grpc.create", self._tunnels.CreateTunnel, request, meta)
                if made is not None:
                    written.tunnels[made.name] = 0
            else:
                name = list(written.tunnels)[n % len(written.tunnels)]
                version = n
                request = P.UpdateTunnelRequest(
                    tunnel=P.Tunnel(name=name, description=f"v{version}"),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                )
                if await self._unary("grpc.update", self._tunnels.UpdateTunnel, request, meta):
                    written.tunnels[name] = version

    async def _unary(
        self, kind: str, method: Callable[..., Awaitable[Any]], request: Any, meta: Any
    ) -> Any:
        """One call, retried as the server asks while it says UNAVAILABLE (each failure
        counted); None if it failed otherwise. A create carries a request id: retrying it
        after an unknown outcome makes no second tunnel."""
        while not self.stop.is_set():
            try:
                reply = await method(request, metadata=meta, timeout=10)
            except grpc.aio.AioRpcError as error:
                self.tally.fail(kind, error.code().name)
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    return None
                await asyncio.sleep(retry_delay(error))
            else:
                self.tally.ok(kind)
                return reply
        return None

    # --- HTTP: the same, through the gateways in turn ----------------------------------------

    async def http_writer(self, written: Written) -> None:
        headers = {"authorization": f"Bearer {written.owner.access_token}"}
        for n in itertools.count():
            if self.stop.is_set():
                return
            if n % 3 == 0 or not written.tunnels:
                path = f"/v1/users/me/tunnels?requestId={written.owner.id[-12:]}-{n}"
                body = {"displayName": f"t{n}", "description": "v0"}
                reply = await self._http_call("http.create", "POST", path, body, headers)
                if reply is not None:
                    written.tunnels[reply["name"]] = 0
            else:
                name = list(written.tunnels)[n % len(written.tunnels)]
                path = f"/v1/{name}?updateMask=description"
                body = {"description": f"v{n}"}
                if await self._http_call("http.update", "PATCH", path, body, headers) is not None:
                    written.tunnels[name] = n

    async def _http_call(
        self, kind: str, method: str, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, Any] | None:
        """One call through the next gateway; a gateway that refuses the connection (its
        server is down: nothing was sent) is skipped, a 503 is retried as told."""
        while not self.stop.is_set():
            client = self._http[next(self._next_gateway)]
            try:
                response = await client.request(method, path, json=body, headers=headers)
            except httpx.ConnectError:
                continue  # not sent: the next gateway
            except httpx.TransportError as error:  # sent, and the server went away
                self.tally.fail(kind, type(error).__name__)
                continue
            if response.status_code == 200:
                self.tally.ok(kind)
                return dict(response.json())
            self.tally.fail(kind, f"HTTP {response.status_code}")
            if response.status_code != 503:
                return None
            await asyncio.sleep(min(0.5, float(response.headers.get("retry-after", "0.1"))))
        return None

    # --- a caller past its limit ----------------------------------------------------------

    async def hammer(self, caller: TestUser, per_second: float) -> None:
        """Call GetUser at ``per_second`` (well above the caller's rate), counting what the
        limiter admits."""
        request = users_pb2.GetUserRequest(name="users/me")
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            try:
                await self._users.GetUser(request, metadata=caller.metadata, timeout=10)
            except grpc.aio.AioRpcError as error:
                self.tally.fail("grpc.limited", error.code().name)
            else:
                self.tally.ok("grpc.limited")
                self.admitted.append(loop.time())

        while not self.stop.is_set():
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1 / per_second)
        await asyncio.gather(*pending)


# --- watchers -------------------------------------------------------------------------------


@dataclass
class Watcher:
    """A watcher of one user's tunnels that resumes after the last event it saw whenever
    its stream ends or fails; the event ids it was sent, in order."""

    owner: TestUser
    #: The event it starts after.
    start: str
    last: str = ""
    seen: list[str] = field(default_factory=list)
    streams: int = 0
    ended: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.last = self.start

    def got(self, event_id: str) -> None:
        self.seen.append(event_id)
        self.last = event_id
        self.changed.set()

    async def until_seen(self, wanted: list[str], within: float) -> None:
        try:
            async with asyncio.timeout(within):
                while not set(wanted) <= set(self.seen):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            missing = [w for w in wanted if w not in self.seen]
            raise AssertionError(
                f"watcher of {self.owner.id} never saw {len(missing)} of {len(wanted)} events"
                f" (first {missing[:3]}, at {[wanted.index(m) for m in missing[:3]]});"
                f" {self.streams} streams, ended {dict(self.ended)}, last {self.last}"
            ) from None


async def grpc_watch(channel: grpc.aio.Channel, watcher: Watcher, done: asyncio.Event) -> None:
    """Watch over gRPC (the balanced channel), resuming with ``resume_after``."""
    stub = tunnels_pb2_grpc.TunnelServiceStub(channel)
    while not done.is_set():
        watcher.streams += 1
        request = P.WatchTunnelsRequest(name="users/me", resume_after=watcher.last)
        stream = stub.WatchTunnels(request, metadata=watcher.owner.metadata)
        try:
            async for message in stream:
                if message.event_id:
                    watcher.got(message.event_id)
            watcher.ended["ended"] += 1
        except grpc.aio.AioRpcError as error:
            watcher.ended[error.code().name] += 1
            if error.code() != grpc.StatusCode.CANCELLED:
                await asyncio.sleep(retry_delay(error))
        finally:
            stream.cancel()


async def sse_watch(gateways: list[int], watcher: Watcher, done: asyncio.Event) -> None:
    """Watch over HTTP as a browser's EventSource does: Server-Sent Events, reconnecting
    to the next gateway with ``Last-Event-ID``."""
    for port in itertools.cycle(gateways):
        if done.is_set():
            return
        watcher.streams += 1
        headers = {
            "authorization": f"Bearer {watcher.owner.access_token}",
            "accept": "text/event-stream",
            "last-event-id": watcher.last,
        }
        url = f"http://127.0.0.1:{port}/v1/users/me/tunnels:watch"
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
                client.stream("GET", url, headers=headers) as response,
            ):
                if response.status_code != 200:
                    watcher.ended[f"HTTP {response.status_code}"] += 1
                    await asyncio.sleep(0.1)
                    continue
                await _read_sse(response, watcher)
        except httpx.ConnectError:
            continue
        except httpx.TransportError as error:
            watcher.ended[type(error).__name__] += 1


async def _read_sse(response: httpx.Response, watcher: Watcher) -> None:
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
            data = json.loads(fields.get("data", "{}"))
            if "error" in data:
                watcher.ended[f"code {data['error'].get('code')}"] += 1
                return
            event_id = data.get("result", {}).get("eventId", "")
            if event_id:
                watcher.got(event_id)
    watcher.ended["ended"] += 1
