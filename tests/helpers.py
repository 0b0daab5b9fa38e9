"""Test helpers: a client with the generated stubs, user factories, status decoding, and
the readers of long streams (watches, agents' Connect, SSE) that several modules share."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import httpx
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from tunnelplane.v1 import (
    admin_pb2_grpc,
    agents_pb2,
    agents_pb2_grpc,
    audit_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    events_pb2_grpc,
    operations_pb2_grpc,
    proxies_pb2_grpc,
    tunnels_pb2,
    tunnels_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)

from server.app import App
from server.domain.identity.model import Role, Tier

PASSWORD = "correct horse battery staple"
STATUS_KEY = "grpc-status-details-bin"
#: Set-up calls (register, log in) of the rate-limit tests come from here: their servers
#: trust loopback as a proxy (a test names its client's address in X-Forwarded-For) and
#: exempt only this network, so that set-up is never limited.
SETUP = (("x-forwarded-for", "10.250.0.1"),)
BEHIND_PROXY = {"rate_exempt_ips": "10.250.0.0/16", "trusted_proxies": "127.0.0.1/32,::1/128"}
_addresses = itertools.count(1)
T = TypeVar("T")
T = TypeVar("T")
T = TypeVar("T")


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The ``google.rpc.Status`` carried in an error's trailers."""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_KEY:
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no {STATUS_KEY} in {error!r}")


def detail(error: grpc.aio.AioRpcError, kind: type[Any]) -> Any:
    """The first detail of type ``kind``, or ``None``."""
    for packed in status_of(error).details:
        if packed.Is(kind.DESCRIPTOR):
            message = kind()
            packed.Unpack(message)
            return message
    return None


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """Field -> description of the ``BadRequest`` detail."""
    bad = detail(error, error_details_pb2.BadRequest)
    assert bad is not None, f"no BadRequest detail in {status_of(error)}"
    return {v.field: v.description for v in bad.field_violations}


def reason(error: grpc.aio.AioRpcError) -> str:
    """The ``ErrorInfo`` reason."""
    info = detail(error, error_details_pb2.ErrorInfo)
    assert info is not None, "every error carries ErrorInfo"
    return str(info.reason)


