"""The full auth lifecycle over a real server, with real stubs, on every backend."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2
from tunnelplane.v1 import auth_pb2, users_pb2

from server.domain.identity.rules import looks_like_key
from tests.certs import self_signed
from tests.conftest import sqlite_server
from tests.helpers import PASSWORD, Client, bearer, cookie_login, fails, reason, unique_email

ME = users_pb2.GetUserRequest(name="users/me")


async def test_register_login_get_me_refresh_logout(client: Client) -> None:
    email = unique_email("Flow").replace("flow", "Flow")
    registered = await client.register(email)
    assert registered.email == email.lower()
    assert registered.name.startswith("users/usr_")

    login = await client.login(email.lower())
    tokens = login.tokens
    assert tokens.token_type == "Bearer"
    assert tokens.expires_in == 900
    assert login.user.last_login_time.seconds > 0

    me = await client.users.GetUser(ME, metadata=bearer(tokens.access_token))
    assert me.name == registered.name

    refreshed = await client.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token)
    )
    assert refreshed.tokens.refresh_token != tokens.refresh_token
    new_access = refreshed.tokens.access_token
    await client.users.GetUser(ME, metadata=bearer(new_access))

    await client.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(new_access))
    error = await fails(
        client.users.GetUser(ME, metadata=bearer(new_access)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert reason(error) == "TOKEN_REVOKED"
    # The session is over: its latest refresh token no longer works either.
    await fails(
        client.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=refreshed.tokens.refresh_token)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_wrong_password_and_unknown_account_look_the_same(client: Client) -> None:
    user = await client.new_user()
    wrong = await fails(
        client.login(user.email, "not the password at all"), grpc.StatusCode.UNAUTHENTICATED
    )
    unknown = await fails(client.login(unique_email(), PASSWORD), grpc.StatusCode.UNAUTHENTICATED)
    assert wrong.details() == unknown.details()
    assert reason(wrong) == reason(unknown) == "INVALID_CREDENTIALS"


async def test_duplicate_registration_is_already_exists(client: Client) -> None:
    email = unique_email()
    await client.register(email)
    await fails(client.register(email.upper()), grpc.StatusCode.ALREADY_EXISTS)


async def test_refresh_token_rotation_reuse_revokes_the_family(client: Client) -> None:
    user = await client.new_user()
    first = await client.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=user.refresh_token)
    )
    # Presenting the spent token again is reuse: the whole session ends.
    error = await fails(
        client.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=user.refresh_token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert reason(error) == "REFRESH_TOKEN_REUSED"
    await fails(
        client.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=first.tokens.refresh_token)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    # ... and so do the access tokens of that session, at once.
    await fails(
        client.users.GetUser(ME, metadata=bearer(first.tokens.access_token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_two_concurrent_refreshes_exactly_one_wins(client: Client) -> None:
    user = await client.new_user()
    request = auth_pb2.RefreshTokenRequest(refresh_token=user.refresh_token)
    results = await asyncio.gather(
        client.auth.RefreshToken(request), client.auth.RefreshToken(request), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, auth_pb2.RefreshTokenResponse)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert len(losers) == 1
    assert losers[0].code() == grpc.StatusCode.UNAUTHENTICATED
    # A further reuse revokes the family, including the winner's new token.
    await fails(client.auth.RefreshToken(request), grpc.StatusCode.UNAUTHENTICATED)
    await fails(
        client.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=winners[0].tokens.refresh_token)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_logout_all_sessions_ends_every_session(client: Client) -> None:
    user = await client.new_user()
    other = await client.login(user.email)
    await client.auth.Logout(auth_pb2.LogoutRequest(all_sessions=True), metadata=user.metadata)
    for token in (user.access_token, other.tokens.access_token):
        await fails(
            client.users.GetUser(ME, metadata=bearer(token)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    await fails(
        client.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=other.tokens.refresh_token)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_refresh_token_by_cookie(client: Client) -> None:
    email = unique_email()
    await client.register(email)
    call = client.auth.Login(
        auth_pb2.LoginRequest(
            email=email,
            password=PASSWORD,
            refresh_token_delivery=auth_pb2.REFRESH_TOKEN_DELIVERY_COOKIE,
        )
    )
    login = await call
    assert login.tokens.refresh_token == ""
    cookies = [v for k, v in await call.initial_metadata() if k == "set-cookie"]
    assert [c.split("=")[0] for c in cookies] == ["tp_refresh", "tp_access"]
    cookie = cookies[0]
    attributes = {a.strip() for a in cookie.split(";")[1:]}
    assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/v1/auth:refresh"} <= attributes
    access = {a.strip() for a in cookies[1].split(";")}
    assert f"tp_access={login.tokens.access_token}" in access
    assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/v1"} <= access
    value = cookie.split(";")[0]
    refresh = client.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(), metadata=(("cookie", value),)
    )
    refreshed = await refresh
    assert refreshed.tokens.access_token
    assert refreshed.tokens.refresh_token == ""
    rotated = [v for k, v in await refresh.initial_metadata() if k == "set-cookie"]
    assert rotated
    assert rotated[0].split(";")[0] != value


async def test_cookie_refresh_works_from_a_real_cookie_jar_over_https(tmp_path: Path) -> None:
    """A browser's rules, not a hand-written Cookie header: the jar sends the cookie only
    over HTTPS (Secure) and only to paths its Path matches (RFC 6265 5.1.4)."""
    cert, key = self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    async with (
        sqlite_server(tmp_path, tls_cert_file=str(cert), tls_key_file=str(key)) as server,
        httpx.AsyncClient(
            base_url=f"https://localhost:{server.http_port}", verify=trust
        ) as browser,
    ):
        await browser_cookie_flow(browser)


async def browser_cookie_flow(browser: httpx.AsyncClient) -> None:
    """Sign in with cookie delivery, refresh with an empty body, sign out."""
    login = await cookie_login(browser, "browser")
    refresh_cookie, access_cookie = login.headers.get_list("set-cookie")
    attributes = {a.strip() for a in refresh_cookie.split(";")[1:]}
    assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/v1/auth:refresh"} <= attributes
    attributes = {a.strip() for a in access_cookie.split(";")[1:]}
    assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/v1"} <= attributes
    assert attributes & {"Max-Age=899", "Max-Age=900"}  # the access token's lifetime
    first = browser.cookies.get("tp_refresh")
    assert first

    refreshed = await browser.post("/v1/auth:refresh", json={})
    assert refreshed.status_code == 200, refreshed.text
    tokens = refreshed.json()["tokens"]
    assert tokens["refreshToken"] == ""
    assert browser.cookies.get("tp_refresh") not in {None, first}  # rotated in the jar
    again = await browser.post("/v1/auth:refresh", json={})  # the jar holds the new one
    assert again.status_code == 200, again.text
    access = again.json()["tokens"]["accessToken"]

    out = await browser.post(
        "/v1/auth:logout", json={}, headers={"authorization": f"Bearer {access}"}
    )
    assert out.status_code == 200, out.text
    assert "tp_refresh" not in browser.cookies  # cleared: same name and path, Max-Age=0
    assert "tp_access" not in browser.cookies
    after = await browser.post("/v1/auth:refresh", json={})
    assert after.status_code == 401
    assert after.json()["details"][0]["reason"] == "REFRESH_TOKEN_INVALID"


async def test_missing_refresh_token_is_unauthenticated(client: Client) -> None:
    error = await fails(
        client.auth.RefreshToken(auth_pb2.RefreshTokenRequest()), grpc.StatusCode.UNAUTHENTICATED
    )
    assert reason(error) == "REFRESH_TOKEN_INVALID"


@pytest.mark.parametrize(
    "credential",
    ["garbage", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "tp_" + "A" * 38],
)
async def test_bad_bearer_credentials_are_refused(client: Client, credential: str) -> None:
    await fails(
        client.users.GetUser(ME, metadata=bearer(credential)),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_jwks_publishes_the_signing_key(client: Client) -> None:
    jwks = await client.auth.GetJwks(auth_pb2.GetJwksRequest())
    assert len(jwks.keys) >= 1
    key = jwks.keys[0]
    assert (key.kty, key.crv, key.alg, key.use) == ("OKP", "Ed25519", "EdDSA", "sig")
    user = await client.new_user()
    import jwt

    header = jwt.get_unverified_header(user.access_token)
    assert header["kid"] == key.kid
    assert header["typ"] == "at+jwt"
    verified = jwt.decode(
        user.access_token,
        jwt.PyJWK({"kty": key.kty, "crv": key.crv, "x": key.x}).key,
        algorithms=["EdDSA"],
        audience="tunnelplane-api",
    )
    assert verified["sub"] == user.id


async def test_api_key_lifecycle(client: Client) -> None:
    owner = await client.new_user()
    created = await client.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            parent="users/me",
            api_key=auth_pb2.ApiKey(display_name="ci deploys", scopes=["profile.read"]),
        ),
        metadata=owner.metadata,
    )
    secret = created.secret
    assert looks_like_key(secret)
    assert created.api_key.prefix == secret[:9]
    assert created.api_key.state == auth_pb2.ApiKey.STATE_ACTIVE

    me = await client.users.GetUser(ME, metadata=bearer(secret))
    assert me.name == owner.name
    # The key's scopes narrow its owner's permissions.
    await fails(
        client.auth.ListApiKeys(
            auth_pb2.ListApiKeysRequest(parent="users/me"), metadata=bearer(secret)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    listed = await client.auth.ListApiKeys(
        auth_pb2.ListApiKeysRequest(parent=owner.name), metadata=owner.metadata
    )
    assert [k.name for k in listed.api_keys] == [created.api_key.name]
    assert all(not k.HasField("revoke_time") for k in listed.api_keys)

    rotated = await client.auth.RotateApiKey(
        auth_pb2.RotateApiKeyRequest(name=created.api_key.name), metadata=owner.metadata
    )
    assert rotated.previous.replaced_by == rotated.api_key.name
    assert rotated.previous.HasField("expire_time")
    # Both keys work during the overlap window.
    for key in (secret, rotated.secret):
        await client.users.GetUser(ME, metadata=bearer(key))

    revoked = await client.auth.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(name=rotated.api_key.name), metadata=owner.metadata
    )
    assert revoked.state == auth_pb2.ApiKey.STATE_REVOKED
    error = await fails(
        client.users.GetUser(ME, metadata=bearer(rotated.secret)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert reason(error) == "API_KEY_INVALID"


async def test_rotation_with_zero_overlap_ends_the_old_key_at_once(client: Client) -> None:
    owner = await client.new_user()
    secret = await client.api_key(owner)
    keys = await client.auth.ListApiKeys(
        auth_pb2.ListApiKeysRequest(parent=owner.name), metadata=owner.metadata
    )

    await client.auth.RotateApiKey(
        auth_pb2.RotateApiKeyRequest(
            name=keys.api_keys[0].name, overlap=duration_pb2.Duration(seconds=0)
        ),
        metadata=owner.metadata,
    )
    await fails(
        client.users.GetUser(ME, metadata=bearer(secret)),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_api_key_scopes_must_belong_to_the_owner(client: Client) -> None:
    owner = await client.new_user()
    error = await fails(
        client.auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                parent=owner.name,
                api_key=auth_pb2.ApiKey(display_name="escalate", scopes=["users.admin"]),
            ),
            metadata=owner.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    from tests.helpers import violations

    assert "api_key.scopes[0]" in violations(error)


async def test_rejected_credentials_are_audited(client: Client) -> None:
    import sqlalchemy as sa

    from server.storage.tables import audit_log

    call = client.users.GetUser(ME, metadata=bearer("not-a-token"))
    error = await fails(call, grpc.StatusCode.UNAUTHENTICATED)
    request_id = dict(await call.initial_metadata())["x-request-id"]
    async with client.app.db.engine.connect() as conn:
        rows = (
            (await conn.execute(sa.select(audit_log).where(audit_log.c.request_id == request_id)))
            .mappings()
            .all()
        )
    assert len(rows) == 1
    row = rows[0]
    assert row["action"] == "auth.credential_rejected"
    assert row["outcome"] == "UNAUTHENTICATED"
    assert row["reason"] == reason(error) == "TOKEN_INVALID"
    assert row["method"] == "/tunnelplane.v1.UserService/GetUser"
    assert row["ip_address"] == "127.0.0.1"
    assert row["user_agent"].startswith("grpc-python")
