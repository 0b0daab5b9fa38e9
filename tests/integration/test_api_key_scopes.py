"""API keys never mint more power than the credential that asks for them.

A caller may create a key, or rotate one (which hands over a working secret), only when
everything that key may do is something the caller may do itself. A session has its
user's role; an API key has its scopes within that role. A key with no scopes has the
owner's whole role. Reading keys (no secret) and revoking them are not limited.
"""

from __future__ import annotations

import grpc
import httpx
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnelplane.v1 import auth_pb2, users_pb2

from server.domain.identity.model import Role
from server.domain.identity.rules import AGENT_SCOPE, ROLE_PERMISSIONS
from tests.helpers import Client, TestUser, bearer, detail, fails, reason

ME = "users/me"
USER_ROLE = ROLE_PERMISSIONS[Role.USER]


async def create(
    client: Client, secret: str, scopes: list[str], *, parent: str = ME, tunnel: str = ""
) -> auth_pb2.CreateApiKeyResponse:
    """CreateApiKey with the credential ``secret``."""
    return await client.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            parent=parent,
            api_key=auth_pb2.ApiKey(display_name="minted", scopes=scopes, tunnel=tunnel),
        ),
        metadata=bearer(secret),
    )


async def key_names(client: Client, owner: TestUser) -> list[str]:
    listed = await client.auth.ListApiKeys(
        auth_pb2.ListApiKeysRequest(parent=owner.name, show_inactive=True),
        metadata=owner.metadata,
    )
    return sorted(k.name for k in listed.api_keys)


def refused_for_escalation(error: grpc.aio.AioRpcError, *secrets: str) -> None:
    """PERMISSION_DENIED with reason SCOPE_ESCALATION, naming no secret."""
    assert reason(error) == "SCOPE_ESCALATION"
    info = detail(error, error_details_pb2.ErrorInfo)
    text = f"{error.details()} {info}"
    for secret in secrets:
        assert secret not in text
    assert "tp_" not in text