async def fails(awaitable: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Await a call that must fail with ``code``; return the error."""
    try:
        result = await awaitable
    except grpc.aio.AioRpcError as error:
        assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
        return error
    raise AssertionError(f"expected {code}, call succeeded with {result}")


def free_port() -> int:
    """A loopback port nobody listens on now (for a server to take, or to find closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_email(tag: str = "user") -> str:
    """An address no other test uses."""
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.com"


def fresh_ip() -> str:
    """A client address no other test of the run uses (outside the ``SETUP`` network):
    servers share the backend's Redis, so an address bucket is never another test's."""
    n = next(_addresses)
    return f"10.{n // 250 % 200 + 1}.{n % 250}.7"


class FakeClock:
    """A clock for a server (``App(settings, clock=...)``) that moves only when told to,
    from ``start`` (by default, now)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)

    def now(self) -> datetime:
        return self._now

    def time(self) -> float:
        return self._now.timestamp()

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    within: float = 20.0,
    every: float = 0.02,
    *,
    changed: asyncio.Condition | None = None,
) -> T:
    """Call ``check`` (a function, or a coroutine function) until it returns something
    true, and return that; ``TimeoutError`` after ``within`` seconds. It is called again
    every ``every`` seconds, or, when the state announces its changes through ``changed``,
    each time that condition is notified (the check then runs under its lock). The one
    waiting loop of the tests: every helper that waits for a state is built on it."""
    async with asyncio.timeout(within), changed or contextlib.nullcontext():
        while True:
            found = check()
            if inspect.isawaitable(found):
                found = await found
            if found:
                return found  # type: ignore[return-value]
            if changed is not None:
                await changed.wait()
            else:
                await asyncio.sleep(every)


@dataclass
class TestUser:
    """A registered, signed-in user."""

    __test__ = False  # a fixture type, not a test class

    id: str
    email: str
    password: str
    access_token: str
    refresh_token: str

    @property
    def name(self) -> str:
        """``users/{id}``."""
        return f"users/{self.id}"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the access token."""
        return (("authorization", f"Bearer {self.access_token}"),)


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying any bearer credential."""
    return (("authorization", f"Bearer {secret}"),)


class Client:
    """Stubs for the shared server plus shortcuts."""

    def __init__(
        self, app: App, channel: grpc.aio.Channel, setup_metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.app = app
        self.channel = channel
        #: Sent with the set-up calls (register, login, API keys) of these helpers.
        self.setup_metadata = setup_metadata
        self.auth = auth_pb2_grpc.AuthServiceStub(channel)
        self.users = users_pb2_grpc.UserServiceStub(channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(channel)
        self.tunnels = tunnels_pb2_grpc.TunnelServiceStub(channel)
        self.agents = agents_pb2_grpc.AgentServiceStub(channel)
        self.events = events_pb2_grpc.EventServiceStub(channel)
        self.webhooks = webhooks_pb2_grpc.WebhookServiceStub(channel)
        self.operations = operations_pb2_grpc.OperationServiceStub(channel)
        self.proxies = proxies_pb2_grpc.ProxyServiceStub(channel)

    async def register(self, email: str | None = None, password: str = PASSWORD) -> users_pb2.User:
        """Register a user and return it."""
        response = await self.auth.Register(
            auth_pb2.RegisterRequest(email=email or unique_email(), password=password),
            metadata=self.setup_metadata,
        )
        return response.user

    async def login(self, email: str, password: str = PASSWORD) -> auth_pb2.LoginResponse:
        """Sign in."""
        return await self.auth.Login(
            auth_pb2.LoginRequest(email=email, password=password), metadata=self.setup_metadata
        )

    async def new_user(
        self, *, role: Role | None = None, tier: Tier | None = None, tag: str = "user"
    ) -> TestUser:
        """Register and sign in a fresh user, optionally with another role or tier."""
        email = unique_email(tag)
        user = await self.register(email)
        user_id = user.name.split("/")[1]
        if role is not None:
            await self.app.identity.users.promote(email, role)
        if tier is not None:
            await self.app.identity.users.change_tier(
                _billing_admin(), user_id, tier, etag="", reason="test set-up"
            )
        login = await self.login(email)
        return TestUser(
            user_id, email, PASSWORD, login.tokens.access_token, login.tokens.refresh_token
        )

    async def api_key(self, owner: TestUser, scopes: list[str] | None = None) -> str:
        """A new API key of ``owner`` with ``scopes``; returns its secret."""
        response = await self.auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                parent=owner.name,
                api_key=auth_pb2.ApiKey(display_name="test key", scopes=scopes or []),
            ),
            metadata=owner.metadata + self.setup_metadata,
        )
        return response.secret

    async def webhook(self, owner: TestUser, url: str, **fields: Any) -> webhooks_pb2.Webhook:
        """A new webhook endpoint of ``owner`` (with its secret)."""
        return await self.webhooks.CreateWebhook(
            webhooks_pb2.CreateWebhookRequest(
                parent=owner.name, webhook=webhooks_pb2.Webhook(url=url, **fields)
            ),
            metadata=owner.metadata,
        )

    async def tunnel(self, owner: TestUser, name: str = "", **fields: Any) -> tunnels_pb2.Tunnel:
        """A new tunnel of ``owner``."""
        return await self.tunnels.CreateTunnel(
            tunnels_pb2.CreateTunnelRequest(
                parent=owner.name,
                tunnel=tunnels_pb2.Tunnel(
                    display_name=name or f"t-{uuid.uuid4().hex[:8]}", **fields
                ),
            ),
            metadata=owner.metadata,
        )


def _billing_admin() -> Any:
    from server.domain.identity.model import CredentialKind, Principal
    from server.domain.identity.rules import permissions_for

    return Principal(
        user_id="usr_setup",
        role=Role.SUPER_ADMIN,
        tier=Tier.ENTERPRISE,
        credential=CredentialKind.SESSION,
        permissions=permissions_for(Role.SUPER_ADMIN),
    )


RpcCall = Callable[..., Awaitable[Any]]


@contextlib.asynccontextmanager
async def client_of(
    app: App, setup_metadata: tuple[tuple[str, str], ...] = ()
) -> AsyncIterator[Client]:
    """A :class:`Client` of ``app`` over a channel of its own, for the block."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        yield Client(app, channel, setup_metadata)


@contextlib.asynccontextmanager
async def http_of(app: App, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of ``app``'s embedded gateway, for the block."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}", **options) as http:
        yield http


async def cookie_login(http: httpx.AsyncClient, tag: str = "cookie") -> httpx.Response:
    """Register a new user over HTTP and sign in with cookie delivery (as a web page does);
    the login response."""
    body = {"email": unique_email(tag), "password": PASSWORD}
    registered = await http.post("/v1/auth:register", json=body)
    assert registered.status_code == 200, registered.text
    login = await http.post(
        "/v1/auth:login", json={**body, "refreshTokenDelivery": "REFRESH_TOKEN_DELIVERY_COOKIE"}
    )
    assert login.status_code == 200, login.text
    return login


async def sse_blocks(response: httpx.Response) -> AsyncIterator[str]:
    """An SSE stream's events and comments, one blank-line separated block at a time."""
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            yield block


# --- tunnels: watches and agents ---------------------------------------------------------

W = tunnels_pb2.WatchTunnelsResponse


async def watch_synced(stream: Any) -> None:
    """Read a WatchTunnels stream until its current state has been sent."""
    while True:
        message = await asyncio.wait_for(stream.read(), 10)
        assert message is not grpc.aio.EOF
        if message.kind == W.KIND_SYNCED:
            return


class Watch:
    """A WatchTunnels stream read in the background; ``until`` awaits a matching message."""

    def __init__(self, stub: Any, name: str, metadata: Any) -> None:
        self.stream = stub.WatchTunnels(
            tunnels_pb2.WatchTunnelsRequest(name=name), metadata=metadata
        )
        self.seen: list[W] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.stream:
            async with self._changed:
                self.seen.append(message)
                self._changed.notify_all()

    async def until(self, check: Callable[[W], bool], within: float = 20) -> W:
        """The first message seen that passes ``check`` (waiting for it if need be)."""
        return await eventually(
            lambda: next((m for m in self.seen if check(m)), None), within, changed=self._changed
        )

    def close(self) -> None:
        self.stream.cancel()
        self._task.cancel()


def state_is(state: int) -> Callable[[W], bool]:
    return lambda m: m.kind == W.KIND_CHANGED and m.tunnel.state == state


def refused_reports(client: Client) -> float:
    """Agent reports the client's server refused so far (its metric)."""
    value = client.app.registry.get_sample_value(
        "tunnelplane_agent_reports_total", {"result": "refused"}
    )
    return value or 0.0


async def agent_key(client: Client, owner: TestUser) -> str:
    """A new API key of ``owner`` for agents."""
    return await client.api_key(owner, ["agent.connect"])


class Agent:
    """A test agent speaking the Connect protocol over a real stream."""

    def __init__(self, stub: Any, key: str, tunnel: str, agent_id: str = "agent-1") -> None:
        self.stream = stub.Connect(metadata=bearer(key))
        self.tunnel = tunnel
        self.agent_id = agent_id

    async def hello(self) -> agents_pb2.AgentWelcome:
        return (await self.greet()).welcome

    async def greet(self) -> agents_pb2.ConnectResponse:
        """Say hello; the first answer, whatever its kind."""
        await self.stream.write(
            agents_pb2.ConnectRequest(
                hello=agents_pb2.AgentHello(
                    tunnel=self.tunnel, agent_id=self.agent_id, version="t", hostname="h", os="o"
                )
            )
        )
        return await self.next()

    async def next(self) -> agents_pb2.ConnectResponse:
        message = await asyncio.wait_for(self.stream.read(), 10)
        assert message is not grpc.aio.EOF
        return message  # type: ignore[no-any-return]

    async def desired(self) -> agents_pb2.DesiredState:
        message = await self.next()
        assert message.WhichOneof("kind") == "desired_state", message
        return message.desired_state

    async def report(self, sequence: int, **counts: Any) -> agents_pb2.ReportAck:
        now = timestamp_pb2.Timestamp()
        now.FromDatetime(datetime.now(UTC))
        await self.stream.write(
            agents_pb2.ConnectRequest(
                report=agents_pb2.AgentReport(sequence=sequence, time=now, **counts)
            )
        )
        while True:
            message = await self.next()
            if message.WhichOneof("kind") == "ack":
                return message.ack

    async def leave(self) -> None:
        await self.stream.done_writing()
        while await asyncio.wait_for(self.stream.read(), 10) is not grpc.aio.EOF:
            pass
