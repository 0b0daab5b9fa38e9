"""The audit log: every call of an audited method (the policy's ``audited`` option, read
from the contract here) writes exactly one entry naming its method, caller, client and
outcome. A use case records its entry in the unit of work of its change, so the two commit
or roll back together; a refused or failed call is recorded by the audit stage.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import pytest_asyncio
import sqlalchemy as sa
from google.api import httpbody_pb2
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from tunnelplane.v1 import (
    admin_pb2,
    audit_pb2,
    auth_pb2,
    common_pb2,
    operations_pb2,
    options_pb2,
    proxies_pb2,
    tunnels_pb2,
    users_pb2,
    webhooks_pb2,
)

from server.app import SERVICES, App
from server.domain.audit import service as audit
from server.domain.audit.model import AuditTrail, RequestContext
from server.domain.audit.rules import action_name
from server.domain.common.clock import SystemClock
from server.domain.common.errors import FailedPrecondition
from server.domain.identity.model import Role, Tier
from server.interceptors.audit import AuditStage
from server.pipeline import Call
from server.storage.tables import audit_log, users
from server.storage.tables import operations as operations_table
from tests.conftest import Backend, own_database, started
from tests.helpers import (
    BEHIND_PROXY,
    PASSWORD,
    SETUP,
    Client,
    TestUser,
    bearer,
    client_of,
    eventually,
    fails,
    fresh_ip,
    reason,
    unique_email,
)
from tests.integration.test_authorization import tiny_png
from tests.webhook_receiver import Receiver

P, W, X = tunnels_pb2, webhooks_pb2, proxies_pb2
#: Where the calls come from: the address a trusted proxy (loopback) forwards, exempt from
#: the small address limits below.
CLIENT_IP = dict(SETUP)["x-forwarded-for"]
AUDITED = [
    (service.name, method)
    for service in SERVICES
    for method in service.methods
    if method.GetOptions().Extensions[options_pb2.policy].audited
]


@pytest_asyncio.fixture(scope="module")
async def server(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server behind a trusted proxy whose addresses are blocked after a few refusals, so
    that a test can make a block to lift."""
    directory = tmp_path_factory.mktemp("audit")
    # A database of its own: its scenes leave operations that its runner must take, and a
    # server on the same database would find webhooks sealed with another key.
    async with own_database(backend, directory) as isolated:
        settings = isolated.settings(
            directory, **BEHIND_PROXY, ip_rate_per_minute=60, ip_burst=2, ip_block_after=2
        )
        async with started(settings) as app:
            yield app


@pytest_asyncio.fixture
async def world(server: App) -> Any:
    """A premium owner, an administrator and a webhook receiver, fresh for each test."""
    async with client_of(server, SETUP) as client, Receiver() as rx:
        owner = await client.new_user(tier=Tier.PREMIUM, tag="owner")
        admin = await client.new_user(role=Role.SUPER_ADMIN, tag="admin")
        yield World(client, rx, owner, admin)


@dataclass
class World:
    """The users and receiver a scene sets up its call with."""

    client: Client
    rx: Receiver
    owner: TestUser
    admin: TestUser

    async def tunnel(self, **fields: Any) -> P.Tunnel:
        return await self.client.tunnel(self.owner, **fields)

    async def webhook(self) -> W.Webhook:
        return await self.client.webhook(self.owner, self.rx.url())

    async def other(self) -> TestUser:
        return await self.client.new_user(tag="other")


@dataclass
class Scene:
    """An audited call ready to be made, and what its entry must say beyond the call's own
    facts (method, caller, client, outcome): whose account it concerns and what it changed
    (``None``: known only once the call has answered)."""

    request: Message
    caller: TestUser | None
    subject: TestUser | None = None
    resource: str | None = None


Setup = Callable[[World], Awaitable[Scene]]


async def register(w: World) -> Scene:
    return Scene(auth_pb2.RegisterRequest(email=unique_email("audit"), password=PASSWORD), None)


