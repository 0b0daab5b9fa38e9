"""The authorization matrix: every RPC in the contract x every kind of caller.

The expected outcome of each cell is derived from the method's declared policy (read
from the descriptors, independently of the server's own reading), and the call is made
for real against a fresh owner. A new RPC without a request builder here fails the test,
so nothing joins the API without being checked.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message
from tunnelplane.v1 import (
    admin_pb2,
    agents_pb2,
    audit_pb2,
    auth_pb2,
    common_pb2,
    events_pb2,
    operations_pb2,
    options_pb2,
    proxies_pb2,
    tunnels_pb2,
    users_pb2,
    webhooks_pb2,
)

from server.app import SERVICES
from server.domain.identity.model import Role, ShareRole
from server.domain.identity.rules import ROLE_PERMISSIONS, SELF_PERMISSIONS
from tests.helpers import PASSWORD, Client, TestUser, bearer, unique_email


def tiny_png() -> bytes:
    """A valid 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@dataclass
class Target:
    """The resources a call acts on, all owned by ``user``."""

    user: TestUser
    key_name: str
    tunnel: str = ""


Builder = Callable[[Target], Message]


def webhook(t: Target) -> str:
    """A webhook of the target's owner that does not exist: authorization decides on the
    name alone, so allowed callers get NOT_FOUND and refused ones never learn that."""
    return f"{t.user.name}/webhooks/whk_01jd3k0000000000000000000a"


def proxy(t: Target) -> str:
    """A proxy of the target's owner that does not exist (as :func:`webhook`)."""
    return f"{t.user.name}/proxies/prx_01jd3k0000000000000000000a"