async def test_a_key_cannot_create_a_key_with_the_owners_whole_role(client: Client) -> None:
    owner = await client.new_user()
    narrow = await client.api_key(owner, ["apikeys.write"])
    before = await key_names(client, owner)
    error = await fails(create(client, narrow, []), grpc.StatusCode.PERMISSION_DENIED)
    refused_for_escalation(error, narrow)
    error = await fails(
        create(client, narrow, ["apikeys.write", "tunnels.write"]),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    refused_for_escalation(error, narrow)
    assert await key_names(client, owner) == before  # nothing was created
    # Within its own permissions it may: the same scope, and nothing broader.
    same = await create(client, narrow, ["apikeys.write"])
    assert list(same.api_key.scopes) == ["apikeys.write"]


async def test_keys_with_the_whole_role_may_create_any_key_of_the_owner(client: Client) -> None:
    owner = await client.new_user()
    for scopes in ([], sorted(USER_ROLE)):
        whole = await client.api_key(owner, scopes)
        made = await create(client, whole, [])
        me = await client.users.GetUser(
            users_pb2.GetUserRequest(name=ME), metadata=bearer(made.secret)
        )
        assert me.name == owner.name


async def test_a_key_cannot_rotate_a_broader_key_to_read_its_secret(client: Client) -> None:
    owner = await client.new_user()
    broad_secret = await client.api_key(owner, [])
    broad = (await key_names(client, owner))[0]
    narrow = await client.api_key(owner, ["apikeys.write"])
    before = await key_names(client, owner)
    error = await fails(
        client.auth.RotateApiKey(auth_pb2.RotateApiKeyRequest(name=broad), metadata=bearer(narrow)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    refused_for_escalation(error, narrow, broad_secret)
    assert await key_names(client, owner) == before
    # The broad key was left alone: no replacement, no expiry.
    kept = await client.auth.GetApiKey(
        auth_pb2.GetApiKeyRequest(name=broad), metadata=owner.metadata
    )
    assert not kept.replaced_by
    assert not kept.HasField("expire_time")
    await client.users.GetUser(users_pb2.GetUserRequest(name=ME), metadata=bearer(broad_secret))


async def test_a_key_may_rotate_itself_and_narrower_keys(client: Client) -> None:
    owner = await client.new_user()
    own = await create(client, await client.api_key(owner, []), ["apikeys.write", "profile.read"])
    lesser = await create(client, own.secret, ["profile.read"])
    for name in (lesser.api_key.name, own.api_key.name):
        rotated = await client.auth.RotateApiKey(
            auth_pb2.RotateApiKeyRequest(name=name), metadata=bearer(own.secret)
        )
        assert rotated.secret


async def test_reading_and_revoking_keys_hand_out_nothing_so_a_narrow_key_may(
    client: Client,
) -> None:
    owner = await client.new_user()
    await client.api_key(owner, [])
    broad = (await key_names(client, owner))[0]
    narrow = await client.api_key(owner, ["apikeys.read", "apikeys.write"])
    got = await client.auth.GetApiKey(
        auth_pb2.GetApiKeyRequest(name=broad), metadata=bearer(narrow)
    )
    assert got.prefix  # what is shown: metadata; the message has no field for a secret
    assert not got.scopes
    listed = await client.auth.ListApiKeys(
        auth_pb2.ListApiKeysRequest(parent=ME), metadata=bearer(narrow)
    )
    assert broad in {k.name for k in listed.api_keys}
    revoked = await client.auth.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(name=broad), metadata=bearer(narrow)
    )
    assert revoked.state == auth_pb2.ApiKey.STATE_REVOKED


async def test_agent_keys_need_the_power_to_write_the_owners_tunnels(client: Client) -> None:
    owner = await client.new_user()
    tunnel = await client.tunnel(owner)
    keys_only = await client.api_key(owner, ["apikeys.write"])
    for bound in ("", tunnel.name):
        error = await fails(
            create(client, keys_only, [AGENT_SCOPE], tunnel=bound),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        refused_for_escalation(error, keys_only)
    with_tunnels = await client.api_key(owner, ["apikeys.write", "tunnels.write"])
    agent = await create(client, with_tunnels, [AGENT_SCOPE], tunnel=tunnel.name)
    assert agent.api_key.tunnel == tunnel.name
    await fails(
        client.auth.RotateApiKey(
            auth_pb2.RotateApiKeyRequest(name=agent.api_key.name), metadata=bearer(keys_only)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    rotated = await client.auth.RotateApiKey(
        auth_pb2.RotateApiKeyRequest(name=agent.api_key.name), metadata=bearer(with_tunnels)
    )
    assert rotated.api_key.tunnel == tunnel.name
    # A session holds its user's whole role: it mints agent keys as before.
    await client.api_key(owner, [AGENT_SCOPE])


async def test_an_admins_narrow_key_cannot_mint_keys_for_others(client: Client) -> None:
    admin = await client.new_user(role=Role.SUPER_ADMIN, tag="admin")
    user = await client.new_user()
    narrow = await client.api_key(admin, ["apikeys.write", "users.admin"])
    error = await fails(
        create(client, narrow, [], parent=user.name), grpc.StatusCode.PERMISSION_DENIED
    )
    refused_for_escalation(error, narrow)
    made = await create(client, narrow, ["apikeys.write"], parent=user.name)
    assert made.api_key.name.startswith(user.name + "/")
    # The administrator's own session holds every permission.
    await create(client, admin.access_token, [], parent=user.name)


async def test_escalation_is_refused_the_same_way_over_http(
    client: Client, http: httpx.AsyncClient
) -> None:
    owner = await client.new_user()
    await client.api_key(owner, [])
    broad = (await key_names(client, owner))[0]
    narrow = await client.api_key(owner, ["apikeys.write"])
    headers = {"authorization": f"Bearer {narrow}"}
    created = await http.post(
        "/v1/users/me/apiKeys", json={"displayName": "escalate"}, headers=headers
    )
    rotated = await http.post(f"/v1/{broad}:rotate", json={}, headers=headers)
    for response in (created, rotated):
        assert response.status_code == 403, response.text
        assert response.json()["details"][0]["reason"] == "SCOPE_ESCALATION"
        assert narrow not in response.text
        assert "secret" not in response.json()
    allowed = await http.post(
        "/v1/users/me/apiKeys",
        json={"displayName": "same", "scopes": ["apikeys.write"]},
        headers=headers,
    )
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["secret"].startswith("tp_")


# The law, stated independently of the server: what a key may do, and what a caller may
# hand out (a credential that writes the owner's tunnels may also mint agent keys).
def key_power(scopes: frozenset[str]) -> frozenset[str]:
    return scopes or USER_ROLE


def may_hand_out(caller: frozenset[str]) -> frozenset[str]:
    return caller | ({AGENT_SCOPE} if "tunnels.write" in caller else set())


requested_scopes = st.one_of(
    st.just(frozenset({AGENT_SCOPE})),
    st.frozensets(st.sampled_from(sorted(USER_ROLE))),
)
caller_scopes = st.frozensets(st.sampled_from(sorted(USER_ROLE - {"apikeys.write"}))).map(
    lambda s: s | {"apikeys.write"}
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(caller=caller_scopes, requested=requested_scopes)
async def test_creation_succeeds_iff_the_key_can_do_no_more_than_the_caller(
    client: Client, caller: frozenset[str], requested: frozenset[str]
) -> None:
    owner = await client.new_user(tag="law")
    secret = await client.api_key(owner, sorted(caller))
    allowed = key_power(requested) <= may_hand_out(caller)
    try:
        made = await create(client, secret, sorted(requested))
    except grpc.aio.AioRpcError as error:
        assert not allowed, f"{sorted(caller)} was refused {sorted(requested)}: {error.details()}"
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        refused_for_escalation(error, secret)
    else:
        assert allowed, f"{sorted(caller)} minted {sorted(requested)}"
        assert frozenset(made.api_key.scopes) == requested