async def login(w: World) -> Scene:
    request = auth_pb2.LoginRequest(email=w.owner.email, password=PASSWORD)
    return Scene(request, None, w.owner, w.owner.name)


async def refresh(w: World) -> Scene:
    request = auth_pb2.RefreshTokenRequest(refresh_token=w.owner.refresh_token)
    return Scene(request, None, w.owner)


async def logout(w: World) -> Scene:
    return Scene(auth_pb2.LogoutRequest(), w.owner)


async def create_key(w: World) -> Scene:
    key = auth_pb2.ApiKey(display_name="audited")
    return Scene(auth_pb2.CreateApiKeyRequest(parent=w.owner.name, api_key=key), w.owner)


async def a_key(w: World) -> str:
    made = await w.client.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            parent=w.owner.name, api_key=auth_pb2.ApiKey(display_name="k")
        ),
        metadata=SETUP + w.owner.metadata,
    )
    return made.api_key.name


async def rotate_key(w: World) -> Scene:
    name = await a_key(w)
    return Scene(auth_pb2.RotateApiKeyRequest(name=name), w.owner, resource=name)


async def revoke_key(w: World) -> Scene:
    name = await a_key(w)
    return Scene(auth_pb2.RevokeApiKeyRequest(name=name), w.owner, resource=name)


async def update_user(w: World) -> Scene:
    request = users_pb2.UpdateUserRequest(
        user=users_pb2.User(name=w.owner.name, display_name="Audited"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )
    return Scene(request, w.owner, resource=w.owner.name)


async def delete_user(w: World) -> Scene:
    return Scene(users_pb2.DeleteUserRequest(name=w.owner.name), w.owner, resource=w.owner.name)


async def undelete_user(w: World) -> Scene:
    await w.client.users.DeleteUser(
        users_pb2.DeleteUserRequest(name=w.owner.name), metadata=SETUP + w.owner.metadata
    )
    request = users_pb2.UndeleteUserRequest(name=w.owner.name)
    return Scene(request, w.admin, w.owner, w.owner.name)


async def set_role(w: World) -> Scene:
    request = users_pb2.SetUserRoleRequest(
        name=w.owner.name, role=common_pb2.ROLE_SUPPORT_ADMIN, reason="a test"
    )
    return Scene(request, w.admin, w.owner, w.owner.name)


async def suspend_user(w: World) -> Scene:
    request = users_pb2.SuspendUserRequest(name=w.owner.name, reason="abuse report 42")
    return Scene(request, w.admin, w.owner, w.owner.name)


async def reactivate_user(w: World) -> Scene:
    await w.client.users.SuspendUser(
        users_pb2.SuspendUserRequest(name=w.owner.name, reason="abuse report 42"),
        metadata=SETUP + w.admin.metadata,
    )
    request = users_pb2.ReactivateUserRequest(name=w.owner.name, reason="appeal upheld")
    return Scene(request, w.admin, w.owner, w.owner.name)


async def change_tier(w: World) -> Scene:
    request = users_pb2.ChangeTierRequest(name=w.owner.name, tier=common_pb2.TIER_FREE)
    return Scene(request, w.owner, resource=w.owner.name)


def avatar(w: World) -> users_pb2.UploadAvatarRequest:
    return users_pb2.UploadAvatarRequest(
        name=f"{w.owner.name}/avatar",
        avatar=httpbody_pb2.HttpBody(content_type="image/png", data=tiny_png()),
    )


async def upload_avatar(w: World) -> Scene:
    return Scene(avatar(w), w.owner, resource=f"{w.owner.name}/avatar")


async def delete_avatar(w: World) -> Scene:
    await w.client.users.UploadAvatar(avatar(w), metadata=SETUP + w.owner.metadata)
    request = users_pb2.DeleteAvatarRequest(name=f"{w.owner.name}/avatar")
    return Scene(request, w.owner, resource=f"{w.owner.name}/avatar")


async def create_tunnel(w: World) -> Scene:
    tunnel = P.Tunnel(display_name="audited")
    return Scene(P.CreateTunnelRequest(parent=w.owner.name, tunnel=tunnel), w.owner)


async def update_tunnel(w: World) -> Scene:
    made = await w.tunnel()
    request = P.UpdateTunnelRequest(
        tunnel=P.Tunnel(name=made.name, description="audited"),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]),
    )
    return Scene(request, w.owner, resource=made.name)