BUILDERS: dict[str, Builder] = {
    "AuthService/Register": lambda t: auth_pb2.RegisterRequest(
        email=unique_email("matrix"), password=PASSWORD
    ),
    "AuthService/Login": lambda t: auth_pb2.LoginRequest(email=t.user.email, password=PASSWORD),
    "AuthService/RefreshToken": lambda t: auth_pb2.RefreshTokenRequest(
        refresh_token=t.user.refresh_token
    ),
    "AuthService/Logout": lambda t: auth_pb2.LogoutRequest(),
    "AuthService/GetJwks": lambda t: auth_pb2.GetJwksRequest(),
    "AuthService/CreateApiKey": lambda t: auth_pb2.CreateApiKeyRequest(
        parent=t.user.name, api_key=auth_pb2.ApiKey(display_name="matrix")
    ),
    "AuthService/ListApiKeys": lambda t: auth_pb2.ListApiKeysRequest(parent=t.user.name),
    "AuthService/GetApiKey": lambda t: auth_pb2.GetApiKeyRequest(name=t.key_name),
    "AuthService/RotateApiKey": lambda t: auth_pb2.RotateApiKeyRequest(name=t.key_name),
    "AuthService/RevokeApiKey": lambda t: auth_pb2.RevokeApiKeyRequest(name=t.key_name),
    "UserService/GetUser": lambda t: users_pb2.GetUserRequest(name=t.user.name),
    "UserService/ListUsers": lambda t: users_pb2.ListUsersRequest(),
    "UserService/UpdateUser": lambda t: users_pb2.UpdateUserRequest(
        user=users_pb2.User(name=t.user.name, display_name="Renamed"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    ),
    "UserService/DeleteUser": lambda t: users_pb2.DeleteUserRequest(name=t.user.name),
    "UserService/UndeleteUser": lambda t: users_pb2.UndeleteUserRequest(name=t.user.name),
    "UserService/SetUserRole": lambda t: users_pb2.SetUserRoleRequest(
        name=t.user.name, role=common_pb2.ROLE_SUPPORT_ADMIN, reason="a test"
    ),
    "UserService/SuspendUser": lambda t: users_pb2.SuspendUserRequest(
        name=t.user.name, reason="matrix"
    ),
    "UserService/ReactivateUser": lambda t: users_pb2.ReactivateUserRequest(
        name=t.user.name, reason="matrix"
    ),
    "UserService/ListTiers": lambda t: users_pb2.ListTiersRequest(),
    "UserService/GetTier": lambda t: users_pb2.GetTierRequest(name="tiers/free"),
    "UserService/ChangeTier": lambda t: users_pb2.ChangeTierRequest(
        name=t.user.name, tier=common_pb2.TIER_PREMIUM, reason="matrix"
    ),
    "UserService/ListActivity": lambda t: users_pb2.ListActivityRequest(parent=t.user.name),
    "UserService/ExportActivity": lambda t: users_pb2.ExportActivityRequest(
        parent=t.user.name, filter='create_time >= "2026-01-01T00:00:00Z"'
    ),
    "UserService/UploadAvatar": lambda t: users_pb2.UploadAvatarRequest(
        name=f"{t.user.name}/avatar",
        avatar=httpbody_pb2.HttpBody(content_type="image/png", data=tiny_png()),
    ),
    "UserService/GetAvatar": lambda t: users_pb2.GetAvatarRequest(name=f"{t.user.name}/avatar"),
    "UserService/DeleteAvatar": lambda t: users_pb2.DeleteAvatarRequest(
        name=f"{t.user.name}/avatar"
    ),
    "UserService/GetUsage": lambda t: users_pb2.GetUsageRequest(name=f"{t.user.name}/usage"),
    "AdminService/GetSystemStatus": lambda t: admin_pb2.GetSystemStatusRequest(),
    "AuditService/VerifyAuditLog": lambda t: audit_pb2.VerifyAuditLogRequest(),
    "AuditService/ListAuditEntries": lambda t: audit_pb2.ListAuditEntriesRequest(),
    "AuditService/ExportAuditEntries": lambda t: audit_pb2.ExportAuditEntriesRequest(
        filter='create_time >= "2026-01-01T00:00:00Z"'
    ),
    "AdminService/ListRateLimitViolations": lambda t: admin_pb2.ListRateLimitViolationsRequest(),
    "AdminService/SummarizeRateLimitViolations": lambda t: (
        admin_pb2.SummarizeRateLimitViolationsRequest()
    ),
    "AdminService/ListIpBlocks": lambda t: admin_pb2.ListIpBlocksRequest(),
    "TunnelService/CreateTunnel": lambda t: tunnels_pb2.CreateTunnelRequest(
        parent=t.user.name, tunnel=tunnels_pb2.Tunnel(display_name="matrix")
    ),
    "TunnelService/GetTunnel": lambda t: tunnels_pb2.GetTunnelRequest(name=t.tunnel),
    "TunnelService/ListTunnels": lambda t: tunnels_pb2.ListTunnelsRequest(parent=t.user.name),
    "TunnelService/UpdateTunnel": lambda t: tunnels_pb2.UpdateTunnelRequest(
        tunnel=tunnels_pb2.Tunnel(name=t.tunnel, description="changed"),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]),
    ),
    "TunnelService/DeleteTunnel": lambda t: tunnels_pb2.DeleteTunnelRequest(name=t.tunnel),
    "TunnelService/StartTunnel": lambda t: tunnels_pb2.StartTunnelRequest(name=t.tunnel),
    "TunnelService/StopTunnel": lambda t: tunnels_pb2.StopTunnelRequest(name=t.tunnel),
    "TunnelService/FailoverTunnel": lambda t: tunnels_pb2.FailoverTunnelRequest(name=t.tunnel),
    "TunnelService/GetTunnelMetrics": lambda t: tunnels_pb2.GetTunnelMetricsRequest(
        name=f"{t.tunnel}/metrics"
    ),
    "TunnelService/GetTunnelUsage": lambda t: tunnels_pb2.GetTunnelUsageRequest(
        name=f"{t.tunnel}/usage"
    ),
    "TunnelService/GetUsageReport": lambda t: tunnels_pb2.GetUsageReportRequest(
        name=f"{t.user.name}/usageReport"
    ),
    "TunnelService/SummarizeUsage": lambda t: tunnels_pb2.SummarizeUsageRequest(),
    "TunnelService/CreateTunnelShare": lambda t: tunnels_pb2.CreateTunnelShareRequest(
        parent=t.tunnel,
        share=tunnels_pb2.TunnelShare(grantee=t.user.name, role=common_pb2.SHARE_ROLE_READ),
    ),
    "TunnelService/ListTunnelShares": lambda t: tunnels_pb2.ListTunnelSharesRequest(
        parent=t.tunnel
    ),
    "TunnelService/DeleteTunnelShare": lambda t: tunnels_pb2.DeleteTunnelShareRequest(
        name=f"{t.tunnel}/shares/{t.user.id}"
    ),
    "TunnelService/CreateShareLink": lambda t: tunnels_pb2.CreateShareLinkRequest(
        parent=t.tunnel,
        share_link=tunnels_pb2.ShareLink(role=common_pb2.SHARE_ROLE_READ, max_uses=1),
    ),
    "TunnelService/ListShareLinks": lambda t: tunnels_pb2.ListShareLinksRequest(parent=t.tunnel),
    "TunnelService/DeleteShareLink": lambda t: tunnels_pb2.DeleteShareLinkRequest(
        name=f"{t.tunnel}/shareLinks/lnk_01jd3k0000000000000000000a"
    ),
    "TunnelService/AcceptShareLink": lambda t: tunnels_pb2.AcceptShareLinkRequest(
        token="tpl_" + "x" * 32
    ),
    "TunnelService/ListSharedWithMe": lambda t: tunnels_pb2.ListSharedWithMeRequest(
        parent=t.user.name
    ),
    "TunnelService/WatchTunnels": lambda t: tunnels_pb2.WatchTunnelsRequest(name=t.tunnel),
    "AgentService/Connect": lambda t: agents_pb2.ConnectRequest(
        hello=agents_pb2.AgentHello(tunnel=t.tunnel, agent_id="matrix")
    ),
    "EventService/ListEvents": lambda t: events_pb2.ListEventsRequest(parent=t.user.name),
    "AdminService/DeleteIpBlock": lambda t: admin_pb2.DeleteIpBlockRequest(
        name="ipBlocks/10.9.9.9"
    ),
    "AdminService/SummarizeErrors": lambda t: admin_pb2.SummarizeErrorsRequest(),
    "AdminService/RerunOperation": lambda t: admin_pb2.RerunOperationRequest(
        name=f"{t.user.name}/operations/op_matrix"
    ),
    "AdminService/ReleaseOperationLease": lambda t: admin_pb2.ReleaseOperationLeaseRequest(
        name=f"{t.user.name}/operations/op_matrix"
    ),
    "AdminService/ResetAgentSessions": lambda t: admin_pb2.ResetAgentSessionsRequest(name=t.tunnel),
    "AdminService/ResetCircuitBreaker": lambda t: admin_pb2.ResetCircuitBreakerRequest(
        name="circuitBreakers/webhook.whk_matrix", reason="matrix"
    ),
    "WebhookService/CreateWebhook": lambda t: webhooks_pb2.CreateWebhookRequest(
        parent=t.user.name, webhook=webhooks_pb2.Webhook(url="http://127.0.0.1:9/matrix")
    ),
    "WebhookService/GetWebhook": lambda t: webhooks_pb2.GetWebhookRequest(name=webhook(t)),
    "WebhookService/ListWebhooks": lambda t: webhooks_pb2.ListWebhooksRequest(parent=t.user.name),
    "WebhookService/UpdateWebhook": lambda t: webhooks_pb2.UpdateWebhookRequest(
        webhook=webhooks_pb2.Webhook(name=webhook(t), description="x"),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]),
    ),
    "WebhookService/DeleteWebhook": lambda t: webhooks_pb2.DeleteWebhookRequest(name=webhook(t)),
    "WebhookService/RotateWebhookSecret": lambda t: webhooks_pb2.RotateWebhookSecretRequest(
        name=webhook(t)
    ),
    "WebhookService/ListWebhookDeliveries": lambda t: webhooks_pb2.ListWebhookDeliveriesRequest(
        parent=webhook(t)
    ),
    "WebhookService/GetWebhookDelivery": lambda t: webhooks_pb2.GetWebhookDeliveryRequest(
        name=f"{webhook(t)}/deliveries/dlv_01jd3k0000000000000000000a"
    ),
    "WebhookService/TestWebhook": lambda t: webhooks_pb2.TestWebhookRequest(name=webhook(t)),
    "WebhookService/ReplayWebhookEvents": lambda t: webhooks_pb2.ReplayWebhookEventsRequest(
        name=webhook(t), event=f"{t.user.name}/events/evt_01jd3k0000000000000000000a"
    ),
    "WebhookService/RecoverWebhookDeliveries": (
        lambda t: webhooks_pb2.RecoverWebhookDeliveriesRequest(
            name=webhook(t), start_time=timestamp_pb2.Timestamp(seconds=int(time.time()) - 60)
        )
    ),
    "OperationService/GetOperation": lambda t: operations_pb2.GetOperationRequest(
        name=f"{t.user.name}/operations/opr_01jd3k0000000000000000000a"
    ),
    "OperationService/CancelOperation": lambda t: operations_pb2.CancelOperationRequest(
        name=f"{t.user.name}/operations/opr_01jd3k0000000000000000000a"
    ),
    "OperationService/ListOperations": lambda t: operations_pb2.ListOperationsRequest(
        parent=t.user.name
    ),
    # Public: the answer is a decision for any caller (the proxy forwards its web client's
    # credential); which decision each caller gets is tests/integration/test_tunnel_access.py.
    "ProxyService/CheckTunnelAccess": lambda t: proxies_pb2.CheckTunnelAccessRequest(
        tunnel_id=t.tunnel.rsplit("/", 1)[1], client_ip="203.0.113.9"
    ),
    "ProxyService/AuthorizeAgentLink": lambda t: proxies_pb2.AuthorizeAgentLinkRequest(
        tunnel=t.tunnel
    ),
    "ProxyService/StartProxy": lambda t: proxies_pb2.StartProxyRequest(
        parent=t.user.name, proxy=proxies_pb2.Proxy(display_name="matrix")
    ),
    "ProxyService/GetProxy": lambda t: proxies_pb2.GetProxyRequest(name=proxy(t)),
    "ProxyService/ListProxies": lambda t: proxies_pb2.ListProxiesRequest(parent=t.user.name),
    "ProxyService/StopProxy": lambda t: proxies_pb2.StopProxyRequest(name=proxy(t)),
    "ProxyService/UpdateProxy": lambda t: proxies_pb2.UpdateProxyRequest(
        proxy=proxies_pb2.Proxy(name=proxy(t), display_name="renamed"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    ),
    "ProxyService/ListProxyConfigRevisions": lambda t: proxies_pb2.ListProxyConfigRevisionsRequest(
        parent=proxy(t)
    ),
    "ProxyService/RollbackProxyConfig": lambda t: proxies_pb2.RollbackProxyConfigRequest(
        name=proxy(t), version=1
    ),
    "ProxyService/ScaleProxy": lambda t: proxies_pb2.ScaleProxyRequest(name=proxy(t), instances=1),
    "ProxyService/ListProxyScalingEvents": lambda t: proxies_pb2.ListProxyScalingEventsRequest(
        parent=proxy(t)
    ),
    "ProxyService/WatchProxies": lambda t: proxies_pb2.WatchProxiesRequest(name=proxy(t)),
    "ProxyService/GetProxyMetrics": lambda t: proxies_pb2.GetProxyMetricsRequest(
        name=f"{proxy(t)}/metrics"
    ),
    "ProxyService/GetProxyDiagnostics": lambda t: proxies_pb2.GetProxyDiagnosticsRequest(
        name=f"{proxy(t)}/diagnostics"
    ),
}

