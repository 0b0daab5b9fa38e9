"""Tunnelplane over the embedded HTTP gateway: the same calls, the same answers."""

from __future__ import annotations

from pathlib import Path

import httpx
from google.protobuf import json_format
from tunnelplane.v1 import users_pb2

from server.app import App
from tests.conftest import production
from tests.helpers import PASSWORD, Client, http_of, unique_email
from tests.integration.test_authorization import tiny_png


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_register_login_me_refresh_by_cookie_logout(http: httpx.AsyncClient) -> None:
    email = unique_email("http")
    registered = await http.post("/v1/auth:register", json={"email": email, "password": PASSWORD})
    assert registered.status_code == 200, registered.text
    user = registered.json()["user"]
    assert user["email"] == email
    assert user["role"] == "ROLE_USER"

    login = await http.post(
        "/v1/auth:login",
        json={
            "email": email,
            "password": PASSWORD,
            "refreshTokenDelivery": "REFRESH_TOKEN_DELIVERY_COOKIE",
        },
    )
    assert login.status_code == 200, login.text
    tokens = login.json()["tokens"]
    assert tokens["refreshToken"] == ""  # only in the cookie
    assert tokens["expiresIn"] == "900"  # int64 as a string
    cookie = login.headers["set-cookie"]
    for attribute in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/v1/auth"):
        assert attribute in cookie
    refresh_cookie = cookie.split(";")[0]

    me = await http.get("/v1/users/me", headers=bearer(tokens["accessToken"]))
    assert me.status_code == 200
    assert me.json()["name"] == user["name"]
    assert me.headers["x-request-id"]

    refreshed = await http.post("/v1/auth:refresh", json={}, headers={"cookie": refresh_cookie})
    assert refreshed.status_code == 200, refreshed.text
    rotated = refreshed.headers["set-cookie"].split(";")[0]
    assert rotated != refresh_cookie
    access = refreshed.json()["tokens"]["accessToken"]

    # The spent cookie is reuse: the whole session ends, including the new access token.
    reused = await http.post("/v1/auth:refresh", json={}, headers={"cookie": refresh_cookie})
    assert reused.status_code == 401
    assert reused.json()["details"][0]["reason"] == "REFRESH_TOKEN_REUSED"
    assert (await http.get("/v1/users/me", headers=bearer(access))).status_code == 401


async def test_logout_clears_the_cookie_and_revokes(http: httpx.AsyncClient) -> None:
    email = unique_email("http")
    await http.post("/v1/auth:register", json={"email": email, "password": PASSWORD})
    login = await http.post("/v1/auth:login", json={"email": email, "password": PASSWORD})
    access = login.json()["tokens"]["accessToken"]
    out = await http.post("/v1/auth:logout", json={}, headers=bearer(access))
    assert out.status_code == 200
    assert out.json() == {}
    assert "Max-Age=0" in out.headers["set-cookie"]
    denied = await http.get("/v1/users/me", headers=bearer(access))
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"].startswith("Bearer")