async def delete_tunnel(w: World) -> Scene:
    made = await w.tunnel()
    return Scene(P.DeleteTunnelRequest(name=made.name), w.owner, resource=made.name)


async def start_tunnel(w: World) -> Scene:
    made = await w.tunnel()
    return Scene(P.StartTunnelRequest(name=made.name), w.owner, resource=made.name)


async def stop_tunnel(w: World) -> Scene:
    made = await w.tunnel()
    await w.client.tunnels.StartTunnel(
        P.StartTunnelRequest(name=made.name), metadata=SETUP + w.owner.metadata
    )
    return Scene(P.StopTunnelRequest(name=made.name), w.owner, resource=made.name)


async def failover_tunnel(w: World) -> Scene:
    urls = ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]
    made = await w.tunnel(
        endpoints=[P.TunnelEndpoint(url=u, priority=i) for i, u in enumerate(urls)]
    )
    return Scene(P.FailoverTunnelRequest(name=made.name, endpoint=urls[1]), w.owner)


async def create_share(w: World) -> Scene:
    made, other = await w.tunnel(), await w.other()
    share = P.TunnelShare(grantee=other.name, role=common_pb2.SHARE_ROLE_READ)
    request = P.CreateTunnelShareRequest(parent=made.name, share=share)
    return Scene(request, w.owner, resource=f"{made.name}/shares/{other.id}")


async def delete_share(w: World) -> Scene:
    scene = await create_share(w)
    await w.client.tunnels.CreateTunnelShare(scene.request, metadata=SETUP + w.owner.metadata)
    assert scene.resource is not None
    return Scene(P.DeleteTunnelShareRequest(name=scene.resource), w.owner, resource=scene.resource)


def link_request(tunnel: str) -> P.CreateShareLinkRequest:
    link = P.ShareLink(role=common_pb2.SHARE_ROLE_READ, max_uses=1)
    return P.CreateShareLinkRequest(parent=tunnel, share_link=link)


async def create_link(w: World) -> Scene:
    return Scene(link_request((await w.tunnel()).name), w.owner)


async def a_link(w: World) -> tuple[P.Tunnel, P.ShareLink]:
    made = await w.tunnel()
    link = await w.client.tunnels.CreateShareLink(
        link_request(made.name), metadata=SETUP + w.owner.metadata
    )
    return made, link


async def delete_link(w: World) -> Scene:
    _, link = await a_link(w)
    return Scene(P.DeleteShareLinkRequest(name=link.name), w.owner, resource=link.name)


async def accept_link(w: World) -> Scene:
    (made, link), other = await a_link(w), await w.other()
    request = P.AcceptShareLinkRequest(token=link.token)
    return Scene(request, other, w.owner, f"{made.name}/shares/{other.id}")


async def an_operation(w: World) -> str:
    hook = await w.webhook()
    started = await w.client.webhooks.ReplayWebhookEvents(
        W.ReplayWebhookEventsRequest(name=hook.name, start_time=stamp(minutes=-60)),
        metadata=SETUP + w.owner.metadata,
    )
    return started.name


async def cancel_operation(w: World) -> Scene:
    name = await an_operation(w)
    return Scene(operations_pb2.CancelOperationRequest(name=name), w.owner, resource=name)


async def delete_ip_block(w: World) -> Scene:
    """Anonymous calls from a new address until it is blocked, then lift the block."""
    ip = fresh_ip()

    async def blocked() -> bool:
        try:
            await w.client.users.ListTiers(
                users_pb2.ListTiersRequest(), metadata=(("x-forwarded-for", ip),)
            )
        except grpc.aio.AioRpcError as error:
            return reason(error) == "IP_BLOCKED"
        return False

    await eventually(blocked, within=10, every=0)
    name = f"ipBlocks/{ip}"
    return Scene(admin_pb2.DeleteIpBlockRequest(name=name), w.admin, resource=name)


