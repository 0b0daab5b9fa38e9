"""The authorization matrix: every RPC in the contract x every kind of caller.

The expected outcome of each cell is derived from the method's declared policy (read
from the descriptors, independently of the server's own reading), and the call is made
for real against a fresh owner. A new RPC without a request builder here fails the test,
so nothing joins the API without being checked.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from google.api import httpbody_pb2
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from tunnelplane.v1 import admin_pb2, auth_pb2, common_pb2, options_pb2, users_pb2

from server.app import SERVICES
from server.domain.principal import ROLE_PERMISSIONS, SELF_PERMISSIONS, Role
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


Builder = Callable[[Target], Message]

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
        name=t.user.name, role=common_pb2.ROLE_SUPPORT_ADMIN
    ),
    "UserService/ListTiers": lambda t: users_pb2.ListTiersRequest(),
    "UserService/GetTier": lambda t: users_pb2.GetTierRequest(name="tiers/free"),
    "UserService/ChangeTier": lambda t: users_pb2.ChangeTierRequest(
        name=t.user.name, tier=common_pb2.TIER_PREMIUM
    ),
    "UserService/ListActivity": lambda t: users_pb2.ListActivityRequest(parent=t.user.name),
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
    "AdminService/ListRateLimitViolations": lambda t: admin_pb2.ListRateLimitViolationsRequest(),
    "AdminService/SummarizeRateLimitViolations": lambda t: (
        admin_pb2.SummarizeRateLimitViolationsRequest()
    ),
    "AdminService/ListIpBlocks": lambda t: admin_pb2.ListIpBlocksRequest(),
    "AdminService/DeleteIpBlock": lambda t: admin_pb2.DeleteIpBlockRequest(
        name="ipBlocks/10.9.9.9"
    ),
}

METHODS = [(s.name, m) for s in SERVICES for m in s.methods]
CALLERS = ["anonymous", "owner", "other_user", "admin", "key_without_scope", "key_with_scope"]
ALLOWED, UNAUTHENTICATED, DENIED = "allowed", "unauthenticated", "denied"


def expected(policy: options_pb2.Policy, caller: str) -> str:
    """What the declared policy says a caller gets (owner and other user have role user)."""
    if policy.access == options_pb2.ACCESS_PUBLIC:
        return ALLOWED
    if caller == "anonymous":
        return UNAUTHENTICATED
    if caller == "admin":
        return ALLOWED
    user_perms = ROLE_PERMISSIONS[Role.USER]
    if caller == "key_without_scope":
        return DENIED
    if caller == "key_with_scope":
        sessions_only = list(policy.credentials) == [options_pb2.CREDENTIAL_KIND_SESSION]
        if sessions_only:
            return DENIED
    has_permission = not policy.permission or policy.permission in user_perms
    if caller == "other_user" and policy.owner_field:
        return DENIED
    return ALLOWED if has_permission else DENIED


def test_every_rpc_has_a_builder() -> None:
    names = {f"{service}/{method.name}" for service, method in METHODS}
    assert names == set(BUILDERS), "add the new RPC to BUILDERS (and think about who may call it)"


@pytest.fixture
async def admin(client: Client) -> TestUser:
    return await client.new_user(role=Role.SUPER_ADMIN, tag="admin")


@pytest.fixture
async def other_user(client: Client) -> TestUser:
    return await client.new_user(tag="other")


async def credentials_for(
    caller: str,
    client: Client,
    target: Target,
    policy: options_pb2.Policy,
    others: dict[str, TestUser],
) -> tuple[tuple[str, str], ...]:
    if caller == "anonymous":
        return ()
    if caller == "owner":
        return target.user.metadata
    if caller in others:
        return others[caller].metadata
    if caller == "key_without_scope":
        scopes = sorted(SELF_PERMISSIONS - {policy.permission})
    else:
        scopes = [policy.permission] if policy.permission in SELF_PERMISSIONS else []
    return bearer(await client.api_key(target.user, scopes))


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(("service", "method"), METHODS, ids=lambda v: getattr(v, "name", v))
async def test_authorization_matrix(
    client: Client, admin: TestUser, other_user: TestUser, service: str, method: object, caller: str
) -> None:
    descriptor = method
    name = f"{service}/{descriptor.name}"  # type: ignore[attr-defined]
    policy = descriptor.GetOptions().Extensions[options_pb2.policy]  # type: ignore[attr-defined]
    owner = await client.new_user(tag="owner")
    key = await client.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(parent=owner.name, api_key=auth_pb2.ApiKey(display_name="k")),
        metadata=owner.metadata,
    )
    target = Target(owner, key.api_key.name)
    metadata = await credentials_for(
        caller, client, target, policy, {"admin": admin, "other_user": other_user}
    )
    stub = {"AuthService": client.auth, "UserService": client.users, "AdminService": client.admin}[
        service
    ]
    rpc = getattr(stub, descriptor.name)  # type: ignore[attr-defined]
    try:
        await rpc(BUILDERS[name](target), metadata=metadata)
        outcome = ALLOWED
    except grpc.aio.AioRpcError as error:
        outcome = {
            grpc.StatusCode.UNAUTHENTICATED: UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED: DENIED,
        }.get(error.code(), ALLOWED)
        if outcome == ALLOWED:
            # Refused for another reason, after authorization let it through.
            assert error.code() in {
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
            }, f"{name} as {caller}: {error.code()} {error.details()}"
    assert outcome == expected(policy, caller), f"{name} as {caller}"
