"""Test helpers: a client with the generated stubs, user factories, and status decoding."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from tunnelplane.v1 import (
    admin_pb2_grpc,
    agents_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    events_pb2_grpc,
    operations_pb2_grpc,
    tunnels_pb2,
    tunnels_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)

from server.app import App
from server.domain.principal import Role, Tier

PASSWORD = "correct horse battery staple"
STATUS_KEY = "grpc-status-details-bin"


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


def unique_email(tag: str = "user") -> str:
    """An address no other test uses."""
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.com"


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
        self.tunnels = tunnels_pb2_grpc.TunnelServiceStub(channel)
        self.agents = agents_pb2_grpc.AgentServiceStub(channel)
        self.events = events_pb2_grpc.EventServiceStub(channel)
        self.webhooks = webhooks_pb2_grpc.WebhookServiceStub(channel)
        self.operations = operations_pb2_grpc.OperationServiceStub(channel)

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
            await self.app.users.promote(email, role)
        if tier is not None:
            await self.app.users.change_tier(_billing_admin(), user_id, tier, etag="")
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
    from server.domain.principal import CredentialKind, Principal, permissions_for

    return Principal(
        user_id="usr_setup",
        role=Role.SUPER_ADMIN,
        tier=Tier.ENTERPRISE,
        credential=CredentialKind.SESSION,
        permissions=permissions_for(Role.SUPER_ADMIN),
    )


RpcCall = Callable[..., Awaitable[Any]]