async def test_http_and_grpc_errors_agree(http: httpx.AsyncClient, client: Client) -> None:
    """The same bad call gives the same status and details on both transports."""
    bad = {"email": "not-an-email", "password": "short"}
    response = await http.post("/v1/auth:register", json=bad)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 3
    assert body["requestId"] == response.headers["x-request-id"]
    kinds = {d["@type"].rsplit("/", 1)[1]: d for d in body["details"]}
    assert kinds["google.rpc.ErrorInfo"]["domain"] == "tunnelplane.dev"
    http_fields = {v["field"] for v in kinds["google.rpc.BadRequest"]["fieldViolations"]}
    import grpc
    from tunnelplane.v1 import auth_pb2

    from tests.helpers import fails, violations

    error = await fails(
        client.auth.Register(
            auth_pb2.RegisterRequest(email=bad["email"], password=bad["password"])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(violations(error)) == http_fields == {"email", "password"}
    assert error.details() == body["message"]


async def test_update_user_patch_infers_the_mask(http: httpx.AsyncClient, client: Client) -> None:
    user = await client.new_user()
    patched = await http.patch(
        f"/v1/{user.name}",
        json={"displayName": "Renamed", "preferences": {"theme": "THEME_DARK"}},
        headers=bearer(user.access_token),
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["displayName"] == "Renamed"
    assert body["preferences"]["theme"] == "THEME_DARK"
    # Untouched preferences keep their values: the mask came from the body's keys.
    assert body["preferences"]["language"] == "en"
    assert body["preferences"]["notifications"]["email"] is True


async def test_avatar_upload_and_download_are_raw_bytes(
    http: httpx.AsyncClient, client: Client
) -> None:
    user = await client.new_user()
    png = tiny_png()
    headers = {**bearer(user.access_token), "content-type": "image/png"}
    uploaded = await http.put("/v1/users/me/avatar", content=png, headers=headers)
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["hasAvatar"] is True
    downloaded = await http.get("/v1/users/me/avatar", headers=bearer(user.access_token))
    assert downloaded.status_code == 200
    assert downloaded.headers["content-type"] == "image/png"
    assert downloaded.content == png
    assert downloaded.headers["cache-control"] == "private, max-age=300"
    wrong = await http.put(
        "/v1/users/me/avatar",
        content=b"<html>",
        headers={**bearer(user.access_token), "content-type": "text/html"},
    )
    assert wrong.status_code == 400
    assert wrong.json()["details"][1]["fieldViolations"][0]["field"] == "avatar.content_type"


async def test_jwks_and_tiers_are_public(http: httpx.AsyncClient) -> None:
    jwks = await http.get("/.well-known/jwks.json")
    assert jwks.status_code == 200
    key = jwks.json()["keys"][0]
    assert key["kty"] == "OKP"
    assert "y" not in key  # absent for OKP keys, as RFC 8037 requires
    tiers = await http.get("/v1/tiers")
    names = [t["name"] for t in tiers.json()["tiers"]]
    assert names == ["tiers/free", "tiers/premium", "tiers/enterprise"]
    premium = await http.get("/v1/tiers/premium")
    assert premium.json()["maxTunnels"] == "50"


async def test_list_users_over_http_with_query_parameters(
    http: httpx.AsyncClient, client: Client
) -> None:
    from server.domain.identity.model import Role

    admin = await client.new_user(role=Role.SUPPORT_ADMIN)
    marker = unique_email("q").split("@")[0]
    for _ in range(3):
        await client.register(f"{marker}-{_}@example.com")
    page = await http.get(
        "/v1/users",
        params={"filter": f'email : "{marker}"', "page_size": "2", "orderBy": "email desc"},
        headers=bearer(admin.access_token),
    )
    assert page.status_code == 200, page.text
    first = page.json()
    assert [u["email"] for u in first["users"]] == [
        f"{marker}-2@example.com",
        f"{marker}-1@example.com",
    ]
    rest = await http.get(
        "/v1/users",
        params={
            "filter": f'email : "{marker}"',
            "pageSize": "2",
            "order_by": "email desc",
            "pageToken": first["nextPageToken"],
        },
        headers=bearer(admin.access_token),
    )
    assert [u["email"] for u in rest.json()["users"]] == [f"{marker}-0@example.com"]
    assert rest.json()["nextPageToken"] == ""
    negative = await http.get(
        "/v1/users", params={"pageSize": "-1"}, headers=bearer(admin.access_token)
    )
    assert negative.status_code == 400


async def test_http_calls_run_the_same_pipeline(app: App, http: httpx.AsyncClient) -> None:
    """Metrics, request ids and audit see HTTP calls like gRPC ones."""
    response = await http.get("/v1/users/me", headers={"x-request-id": "req-from-http-1"})
    assert response.status_code == 401
    assert response.headers["x-request-id"] == "req-from-http-1"
    assert response.json()["requestId"] == "req-from-http-1"
    from prometheus_client import generate_latest

    text = generate_latest(app.registry).decode()
    assert 'grpc_server_handled_total{grpc_code="UNAUTHENTICATED",grpc_method="GetUser"' in text
    assert 'http_requests_total{method="GET",route="/v1/{name=users/*}",status="401"}' in text


def user_message(document: dict[str, object]) -> users_pb2.User:
    return json_format.ParseDict(document, users_pb2.User())


async def test_production_refuses_auth_methods_over_plain_http(tmp_path: Path) -> None:
    """Over HTTP without TLS (and without a trusted X-Forwarded-Proto) credentials never
    travel in production mode; behind a trusted TLS proxy they do."""
    async with (
        production(tmp_path, http_trust_forwarded_proto=True) as server,
        http_of(server) as plain,
    ):
        body = {"email": unique_email(), "password": PASSWORD}
        refused = await plain.post("/v1/auth:register", json=body)
        assert refused.status_code == 403
        assert refused.json()["details"][0]["reason"] == "TLS_REQUIRED"
        assert (await plain.get("/v1/tiers")).status_code == 200  # no secrets: allowed
        proxied = await plain.post(
            "/v1/auth:register", json=body, headers={"x-forwarded-proto": "https"}
        )
        assert proxied.status_code == 200, proxied.text
        hsts = proxied.headers.get("strict-transport-security")
        assert hsts is None  # this listener itself has no TLS


async def test_http_metrics_are_labelled_by_route_template_never_raw_path(
    app: App, http: httpx.AsyncClient
) -> None:
    from prometheus_client import generate_latest

    await http.get("/v1/users/usr_01aaaaaaaaaaaaaaaaaaaaaaaa")
    await http.get("/v1/definitely/not/a/route/usr_01bbbbbbbbbbbbbbbbbbbbbbbb")
    text = generate_latest(app.registry).decode()
    lines = [line for line in text.splitlines() if line.startswith("http_request")]
    assert any('route="/v1/{name=users/*}"' in line for line in lines)
    assert any(
        'http_request_duration_seconds_count{method="GET",route="unmatched",status="404"}' in line
        for line in lines
    )
    assert not any("usr_01" in line or "definitely" in line for line in lines)