METHODS = [(s.name, m) for s in SERVICES for m in s.methods]
CALLERS = [
    "anonymous",
    "owner",
    "other_user",
    "admin",
    "key_without_scope",
    "key_with_scope",
    "agent_key",
    "cookie_only",
]
#: Other users with a share of the owner's tunnel, and the share role each holds.
SHARED = {"shared_read": 1, "shared_write": 2, "shared_admin": 3}
#: API keys that differ in what they may hand out, where keys are handed out: the owner's
#: key without scopes (the whole role), the owner's key with every scope of the role
#: listed, and an administrator's key scoped to the method's permission and admin
#: permission only.
KEY_CALLERS = ["key_whole_role", "key_every_scope", "admin_key_narrow"]
#: Agent keys that may not carry the target's tunnel, where agents are let in (methods that
#: need ``agent.connect``): another user's, and the owner's own bound to another tunnel.
#: The policy lets them through; the domain refuses them.
AGENT_CALLERS = ["stranger_agent_key", "bound_agent_key"]
#: Services where a share of the owner's tunnel can matter.
SHARING = frozenset({"TunnelService", "ProxyService"})
#: Methods that hand out a working key (a new one, or a new secret for an existing one):
#: the key may do nothing the caller cannot. The key created here and the target key
#: have no scopes: their owner's whole role.
HANDS_OUT_KEYS = frozenset({"AuthService/CreateApiKey", "AuthService/RotateApiKey"})