async def stored_operation(w: World, **values: Any) -> str:
    """An operation of the owner, then ``values`` written to its row (a failure, a lease)."""
    name = await an_operation(w)
    async with w.client.app.db.engine.begin() as conn:
        await conn.execute(
            sa.update(operations_table)
            .where(operations_table.c.id == name.rsplit("/", 1)[1])
            .values(**values)
        )
    return name


async def rerun_operation(w: World) -> Scene:
    name = await stored_operation(w, done=True, error_code=13, error_message="boom")
    request = admin_pb2.RerunOperationRequest(name=name, reason="the cause is fixed")
    return Scene(request, w.admin, w.owner, name)


async def release_lease(w: World) -> Scene:
    name = await stored_operation(
        w, done=False, error_code=0, lease_until=datetime.now(UTC) + timedelta(hours=1)
    )
    request = admin_pb2.ReleaseOperationLeaseRequest(name=name, reason="its holder is stuck")
    return Scene(request, w.admin, w.owner, name)


async def reset_agents(w: World) -> Scene:
    tunnel = await w.tunnel()
    request = admin_pb2.ResetAgentSessionsRequest(name=tunnel.name, reason="stuck agent")
    return Scene(request, w.admin, w.owner, tunnel.name)


async def reset_breaker(w: World) -> Scene:
    """A webhook endpoint's breaker opened by unanswered calls, then reset."""
    app = w.client.app
    breakers, target = app.infra.breakers, f"whk_{uuid.uuid4().hex[:12]}"
    for _ in range(app.settings.breaker_threshold):
        with contextlib.suppress(ConnectionError):
            async with breakers.guard("webhook", target):
                raise ConnectionError
    name = f"circuitBreakers/webhook.{target}"
    request = admin_pb2.ResetCircuitBreakerRequest(name=name, reason="receiver is back")
    return Scene(request, w.admin, resource=name)


async def create_webhook(w: World) -> Scene:
    request = W.CreateWebhookRequest(parent=w.owner.name, webhook=W.Webhook(url=w.rx.url()))
    return Scene(request, w.owner)


async def update_webhook(w: World) -> Scene:
    hook = await w.webhook()
    request = W.UpdateWebhookRequest(
        webhook=W.Webhook(name=hook.name, description="audited"),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]),
    )
    return Scene(request, w.owner, resource=hook.name)


def on_webhook(make: Callable[[str], Message]) -> Setup:
    async def setup(w: World) -> Scene:
        hook = await w.webhook()
        return Scene(make(hook.name), w.owner, resource=hook.name)

    return setup


async def a_proxy(w: World) -> str:
    made = await w.client.proxies.StartProxy(
        X.StartProxyRequest(parent=w.owner.name), metadata=SETUP + w.owner.metadata
    )
    return made.name


def on_proxy(make: Callable[[str], Message]) -> Setup:
    """A scene calling ``make(name)`` on a new proxy of the owner's."""

    async def setup(w: World) -> Scene:
        name = await a_proxy(w)
        return Scene(make(name), w.owner, resource=name)

    return setup


async def export_audit(w: World) -> Scene:
    request = audit_pb2.ExportAuditEntriesRequest(
        filter=f'create_time >= "2026-01-01T00:00:00Z" AND actor = "{w.admin.id}"'
    )
    return Scene(request, w.admin)


async def export_activity(w: World) -> Scene:
    request = users_pb2.ExportActivityRequest(
        parent=w.owner.name, filter='create_time >= "2026-01-01T00:00:00Z"'
    )
    return Scene(request, w.admin, w.owner)


async def start_proxy(w: World) -> Scene:
    return Scene(X.StartProxyRequest(parent=w.owner.name), w.owner)