def carries_tunnels(method: Any) -> bool:
    """Whether the method is for agents carrying tunnels (its permission is agent.connect)."""
    return bool(method.GetOptions().Extensions[options_pb2.policy].permission == "agent.connect")


#: Every (service, method, caller) cell; shared callers only where shares can matter, the
#: extra key callers where keys are handed out, the misfit agent keys where agents go.
CASES = [
    (service, method, caller)
    for service, method in METHODS
    for caller in CALLERS
    + (list(SHARED) if service in SHARING else [])
    + (KEY_CALLERS if service == "AuthService" else [])
    + (AGENT_CALLERS if carries_tunnels(method) else [])
]
ALLOWED, UNAUTHENTICATED, DENIED = "allowed", "unauthenticated", "denied"
SESSION, API_KEY = options_pb2.CREDENTIAL_KIND_SESSION, options_pb2.CREDENTIAL_KIND_API_KEY


def expected(policy: options_pb2.Policy, caller: str, name: str) -> str:
    """What the declared policy says a caller gets for the method ``name`` (owner and other
    users have role user and the free tier)."""
    if policy.access == options_pb2.ACCESS_PUBLIC:
        return ALLOWED
    if caller == "cookie_only":  # the owner's access token in the tp_access cookie alone
        caller = "owner" if policy.cookie_auth else "anonymous"
    if caller == "anonymous":
        return UNAUTHENTICATED
    credentials = list(policy.credentials)
    key_caller = caller in {
        "key_without_scope",
        "key_with_scope",
        "agent_key",
        *KEY_CALLERS,
        *AGENT_CALLERS,
    }
    if credentials and (API_KEY if key_caller else SESSION) not in credentials:
        return DENIED
    if caller in {"agent_key", *AGENT_CALLERS}:
        # The agent keys that may not carry the tunnel: NOT_OWNER, KEY_BOUND_TO_ANOTHER_TUNNEL.
        return ALLOWED if caller == "agent_key" and policy.permission == "agent.connect" else DENIED
    if caller == "admin":
        return ALLOWED
    if caller == "key_without_scope":
        return DENIED
    if caller in {"key_with_scope", "admin_key_narrow"} and name in HANDS_OUT_KEYS:
        return DENIED  # SCOPE_ESCALATION: the owner's whole role is more than the key holds
    if caller == "admin_key_narrow":
        return ALLOWED
    has_permission = not policy.permission or policy.permission in ROLE_PERMISSIONS[Role.USER]
    if caller in SHARED and policy.owner_field:
        shared = policy.share_role and SHARED[caller] >= policy.share_role
        return ALLOWED if shared and has_permission else DENIED
    if caller == "other_user" and policy.owner_field:
        return DENIED
    if caller in {"owner", "key_with_scope"} and policy.min_tier > common_pb2.TIER_FREE:
        return DENIED
    return ALLOWED if has_permission else DENIED