def stamp(minutes: float) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(datetime.now(UTC) + timedelta(minutes=minutes))
    return value


SCENES: dict[str, Setup] = {
    "AuthService/Register": register,
    "AuthService/Login": login,
    "AuthService/RefreshToken": refresh,
    "AuthService/Logout": logout,
    "AuthService/CreateApiKey": create_key,
    "AuthService/RotateApiKey": rotate_key,
    "AuthService/RevokeApiKey": revoke_key,
    "UserService/UpdateUser": update_user,
    "UserService/DeleteUser": delete_user,
    "UserService/UndeleteUser": undelete_user,
    "UserService/SetUserRole": set_role,
    "UserService/SuspendUser": suspend_user,
    "AuditService/ExportAuditEntries": export_audit,
    "UserService/ExportActivity": export_activity,
    "UserService/ReactivateUser": reactivate_user,
    "UserService/ChangeTier": change_tier,
    "UserService/UploadAvatar": upload_avatar,
    "UserService/DeleteAvatar": delete_avatar,
    "TunnelService/CreateTunnel": create_tunnel,
    "TunnelService/UpdateTunnel": update_tunnel,
    "TunnelService/DeleteTunnel": delete_tunnel,
    "TunnelService/StartTunnel": start_tunnel,
    "TunnelService/StopTunnel": stop_tunnel,
    "TunnelService/FailoverTunnel": failover_tunnel,
    "TunnelService/CreateTunnelShare": create_share,
    "TunnelService/DeleteTunnelShare": delete_share,
    "TunnelService/CreateShareLink": create_link,
    "TunnelService/DeleteShareLink": delete_link,
    "TunnelService/AcceptShareLink": accept_link,
    "OperationService/CancelOperation": cancel_operation,
    "ProxyService/StartProxy": start_proxy,
    "ProxyService/StopProxy": on_proxy(lambda n: X.StopProxyRequest(name=n)),
    "ProxyService/UpdateProxy": on_proxy(
        lambda n: X.UpdateProxyRequest(
            proxy=X.Proxy(name=n, display_name="renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    ),
    "ProxyService/RollbackProxyConfig": on_proxy(
        lambda n: X.RollbackProxyConfigRequest(name=n, version=1)
    ),
    "ProxyService/ScaleProxy": on_proxy(lambda n: X.ScaleProxyRequest(name=n, instances=2)),
    "AdminService/DeleteIpBlock": delete_ip_block,
    "AdminService/ResetCircuitBreaker": reset_breaker,
    "AdminService/RerunOperation": rerun_operation,
    "AdminService/ReleaseOperationLease": release_lease,
    "AdminService/ResetAgentSessions": reset_agents,
    "WebhookService/CreateWebhook": create_webhook,
    "WebhookService/UpdateWebhook": update_webhook,
    "WebhookService/DeleteWebhook": on_webhook(lambda n: W.DeleteWebhookRequest(name=n)),
    "WebhookService/RotateWebhookSecret": on_webhook(
        lambda n: W.RotateWebhookSecretRequest(name=n)
    ),
    "WebhookService/TestWebhook": on_webhook(lambda n: W.TestWebhookRequest(name=n)),
    "WebhookService/ReplayWebhookEvents": on_webhook(
        lambda n: W.ReplayWebhookEventsRequest(name=n, start_time=stamp(minutes=-60))
    ),
    "WebhookService/RecoverWebhookDeliveries": on_webhook(
        lambda n: W.RecoverWebhookDeliveriesRequest(name=n, start_time=stamp(minutes=-1))
    ),
}


def rpc(client: Client, service: str, method: Any) -> Any:
    """The stub method of ``service``'s ``method``."""
    stub = {
        "AuthService": client.auth,
        "UserService": client.users,
        "AdminService": client.admin,
        "AuditService": client.audit,
        "TunnelService": client.tunnels,
        "WebhookService": client.webhooks,
        "OperationService": client.operations,
        "ProxyService": client.proxies,
    }[service]
    call = getattr(stub, method.name)
    if not method.server_streaming:
        return call

    async def drained(request: Message, **kwargs: Any) -> list[Message]:
        """A server stream, read to its end (its failure raised as a unary call's)."""
        return [message async for message in call(request, **kwargs)]

    return drained


async def entries(app: App, request_id: str) -> list[Any]:
    """The audit entries of the call with ``request_id``."""
    async with app.db.engine.connect() as conn:
        found = await conn.execute(
            sa.select(audit_log)
            .where(audit_log.c.request_id == request_id)
            .order_by(audit_log.c.chain_day, audit_log.c.chain_seq)
        )
        return list(found.mappings().all())


def a_request_id() -> tuple[str, tuple[tuple[str, str], ...]]:
    request_id = uuid.uuid4().hex
    return request_id, (("x-request-id", request_id),)


def test_every_audited_rpc_has_a_scene() -> None:
    names = {f"{service}/{method.name}" for service, method in AUDITED}
    assert names == set(SCENES), "an audited RPC needs a scene here (and one entry per call)"


@pytest.mark.parametrize(("service", "method"), AUDITED, ids=lambda v: getattr(v, "name", v))
async def test_an_audited_call_writes_exactly_one_entry(
    world: World, server: App, service: str, method: Any
) -> None:
    scene = await SCENES[f"{service}/{method.name}"](world)
    request_id, tagged = a_request_id()
    caller = scene.caller.metadata if scene.caller is not None else ()
    await rpc(world.client, service, method)(scene.request, metadata=SETUP + caller + tagged)

    (entry,) = await entries(server, request_id)
    full_name = f"/tunnelplane.v1.{service}/{method.name}"
    assert (entry["method"], entry["action"]) == (full_name, action_name(full_name))
    assert (entry["outcome"], entry["reason"]) == ("OK", "")
    assert entry["actor_user_id"] == (scene.caller.id if scene.caller is not None else "")
    assert entry["ip_address"] == CLIENT_IP
    assert entry["user_agent"].startswith("grpc-python")
    subject = scene.subject or scene.caller
    if subject is not None:
        assert entry["subject_user_id"] == subject.id
    if scene.resource is not None:
        assert entry["resource"] == scene.resource


@pytest.mark.parametrize(("service", "method"), AUDITED, ids=lambda v: getattr(v, "name", v))
async def test_a_refused_audited_call_writes_exactly_one_failure_entry(
    world: World, server: App, service: str, method: Any
) -> None:
    request_id, tagged = a_request_id()
    empty = GetMessageClass(method.input_type)()
    await fails(
        rpc(world.client, service, method)(empty, metadata=SETUP + bearer("not-a-token") + tagged),
        grpc.StatusCode.UNAUTHENTICATED,
    )

    (entry,) = await entries(server, request_id)
    full_name = f"/tunnelplane.v1.{service}/{method.name}"
    assert (entry["method"], entry["action"]) == (full_name, action_name(full_name))
    assert (entry["outcome"], entry["reason"]) == ("UNAUTHENTICATED", "TOKEN_INVALID")
    assert (entry["actor_user_id"], entry["ip_address"]) == ("", CLIENT_IP)


async def test_the_entry_is_the_use_cases_whatever_else_the_call_commits(
    world: World, server: App
) -> None:
    """An API key's first use records its use in a transaction of its own before the use
    case runs; the entry is still the one the use case wrote with its change."""
    secret = (
        await world.client.auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                parent=world.owner.name, api_key=auth_pb2.ApiKey(display_name="first use")
            ),
            metadata=SETUP + world.owner.metadata,
        )
    ).secret
    request_id, tagged = a_request_id()
    made = await world.client.tunnels.CreateTunnel(
        P.CreateTunnelRequest(parent="users/me", tunnel=P.Tunnel(display_name="by key")),
        metadata=SETUP + bearer(secret) + tagged,
    )

    (entry,) = await entries(server, request_id)
    assert (entry["resource"], entry["subject_user_id"]) == (made.name, world.owner.id)
    assert entry["api_key_id"].startswith("key_")


async def test_a_failed_sign_in_names_the_account_it_was_for(world: World, server: App) -> None:
    request_id, tagged = a_request_id()
    await fails(
        world.client.auth.Login(
            auth_pb2.LoginRequest(email=world.owner.email, password="not the password"),
            metadata=SETUP + tagged,
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )

    (entry,) = await entries(server, request_id)
    assert (entry["outcome"], entry["reason"]) == ("UNAUTHENTICATED", "INVALID_CREDENTIALS")
    assert (entry["subject_user_id"], entry["details"]) == (
        world.owner.id,
        {"email": world.owner.email},
    )


# --- the mechanism: a unit of work, and the stage -----------------------------------------


def a_trail() -> AuditTrail:
    return AuditTrail(RequestContext("test/Audit", "test.audit", request_id=uuid.uuid4().hex))


async def test_an_entry_commits_or_rolls_back_with_its_unit_of_work(
    world: World, server: App
) -> None:
    trail, now = a_trail(), datetime.now(UTC)

    async def failing_change() -> None:
        async with server.db() as uow:
            await uow.users.touch(world.owner.id, last_login_time=now)
            await audit.record(uow, trail, now, subject_user_id=world.owner.id, resource="x")
            raise RuntimeError("the change fails after its entry was added")

    with pytest.raises(RuntimeError):
        await failing_change()
    assert await entries(server, trail.context.request_id) == []
    assert (trail.subject_user_id, trail.resource) == (world.owner.id, "x")  # kept for the stage

    async with server.db() as uow:
        await uow.users.touch(world.owner.id, last_login_time=now)
        await audit.record(uow, trail, now)
        await audit.record(uow, None, now)  # a call that is not audited records nothing
    (entry,) = await entries(server, trail.context.request_id)
    assert (entry["id"], entry["outcome"], entry["resource"]) == (trail.id, "OK", "x")
    async with server.db.engine.connect() as conn:
        touched = await conn.scalar(
            sa.select(users.c.last_login_time).where(users.c.id == world.owner.id)
        )
    assert touched is not None


def a_call(server: App, name: str) -> Call:
    method = next(m for m in server.methods if m.full_name == f"/tunnelplane.v1.{name}")
    call = Call(method, {"user-agent": "audit-test"}, peer="192.0.2.1", transport="test")
    call.request_id = uuid.uuid4().hex
    return call


@pytest.mark.parametrize("committed", [True, False], ids=["after-commit", "before-commit"])
async def test_a_failed_call_keeps_one_entry_with_what_the_use_case_noted(
    server: App, committed: bool
) -> None:
    """The stage records the failure: with a second entry that corrects the one the use
    case committed (the log is append-only), or, when its unit of work rolled back, with
    the use case's notes in the call's one entry."""
    call = a_call(server, "TunnelService/StartTunnel")

    async def use_case(request: Message, call: Call) -> Message:
        async with server.db() as uow:
            await audit.record(uow, call.audit, datetime.now(UTC), resource="users/u/t")
            if not committed:
                raise FailedPrecondition("the change failed", reason="TEST_FAILURE")
        raise FailedPrecondition("after the change", reason="TEST_FAILURE")

    stage = AuditStage(server.db, SystemClock(), logging.getLogger("test.audit"))
    with pytest.raises(FailedPrecondition):
        await stage.wrap(call.method, use_case)(P.StartTunnelRequest(), call)

    found = await entries(server, call.request_id)
    if committed:
        first, entry = found
        assert first["outcome"] == "OK"
        assert entry["details"]["corrects"] == first["id"]
    else:
        (entry,) = found
    assert (entry["outcome"], entry["reason"]) == ("FAILED_PRECONDITION", "TEST_FAILURE")
    assert (entry["resource"], entry["ip_address"], entry["user_agent"]) == (
        "users/u/t",
        "192.0.2.1",
        "audit-test",
    )