def test_every_rpc_has_a_builder() -> None:
    names = {f"{service}/{method.name}" for service, method in METHODS}
    assert names == set(BUILDERS), "add the new RPC to BUILDERS (and think about who may call it)"


async def others(client: Client, caller: str) -> dict[str, TestUser]:
    """The admin or other user a cell needs (made only when it needs one)."""
    if caller == "admin":
        return {"admin": await client.new_user(role=Role.SUPER_ADMIN, tag="admin")}
    if caller == "other_user":
        return {"other_user": await client.new_user(tag="other")}
    if caller == "admin_key_narrow":
        return {"admin_key_owner": await client.new_user(role=Role.SUPER_ADMIN, tag="admin")}
    if caller == "stranger_agent_key":
        return {"stranger": await client.new_user(tag="stranger")}
    return {}


async def credentials_for(
    caller: str,
    client: Client,
    target: Target,
    policy: options_pb2.Policy,
    others: dict[str, TestUser],
) -> tuple[tuple[str, str], ...]:
    if caller == "anonymous":
        return ()
    if caller == "cookie_only":
        return (("cookie", f"tp_access={target.user.access_token}"),)
    if caller == "owner":
        return target.user.metadata
    if caller in others:
        return others[caller].metadata
    if caller in SHARED:
        return (await shared_user(client, target, ShareRole(SHARED[caller]))).metadata
    if caller == "admin_key_narrow":
        narrow = [p for p in (policy.permission, policy.admin_permission) if p]
        return bearer(await client.api_key(others["admin_key_owner"], narrow or ["profile.read"]))
    if caller in AGENT_CALLERS:
        return bearer(await misfit_agent_key(caller, client, target, others))
    if caller == "agent_key":
        scopes = ["agent.connect"]
    elif caller == "key_without_scope":
        scopes = sorted(SELF_PERMISSIONS - {policy.permission})
    elif caller == "key_whole_role":
        scopes = []
    elif caller == "key_every_scope":
        scopes = sorted(ROLE_PERMISSIONS[Role.USER])
    else:
        scopes = [policy.permission] if policy.permission in SELF_PERMISSIONS else []
    return bearer(await client.api_key(target.user, scopes))


async def shared_user(client: Client, target: Target, role: ShareRole) -> TestUser:
    """A new user holding a ``role`` share of the target's tunnel."""
    user = await client.new_user(tag="shared")
    parts = client.app.tunnels
    owner_id, tunnel_id = target.user.id, target.tunnel.rsplit("/", 1)[1]
    tunnel = await parts.tunnels.get(owner_id, tunnel_id)
    await parts.shares.grant(tunnel, user.id, role, None, creator_id=owner_id)
    return user


async def misfit_agent_key(
    caller: str, client: Client, target: Target, others: dict[str, TestUser]
) -> str:
    """An agent key that may not carry the target's tunnel: a stranger's, or one of the
    target's owner bound to another tunnel of theirs."""
    if caller == "stranger_agent_key":
        return await client.api_key(others["stranger"], ["agent.connect"])
    other = await client.tunnel(target.user, "matrix-other")
    made = await client.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            parent=target.user.name,
            api_key=auth_pb2.ApiKey(
                display_name="bound", scopes=["agent.connect"], tunnel=other.name
            ),
        ),
        metadata=target.user.metadata,
    )
    return made.secret


async def make_target(client: Client) -> Target:
    """A fresh owner with an API key and a tunnel."""
    owner = await client.new_user(tag="owner")
    key = await client.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(parent=owner.name, api_key=auth_pb2.ApiKey(display_name="k")),
        metadata=owner.metadata,
    )
    tunnel = await client.tunnel(owner, "matrix-target")
    return Target(owner, key.api_key.name, tunnel.name)


async def call_rpc(
    client: Client, service: str, method: Any, request: Message, metadata: Any
) -> tuple[grpc.StatusCode, str]:
    """Make the call: its status (a stream is OK once its first message arrives)."""
    stub = {
        "AuthService": client.auth,
        "UserService": client.users,
        "AdminService": client.admin,
        "AuditService": client.audit,
        "TunnelService": client.tunnels,
        "AgentService": client.agents,
        "EventService": client.events,
        "WebhookService": client.webhooks,
        "OperationService": client.operations,
        "ProxyService": client.proxies,
    }[service]
    rpc = getattr(stub, method.name)
    try:
        if not method.server_streaming:
            await rpc(request, metadata=metadata)
            return grpc.StatusCode.OK, ""
        stream = (
            rpc(metadata=metadata) if method.client_streaming else rpc(request, metadata=metadata)
        )
        try:
            if method.client_streaming:
                await stream.write(request)
            if await stream.read() is grpc.aio.EOF:
                return await stream.code(), await stream.details() or ""
            return grpc.StatusCode.OK, ""
        finally:
            stream.cancel()
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""


@pytest.mark.parametrize(
    ("service", "method", "caller"), CASES, ids=lambda v: getattr(v, "name", v)
)
async def test_authorization_matrix(client: Client, service: str, method: Any, caller: str) -> None:
    name = f"{service}/{method.name}"
    policy = method.GetOptions().Extensions[options_pb2.policy]
    target = await make_target(client)
    metadata = await credentials_for(caller, client, target, policy, await others(client, caller))
    code, details = await call_rpc(client, service, method, BUILDERS[name](target), metadata)
    outcome = {
        grpc.StatusCode.UNAUTHENTICATED: UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED: DENIED,
    }.get(code, ALLOWED)
    if outcome == ALLOWED:
        # Let through; it may still be refused for another reason after authorization.
        assert code in {
            grpc.StatusCode.OK,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.INVALID_ARGUMENT,
        }, f"{name} as {caller}: {code} {details}"
    assert outcome == expected(policy, caller, name), f"{name} as {caller}: {details}"
