"""Hostile and malformed input for every RPC: refused with INVALID_ARGUMENT naming the bad
field, and nothing written.

Each row of :data:`BAD_REQUESTS` is one bad request. The snapshot taken around each call
covers every table a request could write except ``audit_log``, where failed audited calls
are recorded on purpose. :func:`test_every_rpc_is_covered` keeps the table complete: a new
RPC without rows (or an explicit exemption with a reason) fails it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import pytest_asyncio
import sqlalchemy as sa
from google.api import httpbody_pb2
from google.protobuf import duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.type import date_pb2
from tunnelplane.v1 import (
    admin_pb2,
    audit_pb2,
    auth_pb2,
    common_pb2,
    events_pb2,
    operations_pb2,
    proxies_pb2,
    tunnels_pb2,
    users_pb2,
    webhooks_pb2,
)

from server.app import SERVICES, App
from server.domain.identity.model import Role
from server.storage import tables
from server.storage.proxies import tables as proxy_tables
from tests.conftest import Backend, own_server
from tests.helpers import PASSWORD, Client, TestUser, bearer, fails, unique_email, violations

#: Tables a refused request must leave exactly as they were.
WATCHED = (
    tables.users,
    tables.sessions,
    tables.refresh_tokens,
    tables.api_keys,
    tables.avatars,
    tables.tunnels,
    tables.tunnel_endpoints,
    tables.tunnel_shares,
    tables.share_links,
    tables.agent_sessions,
    tables.agent_reports,
    tables.tunnel_usage,
    tables.webhooks,
    tables.webhook_deliveries,
    tables.webhook_attempts,
    tables.operations,
    tables.events,
    proxy_tables.proxies,
    proxy_tables.proxy_config_revisions,
    proxy_tables.proxy_scaling_events,
)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
DAY = 86_400


@dataclass(frozen=True)
class Ctx:
    """What the requests of the table refer to, made once per backend."""

    user: TestUser
    admin: TestUser
    key_name: str
    keys_page_token: str
    users_page_token: str
    tunnel: str = ""
    webhook: str = ""
    #: The user's agent key (``agent.connect``), for the methods only agents may call.
    agent_key: str = ""
    #: A proxy of the user's (never provisioned: this server runs no fleet loop).
    proxy: str = ""

    @property
    def uid(self) -> str:
        """The ordinary user's id."""
        return self.user.id


Build = Callable[[Ctx], Message]


@dataclass(frozen=True)
class Bad:
    """One bad request: ``Service.Method``, how to build it, the field it must name, and
    who calls (``user``, ``admin`` (super admin), ``agent`` (the user's agent key) or
    ``anon``)."""

    method: str
    build: Build
    field: str
    caller: str = "user"


def rows(method: str, caller: str = "user", **cases: tuple[str, Build]) -> list[Any]:
    """Parametrize rows for ``method``: ``id=(field, build)``."""
    return [
        pytest.param(Bad(method, build, field, caller), id=f"{method}-{case_id}")
        for case_id, (field, build) in cases.items()
    ]


# --- request builders -------------------------------------------------------------------


def register(password: str = PASSWORD, display_name: str = "") -> Build:
    """A Register request with a fresh valid email."""
    return lambda c: auth_pb2.RegisterRequest(
        email=unique_email("bad"), password=password, display_name=display_name
    )


def register_email(email: str) -> Build:
    """A Register request with exactly this (bad) email."""
    return lambda c: auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name="X")


def ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    """A raw Timestamp, range unchecked."""
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def dur(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    """A raw Duration, range unchecked."""
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def new_key(
    display_name: str = "key",
    scopes: tuple[str, ...] = (),
    expire: timestamp_pb2.Timestamp | None = None,
    parent: str = "users/me",
) -> Build:
    """A CreateApiKey request."""

    def build(c: Ctx) -> Message:
        key = auth_pb2.ApiKey(display_name=display_name, scopes=list(scopes))
        if expire is not None:
            key.expire_time.CopyFrom(expire)
        return auth_pb2.CreateApiKeyRequest(parent=parent.format(uid=c.uid), api_key=key)

    return build


def bound_key(scopes: tuple[str, ...] = ("agent.connect",), tunnel: str = "") -> Build:
    """A CreateApiKey request for a key bound to a tunnel (the context's, by default)."""
    return lambda c: auth_pb2.CreateApiKeyRequest(
        parent="users/me",
        api_key=auth_pb2.ApiKey(
            display_name="agent", scopes=list(scopes), tunnel=tunnel or c.tunnel
        ),
    )


def rotate(name: str = "", overlap: duration_pb2.Duration | None = None) -> Build:
    """A RotateApiKey request; an empty name is the context's key."""

    def build(c: Ctx) -> Message:
        request = auth_pb2.RotateApiKeyRequest(name=name.format(uid=c.uid) or c.key_name)
        if overlap is not None:
            request.overlap.CopyFrom(overlap)
        return request

    return build


def past() -> timestamp_pb2.Timestamp:
    """An hour ago."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    return stamp


def named(message: type[Message], name: str, field: str = "name") -> Build:
    """``message(field=name)`` with ``{uid}``, ``{key}`` and ``{tunnel}`` filled in."""
    return lambda c: message(**{field: name.format(uid=c.uid, key=c.key_name, tunnel=c.tunnel)})


def tunnel(**fields: Any) -> Build:
    """A CreateTunnel request for the context's user with these tunnel fields."""
    fields.setdefault("display_name", "bad-input")
    return lambda c: tunnels_pb2.CreateTunnelRequest(
        parent="users/me", tunnel=tunnels_pb2.Tunnel(**fields)
    )


def access(web_access: int = 0, networks: tuple[str, ...] = (), **basic: str) -> Build:
    """A CreateTunnel request with this web access, these allowed networks and these
    ``basic_username``/``basic_password``."""
    config = P.TunnelConfig(web_access=web_access, allowed_networks=list(networks), **basic)
    return tunnel(config=config)


def patch_access(
    paths: tuple[str, ...], web_access: int = 0, networks: tuple[str, ...] = (), **basic: str
) -> Build:
    """An UpdateTunnel of the context's tunnel's web access, with these mask paths."""
    config = P.TunnelConfig(web_access=web_access, allowed_networks=list(networks), **basic)
    return lambda c: P.UpdateTunnelRequest(
        tunnel=P.Tunnel(name=c.tunnel, config=config),
        update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
    )


def check_access(client_ip: str) -> Build:
    """A CheckTunnelAccess of the context's tunnel from ``client_ip``."""
    return lambda c: proxies_pb2.CheckTunnelAccessRequest(
        tunnel_id=c.tunnel.rsplit("/", 1)[1], client_ip=client_ip
    )


def link_for(name: str) -> Build:
    """An AuthorizeAgentLink for ``name`` (``{uid}`` and ``{tunnel}`` filled in)."""
    return lambda c: proxies_pb2.AuthorizeAgentLinkRequest(
        tunnel=name.format(uid=c.uid, tunnel=c.tunnel)
    )


X = proxies_pb2


def start_proxy(**config: Any) -> Build:
    """A StartProxy with these config fields (``scaling`` a dict of the policy's)."""
    scaling = X.ProxyScalingPolicy(**config.pop("scaling", {}))
    return lambda c: X.StartProxyRequest(
        parent="users/me", proxy=X.Proxy(config=X.ProxyConfig(scaling=scaling, **config))
    )


def patch_proxy(paths: tuple[str, ...], **fields: Any) -> Build:
    """An UpdateProxy of the context's proxy with these fields and mask paths."""
    return lambda c: X.UpdateProxyRequest(
        proxy=X.Proxy(name=c.proxy, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
    )


def proxy_named(message: type[Message], name: str, field: str = "name", **more: Any) -> Build:
    """``message(field=name, **more)`` with ``{uid}`` and ``{proxy}`` filled in."""
    return lambda c: message(**{field: name.format(uid=c.uid, proxy=c.proxy)}, **more)


def endpoint(**fields: Any) -> Build:
    """A CreateTunnel request with one endpoint."""
    fields.setdefault("url", "http://127.0.0.1:8080/")
    return tunnel(endpoints=[tunnels_pb2.TunnelEndpoint(**fields)])


def on_tunnel(message: type[Message], suffix: str = "", **fields: Any) -> Build:
    """A request naming the context's tunnel (plus ``suffix``) in ``name``."""
    return lambda c: message(name=c.tunnel + suffix, **fields)


def under_tunnel(message: type[Message], **fields: Any) -> Build:
    """A request whose ``parent`` is the context's tunnel."""
    return lambda c: message(parent=c.tunnel, **fields)


def hook(**fields: Any) -> Build:
    """A CreateWebhook request for the context's user with these webhook fields."""
    fields.setdefault("url", "https://hooks.example.com/in")
    return lambda c: W.CreateWebhookRequest(parent=c.user.name, webhook=W.Webhook(**fields))


def on_hook(message: type[Message], suffix: str = "", field: str = "name", **fields: Any) -> Build:
    """A request naming the context's webhook (plus ``suffix``) in ``field``."""
    return lambda c: message(**{field: c.webhook + suffix}, **fields)


def patch_hook(paths: tuple[str, ...] = (), **fields: Any) -> Build:
    """An UpdateWebhook of the context's webhook."""
    return lambda c: W.UpdateWebhookRequest(
        webhook=W.Webhook(name=c.webhook, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
    )


def replay(**fields: Any) -> Build:
    """A ReplayWebhookEvents of the context's webhook."""
    return lambda c: W.ReplayWebhookEventsRequest(name=c.webhook, **fields)


def recent() -> timestamp_pb2.Timestamp:
    """An hour ago."""
    return ts(int(time.time()) - 3600)


def day(year: int, month: int, day_: int) -> date_pb2.Date:
    """A raw Date, range unchecked."""
    return date_pb2.Date(year=year, month=month, day=day_)


def usage(**fields: Any) -> Build:
    """A GetTunnelUsage request for the context's tunnel."""
    return on_tunnel(tunnels_pb2.GetTunnelUsageRequest, "/usage", **fields)


def share(**fields: Any) -> Build:
    """A CreateTunnelShare request on the context's tunnel (made by an admin: no tier gate)."""
    fields.setdefault("grantee", "users/me")
    fields.setdefault("role", common_pb2.SHARE_ROLE_READ)
    return under_tunnel(
        tunnels_pb2.CreateTunnelShareRequest, share=tunnels_pb2.TunnelShare(**fields)
    )


def link(**fields: Any) -> Build:
    """A CreateShareLink request on the context's tunnel."""
    fields.setdefault("role", common_pb2.SHARE_ROLE_READ)
    fields.setdefault("max_uses", 1)
    return under_tunnel(
        tunnels_pb2.CreateShareLinkRequest, share_link=tunnels_pb2.ShareLink(**fields)
    )


def update(*paths: str, name: str = "users/me", unset: bool = False, **fields: Any) -> Build:
    """An UpdateUser request; ``fields`` are User fields, ``preferences`` a dict."""

    def build(c: Ctx) -> Message:
        mask = field_mask_pb2.FieldMask(paths=paths)
        if unset:
            return users_pb2.UpdateUserRequest(update_mask=mask)
        values = dict(fields)
        if "preferences" in values:
            values["preferences"] = users_pb2.Preferences(**values["preferences"])
        user = users_pb2.User(name=name.format(uid=c.uid), **values)
        return users_pb2.UpdateUserRequest(user=user, update_mask=mask)

    return build


def avatar(content_type: str, data: bytes, name: str = "users/me/avatar") -> Build:
    """An UploadAvatar request."""
    return lambda c: users_pb2.UploadAvatarRequest(
        name=name.format(uid=c.uid),
        avatar=httpbody_pb2.HttpBody(content_type=content_type, data=data),
    )


def list_users(**fields: Any) -> Build:
    """A ListUsers request; a ``page_token`` of ``"<users>"`` is a real one from the context."""

    def build(c: Ctx) -> Message:
        values = dict(fields)
        if values.get("page_token") == "<users>":
            values["page_token"] = c.users_page_token
        return users_pb2.ListUsersRequest(**values)

    return build


def list_keys(**fields: Any) -> Build:
    """A ListApiKeys request of the user; ``"<keys>"`` is a real page token."""

    def build(c: Ctx) -> Message:
        values = {"parent": "users/me", **fields}
        if values.get("page_token") == "<keys>":
            values["page_token"] = c.keys_page_token
        return auth_pb2.ListApiKeysRequest(**values)

    return build


def activity(parent: str = "users/me", **fields: Any) -> Build:
    """A ListActivity request of the user."""
    return lambda c: users_pb2.ListActivityRequest(parent=parent.format(uid=c.uid), **fields)


def flip_last(token: str) -> str:
    """``token`` with one character changed (still base64url)."""
    return token[:-3] + ("B" if token[-3] != "B" else "C") + token[-2:]


# --- the table ----------------------------------------------------------------------------

A = "AuthService"
U = "UserService"
AD = "AdminService"
AU = "AuditService"
T = "TunnelService"
EV = "EventService"
WH = "WebhookService"
OP = "OperationService"
W = webhooks_pb2
AG = "AgentService"
PX = "ProxyService"
P = tunnels_pb2
ALLOWLIST, PUBLIC, BASIC = P.WEB_ACCESS_IP_ALLOWLIST, P.WEB_ACCESS_PUBLIC, P.WEB_ACCESS_BASIC
NETWORKS = "tunnel.config.allowed_networks"
USERNAME, BASIC_PASSWORD = "tunnel.config.basic_username", "tunnel.config.basic_password"
GOOD_BASIC = {"basic_username": "ann", "basic_password": "correct horse"}
PAST, FAR = ts(1_000_000_000), ts(4_000_000_000)
NEST = "(" * 10 + 'email : "a"' + ")" * 10
MANY_TERMS = " AND ".join(['email : "a"'] * 31)

BAD_REQUESTS = [
    *rows(
        f"{A}.Register",
        "anon",
        empty_email=("email", register_email("")),
        no_at=("email", register_email("nobody.example.com")),
        no_dot=("email", register_email("a@localhost")),
        double_dot=("email", register_email("a..b@example.com")),
        dash_label=("email", register_email("a@-example.com")),
        numeric_tld=("email", register_email("a@example.123")),
        non_ascii=("email", register_email("ünï@example.com")),
        nul=("email", register_email("a\x00b@example.com")),
        newline=("email", register_email("victim@example.com\n")),
        space=("email", register_email("a b@example.com")),
        markup=("email", register_email("<script>@example.com")),
        too_long=("email", register_email("x" * 243 + "@example.com")),
        empty_password=("password", register(password="")),
        short_password=("password", register(password="short")),
        long_password=("password", register(password="p4ssw0rd" * 17)),
        nul_password=("password", register(password="correct horse\x00battery")),
        repetitive_password=("password", register(password="aaaaaaaaaaaaaaaa")),
        password_is_email=(
            "password",
            lambda c: auth_pb2.RegisterRequest(
                email="same-as-pw@example.com", password="Same-As-PW@example.com"
            ),
        ),
        markup_name=("display_name", register(display_name="<b>bold</b>")),
        nul_name=("display_name", register(display_name="a\x00b")),
        bidi_name=("display_name", register(display_name="user\u202egnp.exe")),
        zero_width_name=("display_name", register(display_name="ad\u200bmin")),
        newline_name=("display_name", register(display_name="line\nbreak")),
        blank_name=("display_name", register(display_name="   ")),
        long_name=("display_name", register(display_name="x" * 101)),
    ),
    *rows(
        f"{A}.Login",
        "anon",
        empty_email=("email", lambda c: auth_pb2.LoginRequest(password=PASSWORD)),
        empty_password=("password", lambda c: auth_pb2.LoginRequest(email=c.user.email)),
        long_email=("email", lambda c: auth_pb2.LoginRequest(email="x" * 255, password="p")),
        long_password=(
            "password",
            lambda c: auth_pb2.LoginRequest(email=c.user.email, password="x" * 513),
        ),
        nul_email=(
            "email",
            lambda c: auth_pb2.LoginRequest(email=c.user.email + "\x00", password=PASSWORD),
        ),
        # Valid credentials: refused before a session is made.
        undefined_delivery=(
            "refresh_token_delivery",
            lambda c: auth_pb2.LoginRequest(
                email=c.user.email, password=PASSWORD, refresh_token_delivery=99
            ),
        ),
    ),
    *rows(
        f"{A}.CreateApiKey",
        tunnel_on_a_full_key=("api_key.tunnel", bound_key(scopes=())),
        tunnel_malformed=("api_key.tunnel", bound_key(tunnel="tunnels/x")),
        tunnel_not_owned=(
            "api_key.tunnel",
            bound_key(
                tunnel="users/usr_01jd3k0000000000000000000a/tunnels/tun_01jd3k0000000000000000000a"
            ),
        ),
        agent_scope_and_more=(
            "api_key.scopes",
            bound_key(scopes=("agent.connect", "profile.read")),
        ),
        empty_parent=("parent", new_key(parent="")),
        short_parent=("parent", new_key(parent="users/")),
        parent_extra=("parent", new_key(parent="users/me/extra")),
        parent_tiers=("parent", new_key(parent="tiers")),
        empty_name=("api_key.display_name", new_key(display_name="")),
        long_name=("api_key.display_name", new_key(display_name="k" * 101)),
        markup_name=("api_key.display_name", new_key(display_name="<img src=x onerror=1>")),
        bell_name=("api_key.display_name", new_key(display_name="ding\x07")),
        ungranted_scope=("api_key.scopes[0]", new_key(scopes=("users.admin",))),
        unknown_scope=("api_key.scopes[1]", new_key(scopes=("profile.read", "root"))),
        nul_scope=("api_key.scopes[0]", new_key(scopes=("profile.read\x00",))),
        too_many_scopes=("api_key.scopes", new_key(scopes=("profile.read",) * 51)),
        expired=("api_key.expire_time", new_key(expire=past())),
        nanos_over=("api_key.expire_time", new_key(expire=ts(4_000_000_000, 1_000_000_000))),
        nanos_negative=("api_key.expire_time", new_key(expire=ts(4_000_000_000, -1))),
        year_10000=("api_key.expire_time", new_key(expire=ts(253_402_300_800))),
        before_year_1=("api_key.expire_time", new_key(expire=ts(-62_135_596_801))),
    ),
    *rows(
        f"{A}.CreateApiKey",
        "admin",
        dot_dot_parent=("parent", new_key(parent="users/../x")),
    ),
    *rows(
        f"{A}.ListApiKeys",
        empty_parent=("parent", list_keys(parent="")),
        parent_slashes=("parent", list_keys(parent="users//")),
        parent_collection=("parent", list_keys(parent="users/me/apiKeys")),
        negative_size=("page_size", list_keys(page_size=-1)),
        min_int_size=("page_size", list_keys(page_size=-(2**31))),
        garbage_token=("page_token", list_keys(page_token="garbage")),
        non_ascii_token=("page_token", list_keys(page_token="tökén")),
        other_query_token=("page_token", list_keys(page_token="<keys>", show_inactive=True)),
        tampered_token=(
            "page_token",
            lambda c: auth_pb2.ListApiKeysRequest(
                parent="users/me", page_token=flip_last(c.keys_page_token)
            ),
        ),
    ),
    *rows(
        f"{A}.GetApiKey",
        empty=("name", named(auth_pb2.GetApiKeyRequest, "")),
        collection=("name", named(auth_pb2.GetApiKeyRequest, "users/me/apiKeys")),
        empty_key=("name", named(auth_pb2.GetApiKeyRequest, "users/me/apiKeys/")),
        wrong_collection=("name", named(auth_pb2.GetApiKeyRequest, "users/me/keys/x")),
        extra=("name", named(auth_pb2.GetApiKeyRequest, "{key}/extra")),
        dot_dot_key=("name", named(auth_pb2.GetApiKeyRequest, "users/me/apiKeys/../x")),
    ),
    *rows(
        f"{A}.GetApiKey",
        "admin",
        dot_dot_user=("name", named(auth_pb2.GetApiKeyRequest, "users/../apiKeys/x")),
    ),
    *rows(
        f"{A}.RotateApiKey",
        eight_days=("overlap", rotate(overlap=dur(8 * DAY))),
        negative=("overlap", rotate(overlap=dur(-1))),
        nanos_over=("overlap", rotate(overlap=dur(60, 1_000_000_000))),
        mixed_signs=("overlap", rotate(overlap=dur(1, -1))),
        huge=("overlap", rotate(overlap=dur(2**62))),
        huge_negative=("overlap", rotate(overlap=dur(-(2**62)))),
        empty_name=("name", named(auth_pb2.RotateApiKeyRequest, "")),
        collection=("name", named(auth_pb2.RotateApiKeyRequest, "users/me/apiKeys")),
    ),
    *rows(
        f"{A}.RevokeApiKey",
        empty=("name", named(auth_pb2.RevokeApiKeyRequest, "")),
        user_only=("name", named(auth_pb2.RevokeApiKeyRequest, "users/me")),
        extra=("name", named(auth_pb2.RevokeApiKeyRequest, "{key}/x")),
        nul=("name", named(auth_pb2.RevokeApiKeyRequest, "users/me/apiKeys/\x00/x")),
    ),
    *rows(
        f"{U}.GetUser",
        empty=("name", named(users_pb2.GetUserRequest, "")),
        no_id=("name", named(users_pb2.GetUserRequest, "users/")),
        me_slash=("name", named(users_pb2.GetUserRequest, "users/me/")),
        extra=("name", named(users_pb2.GetUserRequest, "users/{uid}/extra")),
        collection=("name", named(users_pb2.GetUserRequest, "users")),
        tiers=("name", named(users_pb2.GetUserRequest, "tiers")),
        leading_slash=("name", named(users_pb2.GetUserRequest, "/users/me")),
    ),
    *rows(
        f"{U}.GetUser",
        "admin",
        dot_dot=("name", named(users_pb2.GetUserRequest, "users/../x")),
        other_extra=("name", named(users_pb2.GetUserRequest, "users/usr_x/extra")),
        not_an_id=("name", named(users_pb2.GetUserRequest, "users/not-an-id")),
        upper_case=("name", lambda c: users_pb2.GetUserRequest(name=f"users/{c.uid.upper()}")),
        newline=("name", named(users_pb2.GetUserRequest, "users/{uid}\n")),
        nul=("name", named(users_pb2.GetUserRequest, "users/me\x00")),
        huge=("name", named(users_pb2.GetUserRequest, "users/" + "x" * 20_000)),
    ),
    *rows(
        f"{U}.ListUsers",
        "admin",
        negative_size=("page_size", list_users(page_size=-1)),
        min_int_size=("page_size", list_users(page_size=-(2**31))),
        garbage_token=("page_token", list_users(page_token="garbage!")),
        non_ascii_token=("page_token", list_users(page_token="tökén")),
        other_filter_token=("page_token", list_users(page_token="<users>", filter='tier = "free"')),
        tampered_token=(
            "page_token",
            lambda c: users_pb2.ListUsersRequest(
                filter='email : "@"', page_token=flip_last(c.users_page_token)
            ),
        ),
        no_operator=("filter", list_users(filter="email")),
        no_value=("filter", list_users(filter="email =")),
        unknown_field=("filter", list_users(filter='password_hash = "x"')),
        unknown_enum=("filter", list_users(filter='tier = "platinum"')),
        enum_ordering=("filter", list_users(filter='tier > "free"')),
        bad_time=("filter", list_users(filter='create_time > "yesterday"')),
        naive_time=("filter", list_users(filter='create_time > "2024-01-01T00:00:00"')),
        time_before_year_1=(
            "filter",
            list_users(filter='create_time > "0001-01-01T00:00:00+01:00"'),
        ),
        time_after_year_9999=(
            "filter",
            list_users(filter='create_time < "9999-12-31T23:59:59-01:00"'),
        ),
        too_deep=("filter", list_users(filter=NEST)),
        dangling_and=("filter", list_users(filter='email : "a" AND')),
        value_first=("filter", list_users(filter='"x" = email')),
        long_value=("filter", list_users(filter='email : "' + "a" * 300 + '"')),
        too_long=("filter", list_users(filter="x" * 2001)),
        too_many_terms=("filter", list_users(filter=MANY_TERMS)),
        nul_value=("filter", list_users(filter='email : "a\x00b"')),
        statement=("filter", list_users(filter='email : "a"; DROP TABLE users')),
        tautology=("filter", list_users(filter='email = "a" OR 1=1')),
        comment=("filter", list_users(filter='email = "a" -- x')),
        unclosed=("filter", list_users(filter='email = "a')),
        order_unknown=("order_by", list_users(order_by="password_hash")),
        order_direction=("order_by", list_users(order_by="email sideways")),
        order_twice=("order_by", list_users(order_by="email, email")),
        order_words=("order_by", list_users(order_by="email desc desc")),
        order_empty_part=("order_by", list_users(order_by="email,")),
        order_statement=("order_by", list_users(order_by="email; DROP TABLE users")),
    ),
    *rows(
        f"{U}.UpdateUser",
        no_user=("user.name", update("display_name", unset=True)),
        no_id=("user.name", update("display_name", name="users/", display_name="X")),
        extra=("user.name", update("display_name", name="users/{uid}/extra", display_name="X")),
        mask_email=("update_mask", update("email", email="new@example.com")),
        mask_role=("update_mask", update("role", role=common_pb2.ROLE_SUPER_ADMIN)),
        mask_tier=("update_mask", update("tier", tier=common_pb2.TIER_ENTERPRISE)),
        mask_mixed=("update_mask", update("display_name", "state", display_name="X")),
        mask_empty_path=("update_mask", update("", display_name="X")),
        mask_double_dot=("update_mask", update("preferences..theme")),
        mask_huge_path=("update_mask", update("p" * 20_000)),
        markup_name=(
            "user.display_name",
            update("display_name", display_name="<script>alert(1)</script>"),
        ),
        empty_name=("user.display_name", update("display_name", display_name="")),
        nul_name=("user.display_name", update("display_name", display_name="a\x00b")),
        long_name=("user.display_name", update("display_name", display_name="n" * 101)),
        bidi_name=("user.display_name", update("display_name", display_name="\u202eabc")),
        implied_markup=("user.display_name", update(display_name="<b>x</b>")),
        empty_language=(
            "user.preferences.language",
            update("preferences.language", preferences={"language": ""}),
        ),
        word_language=(
            "user.preferences.language",
            update("preferences.language", preferences={"language": "english"}),
        ),
        underscore_language=(
            "user.preferences.language",
            update("preferences.language", preferences={"language": "en_US"}),
        ),
        newline_language=(
            "user.preferences.language",
            update("preferences.language", preferences={"language": "en\n"}),
        ),
        long_language=(
            "user.preferences.language",
            update("preferences.language", preferences={"language": "en" + "-abcdefgh" * 4}),
        ),
        unknown_zone=(
            "user.preferences.time_zone",
            update("preferences.time_zone", preferences={"time_zone": "Mars/Olympus_Mons"}),
        ),
        path_zone=(
            "user.preferences.time_zone",
            update("preferences.time_zone", preferences={"time_zone": "../../etc/passwd"}),
        ),
        nul_zone=(
            "user.preferences.time_zone",
            update("preferences.time_zone", preferences={"time_zone": "Europe/Lisbon\x00"}),
        ),
        lower_zone=(
            "user.preferences.time_zone",
            update("preferences.time_zone", preferences={"time_zone": "europe/lisbon"}),
        ),
        undefined_theme=(
            "user.preferences.theme",
            update("preferences.theme", preferences={"theme": 99}),
        ),
        negative_theme=(
            "user.preferences.theme",
            update("preferences.theme", preferences={"theme": -1}),
        ),
    ),
    *rows(
        f"{U}.UpdateUser",
        "admin",
        dot_dot=("user.name", update("display_name", name="users/../x", display_name="X")),
    ),
    *rows(
        f"{U}.DeleteUser",
        empty=("name", named(users_pb2.DeleteUserRequest, "")),
        no_id=("name", named(users_pb2.DeleteUserRequest, "users/")),
        extra=("name", named(users_pb2.DeleteUserRequest, "users/{uid}/x")),
    ),
    *rows(
        f"{U}.DeleteUser",
        "admin",
        dot_dot=("name", named(users_pb2.DeleteUserRequest, "users/../x")),
    ),
    *rows(
        f"{U}.UndeleteUser",
        "admin",
        empty=("name", named(users_pb2.UndeleteUserRequest, "")),
        no_id=("name", named(users_pb2.UndeleteUserRequest, "users/")),
        dot_dot=("name", named(users_pb2.UndeleteUserRequest, "users/../x")),
        avatar=("name", named(users_pb2.UndeleteUserRequest, "users/{uid}/avatar")),
        tier=("name", named(users_pb2.UndeleteUserRequest, "tiers/free")),
    ),
    *rows(
        f"{U}.SetUserRole",
        "admin",
        unspecified=("role", lambda c: users_pb2.SetUserRoleRequest(name=c.user.name)),
        undefined=("role", lambda c: users_pb2.SetUserRoleRequest(name=c.user.name, role=99)),
        negative=("role", lambda c: users_pb2.SetUserRoleRequest(name=c.user.name, role=-5)),
        empty_name=("name", lambda c: users_pb2.SetUserRoleRequest(role=common_pb2.ROLE_USER)),
        no_reason=(
            "reason",
            lambda c: users_pb2.SetUserRoleRequest(name=c.user.name, role=common_pb2.ROLE_USER),
        ),
        long_reason=(
            "reason",
            lambda c: users_pb2.SetUserRoleRequest(
                name=c.user.name, role=common_pb2.ROLE_USER, reason="y" * 501
            ),
        ),
        extra=(
            "name",
            lambda c: users_pb2.SetUserRoleRequest(
                name=c.user.name + "/x", role=common_pb2.ROLE_USER
            ),
        ),
    ),
    *rows(
        f"{U}.SuspendUser",
        "admin",
        no_reason=("reason", lambda c: users_pb2.SuspendUserRequest(name=c.user.name)),
        blank_reason=(
            "reason",
            lambda c: users_pb2.SuspendUserRequest(name=c.user.name, reason="  \t "),
        ),
        long_reason=(
            "reason",
            lambda c: users_pb2.SuspendUserRequest(name=c.user.name, reason="x" * 501),
        ),
        control_reason=(
            "reason",
            lambda c: users_pb2.SuspendUserRequest(name=c.user.name, reason="a\x00b"),
        ),
        empty_name=("name", lambda c: users_pb2.SuspendUserRequest(reason="why")),
        extra=(
            "name",
            lambda c: users_pb2.SuspendUserRequest(name=c.user.name + "/x", reason="why"),
        ),
    ),
    *rows(
        f"{U}.ReactivateUser",
        "admin",
        no_reason=("reason", lambda c: users_pb2.ReactivateUserRequest(name=c.user.name)),
        long_reason=(
            "reason",
            lambda c: users_pb2.ReactivateUserRequest(name=c.user.name, reason="x" * 501),
        ),
        dot_dot=("name", lambda c: users_pb2.ReactivateUserRequest(name="users/../x", reason="y")),
    ),
    *rows(
        f"{U}.GetTier",
        "anon",
        empty=("name", named(users_pb2.GetTierRequest, "")),
        bogus=("name", named(users_pb2.GetTierRequest, "bogus")),
        collection=("name", named(users_pb2.GetTierRequest, "tiers")),
        no_id=("name", named(users_pb2.GetTierRequest, "tiers/")),
        extra=("name", named(users_pb2.GetTierRequest, "tiers/free/extra")),
        leading_slash=("name", named(users_pb2.GetTierRequest, "/tiers/free")),
    ),
    *rows(
        f"{U}.ChangeTier",
        unspecified=("tier", lambda c: users_pb2.ChangeTierRequest(name="users/me")),
        undefined=("tier", lambda c: users_pb2.ChangeTierRequest(name="users/me", tier=99)),
        empty_name=("name", lambda c: users_pb2.ChangeTierRequest(tier=common_pb2.TIER_PREMIUM)),
        extra=(
            "name",
            lambda c: users_pb2.ChangeTierRequest(
                name="users/me/tier", tier=common_pb2.TIER_PREMIUM
            ),
        ),
        long_reason=(
            "reason",
            lambda c: users_pb2.ChangeTierRequest(
                name="users/me", tier=common_pb2.TIER_PREMIUM, reason="z" * 501
            ),
        ),
    ),
    *rows(
        f"{U}.ChangeTier",
        "admin",
        no_reason=(
            "reason",
            lambda c: users_pb2.ChangeTierRequest(name=c.user.name, tier=common_pb2.TIER_PREMIUM),
        ),
    ),
    *rows(
        f"{U}.ListActivity",
        empty_parent=("parent", activity(parent="")),
        no_id=("parent", activity(parent="users/")),
        collection=("parent", activity(parent="users/{uid}/activity")),
        negative_size=("page_size", activity(page_size=-1)),
        garbage_token=("page_token", activity(page_token="garbage")),
        unknown_field=("filter", activity(filter='actor = "x"')),
        no_operator=("filter", activity(filter="outcome")),
        bad_time=("filter", activity(filter='create_time < "soon"')),
        nul_value=("filter", activity(filter='outcome = "OK\x00"')),
        order_words=("filter", activity(filter="ORDER BY time")),
    ),
    *rows(
        f"{U}.UploadAvatar",
        user_name=("name", avatar("image/png", PNG, name="users/me")),
        extra=("name", avatar("image/png", PNG, name="users/me/avatar/x")),
        other_collection=("name", avatar("image/png", PNG, name="users/me/photo")),
        empty_name=("name", avatar("image/png", PNG, name="")),
        no_body=(
            "avatar.content_type",
            lambda c: users_pb2.UploadAvatarRequest(name="users/me/avatar"),
        ),
        html=("avatar.content_type", avatar("text/html", b"<script>alert(1)</script>")),
        svg=("avatar.content_type", avatar("image/svg+xml", b"<svg/>")),
        nul_type=("avatar.content_type", avatar("image/png\x00", PNG)),
        empty_data=("avatar.data", avatar("image/png", b"")),
        wrong_magic=("avatar.data", avatar("image/png", b"\xff\xd8\xff\xe0" + b"\x00" * 32)),
        riff_not_webp=("avatar.data", avatar("image/webp", b"RIFF\x00\x00\x00\x00WAVEfmt ")),
        too_large=("avatar.data", avatar("image/png", PNG + b"\x00" * (1 << 20))),
    ),
    *rows(
        f"{U}.GetAvatar",
        user_name=("name", named(users_pb2.GetAvatarRequest, "users/me")),
        extra=("name", named(users_pb2.GetAvatarRequest, "users/me/avatar/x")),
        plural=("name", named(users_pb2.GetAvatarRequest, "users/me/avatars")),
        empty=("name", named(users_pb2.GetAvatarRequest, "")),
    ),
    *rows(
        f"{U}.DeleteAvatar",
        user_name=("name", named(users_pb2.DeleteAvatarRequest, "users/me")),
        extra=("name", named(users_pb2.DeleteAvatarRequest, "users/me/avatar/x")),
        empty=("name", named(users_pb2.DeleteAvatarRequest, "")),
    ),
    *rows(
        f"{U}.GetUsage",
        user_name=("name", named(users_pb2.GetUsageRequest, "users/me")),
        wrong_leaf=("name", named(users_pb2.GetUsageRequest, "users/me/usages")),
        empty=("name", named(users_pb2.GetUsageRequest, "")),
    ),
    *rows(
        f"{AU}.VerifyAuditLog",
        "admin",
        not_a_day=("start_day", lambda c: audit_pb2.VerifyAuditLogRequest(start_day="yesterday")),
        bad_month=("end_day", lambda c: audit_pb2.VerifyAuditLogRequest(end_day="2026-13-01")),
        long_form=(
            "start_day",
            lambda c: audit_pb2.VerifyAuditLogRequest(start_day="2026-12-01T00:00:00Z"),
        ),
        backwards=(
            "start_day",
            lambda c: audit_pb2.VerifyAuditLogRequest(start_day="2026-12-05", end_day="2026-12-01"),
        ),
        too_long=(
            "start_day",
            lambda c: audit_pb2.VerifyAuditLogRequest(start_day="2020-01-01", end_day="2026-12-01"),
        ),
        nul=("end_day", lambda c: audit_pb2.VerifyAuditLogRequest(end_day="2026-12-0\x00")),
    ),
    *rows(
        f"{U}.ExportActivity",
        "admin",
        empty=("filter", lambda c: users_pb2.ExportActivityRequest(parent=c.user.name)),
        unbounded=(
            "filter",
            lambda c: users_pb2.ExportActivityRequest(
                parent=c.user.name, filter='action = "auth.login"'
            ),
        ),
        unknown_field=(
            "filter",
            lambda c: users_pb2.ExportActivityRequest(parent=c.user.name, filter='actor = "x"'),
        ),
        no_parent=(
            "parent",
            lambda c: users_pb2.ExportActivityRequest(
                filter='create_time > "2026-01-01T00:00:00Z"'
            ),
        ),
    ),
    *rows(
        f"{AU}.ListAuditEntries",
        "admin",
        negative_size=("page_size", lambda c: audit_pb2.ListAuditEntriesRequest(page_size=-1)),
        bad_token=("page_token", lambda c: audit_pb2.ListAuditEntriesRequest(page_token="nope")),
        unknown_field=(
            "filter",
            lambda c: audit_pb2.ListAuditEntriesRequest(filter='details = "x"'),
        ),
        bad_time=(
            "filter",
            lambda c: audit_pb2.ListAuditEntriesRequest(filter='create_time > "x"'),
        ),
        injection=(
            "filter",
            lambda c: audit_pb2.ListAuditEntriesRequest(filter="actor = '; DROP TABLE audit_log"),
        ),
    ),
    *rows(
        f"{AU}.ExportAuditEntries",
        "admin",
        empty=("filter", lambda c: audit_pb2.ExportAuditEntriesRequest()),
        unbounded=(
            "filter",
            lambda c: audit_pb2.ExportAuditEntriesRequest(filter='action = "auth.login"'),
        ),
        garbage=("filter", lambda c: audit_pb2.ExportAuditEntriesRequest(filter="((")),
    ),
    *rows(
        f"{AD}.ListRateLimitViolations",
        "admin",
        negative_size=(
            "page_size",
            lambda c: admin_pb2.ListRateLimitViolationsRequest(page_size=-1),
        ),
        bad_token=(
            "page_token",
            lambda c: admin_pb2.ListRateLimitViolationsRequest(page_token="nope"),
        ),
        bad_filter=(
            "filter",
            lambda c: admin_pb2.ListRateLimitViolationsRequest(filter="count > 1"),
        ),
        injection=(
            "filter",
            lambda c: admin_pb2.ListRateLimitViolationsRequest(filter="subject = '; DROP"),
        ),
    ),
    *rows(
        f"{AD}.SummarizeRateLimitViolations",
        "admin",
        zero_window=(
            "window",
            lambda c: admin_pb2.SummarizeRateLimitViolationsRequest(window=dur(0)),
        ),
        negative=(
            "window",
            lambda c: admin_pb2.SummarizeRateLimitViolationsRequest(window=dur(-5)),
        ),
        too_long=(
            "window",
            lambda c: admin_pb2.SummarizeRateLimitViolationsRequest(window=dur(31 * 86400)),
        ),
        malformed=(
            "window",
            lambda c: admin_pb2.SummarizeRateLimitViolationsRequest(window=dur(1, -5)),
        ),
        top_negative=("top", lambda c: admin_pb2.SummarizeRateLimitViolationsRequest(top=-1)),
        top_huge=("top", lambda c: admin_pb2.SummarizeRateLimitViolationsRequest(top=101)),
    ),
    *rows(
        f"{AD}.ListIpBlocks",
        "admin",
        negative_size=("page_size", lambda c: admin_pb2.ListIpBlocksRequest(page_size=-1)),
        bad_token=("page_token", lambda c: admin_pb2.ListIpBlocksRequest(page_token="x")),
    ),
    *rows(
        f"{AD}.DeleteIpBlock",
        "admin",
        not_an_address=("name", named(admin_pb2.DeleteIpBlockRequest, "ipBlocks/nope")),
        wrong_collection=("name", named(admin_pb2.DeleteIpBlockRequest, "users/10.0.0.1")),
        empty=("name", named(admin_pb2.DeleteIpBlockRequest, "")),
        extra=("name", named(admin_pb2.DeleteIpBlockRequest, "ipBlocks/10.0.0.1/x")),
    ),
    *rows(
        f"{AD}.RerunOperation",
        "admin",
        empty=("name", named(admin_pb2.RerunOperationRequest, "")),
        wrong_collection=("name", named(admin_pb2.RerunOperationRequest, "users/me/tunnels/t")),
        long_reason=(
            "reason",
            lambda c: admin_pb2.RerunOperationRequest(
                name="users/me/operations/op_x", reason="r" * 501
            ),
        ),
    ),
    *rows(
        f"{AD}.ReleaseOperationLease",
        "admin",
        empty=("name", named(admin_pb2.ReleaseOperationLeaseRequest, "")),
        nested=("name", named(admin_pb2.ReleaseOperationLeaseRequest, "users/me/operations/a/b")),
    ),
    *rows(
        f"{AD}.ResetAgentSessions",
        "admin",
        empty=("name", named(admin_pb2.ResetAgentSessionsRequest, "")),
        wrong_collection=("name", named(admin_pb2.ResetAgentSessionsRequest, "users/me/hooks/x")),
        long_reason=(
            "reason",
            lambda c: admin_pb2.ResetAgentSessionsRequest(
                name="users/me/tunnels/tnl_x", reason="r" * 501
            ),
        ),
    ),
    *rows(
        f"{AD}.SummarizeErrors",
        "admin",
        short_window=(
            "window",
            lambda c: admin_pb2.SummarizeErrorsRequest(window=duration_pb2.Duration(seconds=59)),
        ),
        long_window=(
            "window",
            lambda c: admin_pb2.SummarizeErrorsRequest(
                window=duration_pb2.Duration(seconds=8 * 86400)
            ),
        ),
        negative_window=(
            "window",
            lambda c: admin_pb2.SummarizeErrorsRequest(window=duration_pb2.Duration(seconds=-60)),
        ),
        top_too_big=("top", lambda c: admin_pb2.SummarizeErrorsRequest(top=101)),
        top_negative=("top", lambda c: admin_pb2.SummarizeErrorsRequest(top=-1)),
    ),
    *rows(
        f"{AD}.ResetCircuitBreaker",
        "admin",
        empty=("name", named(admin_pb2.ResetCircuitBreakerRequest, "")),
        wrong_collection=("name", named(admin_pb2.ResetCircuitBreakerRequest, "breakers/otlp")),
        nested=("name", named(admin_pb2.ResetCircuitBreakerRequest, "circuitBreakers/a/b")),
        custom_verb=("name", named(admin_pb2.ResetCircuitBreakerRequest, "circuitBreakers/a:b")),
        upper_kind=("name", named(admin_pb2.ResetCircuitBreakerRequest, "circuitBreakers/Web")),
        long_target=(
            "name",
            named(admin_pb2.ResetCircuitBreakerRequest, "circuitBreakers/webhook." + "w" * 201),
        ),
        long_reason=(
            "reason",
            lambda c: admin_pb2.ResetCircuitBreakerRequest(
                name="circuitBreakers/webhook.whk_x", reason="r" * 501
            ),
        ),
    ),
    *rows(
        f"{T}.CreateTunnel",
        bad_parent=("parent", lambda c: P.CreateTunnelRequest(parent="tunnels/x")),
        no_name=("tunnel.display_name", tunnel(display_name="  ")),
        long_name=("tunnel.display_name", tunnel(display_name="n" * 256)),
        control=("tunnel.display_name", tunnel(display_name="a\x00b")),
        markup=("tunnel.display_name", tunnel(display_name="<script>")),
        long_description=("tunnel.description", tunnel(description="d" * 1001)),
        negative_connections=(
            "tunnel.config.max_connections",
            tunnel(config=P.TunnelConfig(max_connections=-1)),
        ),
        over_tier=(
            "tunnel.config.max_connections",
            tunnel(config=P.TunnelConfig(max_connections=10_000)),
        ),
        short_timeout=(
            "tunnel.config.idle_timeout",
            tunnel(config=P.TunnelConfig(idle_timeout=dur(0, 5))),
        ),
        malformed_timeout=(
            "tunnel.config.idle_timeout",
            tunnel(config=P.TunnelConfig(idle_timeout=dur(1, -5))),
        ),
        scheme=("tunnel.endpoints[0].url", endpoint(url="file:///etc/passwd")),
        no_host=("tunnel.endpoints[0].url", endpoint(url="http://:80/")),
        credentials=("tunnel.endpoints[0].url", endpoint(url="http://u:p@host:80/")),
        tcp_without_port=("tunnel.endpoints[0].url", endpoint(url="tcp://host")),
        priority=("tunnel.endpoints[0].priority", endpoint(priority=101)),
        weight=("tunnel.endpoints[0].weight", endpoint(weight=1001)),
        negative_weight=("tunnel.endpoints[0].weight", endpoint(weight=-1)),
        undefined_web_access=("tunnel.config.web_access", access(web_access=99)),
        negative_web_access=("tunnel.config.web_access", access(web_access=-1)),
        networks_when_private=(NETWORKS, access(networks=("10.0.0.0/8",))),
        networks_when_public=(NETWORKS, access(PUBLIC, ("10.0.0.0/8",))),
        allowlist_without_networks=(NETWORKS, access(ALLOWLIST)),
        allowlist_of_51=(NETWORKS, access(ALLOWLIST, tuple(f"10.0.{i}.0/24" for i in range(51)))),
        network_prefix_over=(f"{NETWORKS}[1]", access(ALLOWLIST, ("10.0.0.0/8", "10.0.0.0/33"))),
        network_word=(f"{NETWORKS}[0]", access(ALLOWLIST, ("localhost",))),
        network_empty=(f"{NETWORKS}[0]", access(ALLOWLIST, ("",))),
        basic_without_username=(USERNAME, access(BASIC, basic_password="correct horse")),
        basic_without_password=(BASIC_PASSWORD, access(BASIC, basic_username="ann")),
        basic_username_colon=(USERNAME, access(BASIC, **{**GOOD_BASIC, "basic_username": "a:b"})),
        basic_username_65=(USERNAME, access(BASIC, **{**GOOD_BASIC, "basic_username": "a" * 65})),
        basic_username_newline=(
            USERNAME,
            access(BASIC, **{**GOOD_BASIC, "basic_username": "ann\r\nSet-Cookie"}),
        ),
        basic_username_nul=(USERNAME, access(BASIC, **{**GOOD_BASIC, "basic_username": "a\x00"})),
        basic_password_short=(
            BASIC_PASSWORD,
            access(BASIC, **{**GOOD_BASIC, "basic_password": "short"}),
        ),
        basic_password_129=(
            BASIC_PASSWORD,
            access(BASIC, **{**GOOD_BASIC, "basic_password": "ab" * 64 + "c"}),
        ),
        basic_password_control=(
            BASIC_PASSWORD,
            access(BASIC, **{**GOOD_BASIC, "basic_password": "correct\x00horse"}),
        ),
        basic_password_is_username=(
            BASIC_PASSWORD,
            access(BASIC, basic_username="correct horse", basic_password="correct horse"),
        ),
        username_when_public=(USERNAME, access(PUBLIC, basic_username="ann")),
        password_when_private=(BASIC_PASSWORD, access(basic_password="correct horse")),
        password_when_allowlist=(
            BASIC_PASSWORD,
            access(ALLOWLIST, ("10.0.0.0/8",), basic_password="correct horse"),
        ),
        network_spaced=(f"{NETWORKS}[0]", access(ALLOWLIST, (" 10.0.0.0/8",))),
        network_zone=(f"{NETWORKS}[0]", access(ALLOWLIST, ("fe80::1%eth0/64",))),
        network_nul=(f"{NETWORKS}[0]", access(ALLOWLIST, ("10.0.0.0/8\x00",))),
        network_huge=(f"{NETWORKS}[0]", access(ALLOWLIST, ("1" * 20_000,))),
        network_statement=(
            f"{NETWORKS}[0]",
            access(ALLOWLIST, ("10.0.0.0/8'; DROP TABLE tunnels; --",)),
        ),
        request_id=(
            "request_id",
            lambda c: P.CreateTunnelRequest(
                parent="users/me", tunnel=P.Tunnel(display_name="x"), request_id="r" * 65
            ),
        ),
    ),
    *rows(
        f"{T}.GetTunnel",
        wrong_collection=("name", named(P.GetTunnelRequest, "users/{uid}/things/tun_x")),
        bad_id=("name", named(P.GetTunnelRequest, "users/{uid}/tunnels/nope")),
        empty=("name", named(P.GetTunnelRequest, "")),
    ),
    *rows(
        f"{T}.ListTunnels",
        negative_size=(
            "page_size",
            lambda c: P.ListTunnelsRequest(parent="users/me", page_size=-1),
        ),
        bad_token=("page_token", lambda c: P.ListTunnelsRequest(parent="users/me", page_token="x")),
        bad_filter=("filter", lambda c: P.ListTunnelsRequest(parent="users/me", filter="state ==")),
        unknown_field=(
            "filter",
            lambda c: P.ListTunnelsRequest(parent="users/me", filter='owner = "x"'),
        ),
        bad_state=(
            "filter",
            lambda c: P.ListTunnelsRequest(parent="users/me", filter='state = "x"'),
        ),
        bad_order=("order_by", lambda c: P.ListTunnelsRequest(parent="users/me", order_by="etag")),
        bad_parent=("parent", lambda c: P.ListTunnelsRequest(parent="users/")),
    ),
    *rows(
        f"{T}.UpdateTunnel",
        bad_mask=(
            "update_mask",
            lambda c: P.UpdateTunnelRequest(
                tunnel=P.Tunnel(name=c.tunnel),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            ),
        ),
        bad_name=(
            "tunnel.name",
            lambda c: P.UpdateTunnelRequest(tunnel=P.Tunnel(name="users/me/tunnels/x")),
        ),
        empty_display_name=(
            "tunnel.display_name",
            lambda c: P.UpdateTunnelRequest(
                tunnel=P.Tunnel(name=c.tunnel, display_name=""),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
        ),
        bad_endpoint=(
            "tunnel.endpoints[0].url",
            lambda c: P.UpdateTunnelRequest(
                tunnel=P.Tunnel(name=c.tunnel, endpoints=[P.TunnelEndpoint(url="gopher://x")])
            ),
        ),
        undefined_web_access=(
            "tunnel.config.web_access",
            patch_access(("config.web_access",), web_access=7),
        ),
        networks_of_a_private_tunnel=(
            NETWORKS,
            patch_access(("config.allowed_networks",), networks=("10.0.0.0/8",)),
        ),
        allowlist_without_networks=(NETWORKS, patch_access(("config.web_access",), ALLOWLIST)),
        bad_network=(
            f"{NETWORKS}[0]",
            patch_access(
                ("config.web_access", "config.allowed_networks"), ALLOWLIST, ("10.0.0.0/8/8",)
            ),
        ),
        unmasked_bad_network=(
            f"{NETWORKS}[1]",
            patch_access((), ALLOWLIST, ("10.0.0.0/8", "10.0.0.300")),
        ),
        basic_without_password=(
            BASIC_PASSWORD,
            patch_access(
                ("config.web_access", "config.basic_username"), BASIC, basic_username="ann"
            ),
        ),
        basic_without_username=(
            USERNAME,
            patch_access(
                ("config.web_access", "config.basic_password"),
                BASIC,
                basic_password="correct horse",
            ),
        ),
        basic_bad_password=(
            BASIC_PASSWORD,
            patch_access((), BASIC, basic_username="ann", basic_password="aaaaaaaaaaaa"),
        ),
        password_of_a_private_tunnel=(
            BASIC_PASSWORD,
            patch_access(("config.basic_password",), basic_password="correct horse"),
        ),
        password_set_is_output_only=(
            "update_mask",
            lambda c: P.UpdateTunnelRequest(
                tunnel=P.Tunnel(name=c.tunnel),
                update_mask=field_mask_pb2.FieldMask(paths=["config.basic_password_set"]),
            ),
        ),
    ),
    *rows(f"{T}.DeleteTunnel", bad_name=("name", named(P.DeleteTunnelRequest, "tun_x"))),
    *rows(f"{T}.StartTunnel", bad_name=("name", named(P.StartTunnelRequest, "users/{uid}"))),
    *rows(f"{T}.StopTunnel", bad_name=("name", named(P.StopTunnelRequest, "users/{uid}/tunnels"))),
    *rows(
        f"{T}.FailoverTunnel",
        unknown_endpoint=(
            "endpoint",
            on_tunnel(P.FailoverTunnelRequest, endpoint="http://not-one-of-them:1/"),
        ),
        bad_name=("name", named(P.FailoverTunnelRequest, "users/{uid}/tunnels/x")),
    ),
    *rows(
        f"{T}.GetTunnelMetrics",
        no_suffix=("name", on_tunnel(P.GetTunnelMetricsRequest)),
        wrong_suffix=("name", on_tunnel(P.GetTunnelMetricsRequest, "/usage")),
    ),
    *rows(
        f"{T}.GetTunnelUsage",
        no_such_day=("start_date", usage(start_date=day(2026, 2, 30))),
        month=("end_date", usage(end_date=day(2026, 13, 1))),
        partial=("start_date", usage(start_date=day(2026, 0, 0))),
        reversed=("start_date", usage(start_date=day(2026, 5, 1), end_date=day(2026, 4, 1))),
        too_long=("end_date", usage(start_date=day(2020, 1, 1), end_date=day(2026, 1, 1))),
        no_suffix=("name", on_tunnel(P.GetTunnelUsageRequest)),
    ),
    *rows(
        f"{T}.GetUsageReport",
        no_suffix=("name", named(P.GetUsageReportRequest, "users/{uid}")),
        bad_day=(
            "end_date",
            lambda c: P.GetUsageReportRequest(name="users/me/usageReport", end_date=day(0, 1, 1)),
        ),
    ),
    *rows(
        f"{T}.SummarizeUsage",
        "admin",
        bad_day=("start_date", lambda c: P.SummarizeUsageRequest(start_date=day(2026, 4, 31))),
    ),
    *rows(
        f"{T}.CreateTunnelShare",
        "admin",
        no_role=("share.role", share(role=common_pb2.SHARE_ROLE_UNSPECIFIED)),
        unknown_role=("share.role", share(role=9)),
        bad_grantee=("share.grantee", share(grantee="people/1")),
        past=("share.expire_time", share(expire_time=PAST)),
        far=("share.expire_time", share(expire_time=FAR)),
        bad_parent=("parent", named(P.CreateTunnelShareRequest, "users/{uid}", "parent")),
    ),
    *rows(
        f"{T}.ListTunnelShares",
        negative_size=("page_size", under_tunnel(P.ListTunnelSharesRequest, page_size=-1)),
        bad_token=("page_token", under_tunnel(P.ListTunnelSharesRequest, page_token="x")),
    ),
    *rows(
        f"{T}.DeleteTunnelShare",
        not_a_user=("name", on_tunnel(P.DeleteTunnelShareRequest, "/shares/bob")),
        no_share=("name", on_tunnel(P.DeleteTunnelShareRequest)),
    ),
    *rows(
        f"{T}.CreateShareLink",
        "admin",
        no_uses=("share_link.max_uses", link(max_uses=0)),
        many_uses=("share_link.max_uses", link(max_uses=1001)),
        no_role=("share_link.role", link(role=0)),
        past=("share_link.expire_time", link(expire_time=PAST)),
        short_ttl=("share_link.share_ttl", link(share_ttl=dur(1))),
        malformed_ttl=("share_link.share_ttl", link(share_ttl=dur(1, -5))),
    ),
    *rows(
        f"{T}.ListShareLinks",
        negative_size=("page_size", under_tunnel(P.ListShareLinksRequest, page_size=-1)),
    ),
    *rows(
        f"{T}.DeleteShareLink",
        not_a_link=("name", on_tunnel(P.DeleteShareLinkRequest, "/shareLinks/key_x")),
    ),
    *rows(
        f"{T}.AcceptShareLink",
        not_a_token=("token", lambda c: P.AcceptShareLinkRequest(token="hello")),
        long=("token", lambda c: P.AcceptShareLinkRequest(token="tpl_" + "x" * 200)),
    ),
    *rows(
        f"{T}.ListSharedWithMe",
        negative_size=(
            "page_size",
            lambda c: P.ListSharedWithMeRequest(parent="users/me", page_size=-1),
        ),
        bad_parent=("parent", lambda c: P.ListSharedWithMeRequest(parent="me")),
    ),
    *rows(
        f"{T}.WatchTunnels",
        bad_name=("name", named(P.WatchTunnelsRequest, "users/{uid}/tunnels/nope")),
        wrong_collection=("name", named(P.WatchTunnelsRequest, "users/{uid}/shares/x")),
        bad_resume=(
            "resume_after",
            lambda c: P.WatchTunnelsRequest(name="users/me", resume_after="tun_nope"),
        ),
    ),
    *rows(
        f"{EV}.ListEvents",
        negative_size=(
            "page_size",
            lambda c: events_pb2.ListEventsRequest(parent="users/me", page_size=-1),
        ),
        bad_filter=(
            "filter",
            lambda c: events_pb2.ListEventsRequest(parent="users/me", filter="type ="),
        ),
        bad_token=(
            "page_token",
            lambda c: events_pb2.ListEventsRequest(parent="users/me", page_token="x"),
        ),
    ),
    *rows(
        f"{WH}.CreateWebhook",
        no_url=("webhook.url", hook(url="")),
        ftp=("webhook.url", hook(url="ftp://hooks.example.com/")),
        credentials=("webhook.url", hook(url="https://u:p@hooks.example.com/")),
        spaces=("webhook.url", hook(url="https://hooks.example.com/a b")),
        no_host=("webhook.url", hook(url="https:///path")),
        huge_url=("webhook.url", hook(url="https://h.example.com/" + "a" * 3000)),
        unknown_type=("webhook.event_types[0]", hook(event_types=["tunnel.exploded"])),
        bad_wildcard=("webhook.event_types[1]", hook(event_types=["user.created", "nope.*"])),
        bad_transform=("webhook.transform", hook(transform="data.[")),
        unknown_function=("webhook.transform", hook(transform="evil(data)")),
        rate=("webhook.rate_limit", hook(rate_limit=5000)),
        negative_rate=("webhook.rate_limit", hook(rate_limit=-1)),
        host_header=("webhook.headers['Host']", hook(headers={"Host": "x"})),
        signature_header=(
            "webhook.headers['webhook-signature']",
            hook(headers={"webhook-signature": "v1,x"}),
        ),
        bad_header_name=("webhook.headers['a b']", hook(headers={"a b": "x"})),
        newline_value=("webhook.headers['X-A']", hook(headers={"X-A": "a\r\nX-B: b"})),
        long_description=("webhook.description", hook(description="d" * 1001)),
        long_request_id=(
            "request_id",
            lambda c: W.CreateWebhookRequest(
                parent=c.user.name,
                webhook=W.Webhook(url="https://hooks.example.com/"),
                request_id="r" * 65,
            ),
        ),
        bad_parent=(
            "parent",
            lambda c: W.CreateWebhookRequest(
                parent="me", webhook=W.Webhook(url="https://hooks.example.com/")
            ),
        ),
    ),
    *rows(
        f"{WH}.GetWebhook",
        bad_id=("name", named(W.GetWebhookRequest, "users/{uid}/webhooks/nope")),
        wrong_collection=("name", named(W.GetWebhookRequest, "users/{uid}/tunnels/{tunnel}")),
    ),
    *rows(
        f"{WH}.ListWebhooks",
        negative_size=(
            "page_size",
            lambda c: W.ListWebhooksRequest(parent="users/me", page_size=-1),
        ),
        bad_filter=(
            "filter",
            lambda c: W.ListWebhooksRequest(parent="users/me", filter='disabled_reason = "x"'),
        ),
        bad_order=(
            "order_by",
            lambda c: W.ListWebhooksRequest(parent="users/me", order_by="secret"),
        ),
    ),
    *rows(
        f"{WH}.UpdateWebhook",
        bad_path=("update_mask", patch_hook(("secret",), description="x")),
        bad_url=("webhook.url", patch_hook(("url",), url="gopher://x")),
        bad_types=("webhook.event_types[0]", patch_hook(("event_types",), event_types=["x"])),
        bad_header_path=("update_mask", patch_hook(("headers.not a name",))),
        both_header_paths=("update_mask", patch_hook(("headers", "headers.x-a"))),
        bad_header=(
            "webhook.headers['host']",
            patch_hook(("headers.host",), headers={"host": "x"}),
        ),
        bad_name=(
            "webhook.name",
            lambda c: W.UpdateWebhookRequest(webhook=W.Webhook(name="webhooks/1", url="x")),
        ),
    ),
    *rows(
        f"{WH}.DeleteWebhook",
        bad_name=("name", named(W.DeleteWebhookRequest, "users/{uid}/webhooks/")),
    ),
    *rows(
        f"{WH}.RotateWebhookSecret",
        bad_name=("name", named(W.RotateWebhookSecretRequest, "users/{uid}/webhooks/x/y")),
    ),
    *rows(
        f"{WH}.ListWebhookDeliveries",
        negative_size=(
            "page_size",
            on_hook(W.ListWebhookDeliveriesRequest, field="parent", page_size=-1),
        ),
        bad_state=(
            "filter",
            on_hook(W.ListWebhookDeliveriesRequest, field="parent", filter='state = "lost"'),
        ),
        bad_parent=("parent", named(W.ListWebhookDeliveriesRequest, "users/{uid}", "parent")),
    ),
    *rows(
        f"{WH}.GetWebhookDelivery",
        bad_id=("name", on_hook(W.GetWebhookDeliveryRequest, "/deliveries/evt_1")),
        wrong_collection=("name", on_hook(W.GetWebhookDeliveryRequest, "/attempts/1")),
    ),
    *rows(
        f"{WH}.TestWebhook",
        bad_name=("name", named(W.TestWebhookRequest, "users/{uid}/webhooks/whk")),
        huge_data=(
            "data",
            on_hook(
                W.TestWebhookRequest,
                data=struct_pb2.Struct(fields={"a": struct_pb2.Value(string_value="x" * 20_000)}),
            ),
        ),
    ),
    *rows(
        f"{WH}.ReplayWebhookEvents",
        nothing=("start_time", replay()),
        too_old=("start_time", replay(start_time=ts(int(time.time()) - 100 * DAY))),
        backwards=("end_time", replay(start_time=recent(), end_time=ts(int(time.time()) - 7200))),
        bad_event=("event", replay(event="events/evt_1")),
        someone_elses=(
            "event",
            replay(
                event="users/usr_01jd3k0000000000000000000a/events/evt_01jd3k0000000000000000000a"
            ),
        ),
        both=(
            "event",
            lambda c: W.ReplayWebhookEventsRequest(
                name=c.webhook,
                event=f"{c.user.name}/events/evt_01jd3k0000000000000000000a",
                start_time=recent(),
            ),
        ),
        bad_types=("event_types[0]", replay(start_time=recent(), event_types=["tunnel"])),
        bad_timestamp=("start_time", replay(start_time=ts(1, -1))),
        long_request_id=("request_id", replay(start_time=recent(), request_id="r" * 65)),
    ),
    *rows(
        f"{WH}.RecoverWebhookDeliveries",
        missing=("start_time", on_hook(W.RecoverWebhookDeliveriesRequest)),
        future=("start_time", on_hook(W.RecoverWebhookDeliveriesRequest, start_time=FAR)),
        too_old=("start_time", on_hook(W.RecoverWebhookDeliveriesRequest, start_time=PAST)),
    ),
    *rows(
        f"{OP}.GetOperation",
        bad_id=("name", named(operations_pb2.GetOperationRequest, "users/{uid}/operations/op_1")),
    ),
    *rows(
        f"{OP}.CancelOperation",
        bad_id=(
            "name",
            named(operations_pb2.CancelOperationRequest, "users/{uid}/operations/opr_x"),
        ),
        wrong_collection=(
            "name",
            named(operations_pb2.CancelOperationRequest, "users/{uid}/webhooks/opr_x"),
        ),
    ),
    *rows(
        f"{PX}.CheckTunnelAccess",
        "anon",
        word=("client_ip", check_access("localhost")),
        cidr=("client_ip", check_access("10.0.0.0/8")),
        octet_over=("client_ip", check_access("10.0.0.256")),
        port=("client_ip", check_access("10.0.0.1:443")),
        forwarded_list=("client_ip", check_access("10.0.0.1, 10.0.0.2")),
        spaced=("client_ip", check_access(" 10.0.0.1")),
        nul=("client_ip", check_access("10.0.0.1\x00")),
        huge=("client_ip", check_access("1" * 20_000)),
        statement=("client_ip", check_access("1.2.3.4' OR 1=1 --")),
    ),
    *rows(
        f"{PX}.CheckTunnelAccess",
        with_credential=("client_ip", check_access("::1::2")),
    ),
    *rows(
        f"{PX}.AuthorizeAgentLink",
        "agent",
        empty=("tunnel", link_for("")),
        user_only=("tunnel", link_for("users/me")),
        bad_id=("tunnel", link_for("users/me/tunnels/nope")),
        collection=("tunnel", link_for("users/me/tunnels")),
        extra=("tunnel", link_for("{tunnel}/agents/x")),
        dot_dot=("tunnel", link_for("users/../tunnels/x")),
        nul=("tunnel", link_for("{tunnel}\x00")),
        huge=("tunnel", link_for("users/me/tunnels/" + "x" * 20_000)),
    ),
    *rows(
        f"{PX}.StartProxy",
        parent=("parent", lambda c: X.StartProxyRequest(parent="users")),
        request_id=(
            "request_id",
            lambda c: X.StartProxyRequest(parent="users/me", request_id="r" * 65),
        ),
        name_markup=(
            "proxy.display_name",
            lambda c: X.StartProxyRequest(
                parent="users/me", proxy=X.Proxy(display_name="<b>x</b>")
            ),
        ),
        name_long=(
            "proxy.display_name",
            lambda c: X.StartProxyRequest(parent="users/me", proxy=X.Proxy(display_name="x" * 256)),
        ),
        connections=("proxy.config.max_connections", start_proxy(max_connections=-5)),
        connections_over=("proxy.config.max_connections", start_proxy(max_connections=10_001)),
        timeout_short=("proxy.config.timeout", start_proxy(timeout=dur(0, 5_000_000))),
        timeout_long=("proxy.config.timeout", start_proxy(timeout=dur(3601))),
        timeout_bad=("proxy.config.timeout", start_proxy(timeout=dur(5, -1))),
        timeout_huge=("proxy.config.timeout", start_proxy(timeout=dur(10**12))),
        first_byte=("proxy.config.first_byte_timeout", start_proxy(first_byte_timeout=dur(-1))),
        gzip=("proxy.config.gzip_level", start_proxy(gzip_level=10)),
        gzip_negative=("proxy.config.gzip_level", start_proxy(gzip_level=-2)),
        rps=("proxy.config.rate_limit_rps", start_proxy(rate_limit_rps=-1)),
        burst=("proxy.config.rate_limit_burst", start_proxy(rate_limit_burst=100_001)),
        retries=("proxy.config.retries", start_proxy(retries=11)),
        retry_delay=("proxy.config.retry_delay", start_proxy(retry_delay=dur(11))),
        body=("proxy.config.max_body_bytes", start_proxy(max_body_bytes=10)),
        check_period=(
            "proxy.config.health_check_interval",
            start_proxy(health_check_interval=dur(601)),
        ),
        check_timeout=(
            "proxy.config.health_check_timeout",
            start_proxy(health_check_interval=dur(5), health_check_timeout=dur(5)),
        ),
        idle=("proxy.config.idle_stop", start_proxy(idle_stop=dur(30))),
        min_instances=(
            "proxy.config.scaling.min_instances",
            start_proxy(scaling={"min_instances": 11}),
        ),
        max_below_min=(
            "proxy.config.scaling.max_instances",
            start_proxy(scaling={"min_instances": 3, "max_instances": 2}),
        ),
        cpu_order=(
            "proxy.config.scaling.target_cpu_percent",
            start_proxy(scaling={"target_cpu_percent": 90}),
        ),
        cpu_over=(
            "proxy.config.scaling.scale_up_cpu_percent",
            start_proxy(scaling={"scale_up_cpu_percent": 101}),
        ),
        streams=(
            "proxy.config.scaling.max_streams_per_instance",
            start_proxy(scaling={"max_streams_per_instance": -1}),
        ),
        cooldown=(
            "proxy.config.scaling.scale_down_cooldown",
            start_proxy(scaling={"scale_down_cooldown": dur(3601)}),
        ),
    ),
    *rows(
        f"{PX}.GetProxy",
        empty=("name", proxy_named(X.GetProxyRequest, "")),
        tunnel=("name", proxy_named(X.GetProxyRequest, "users/me/tunnels/{proxy}")),
        bad_id=("name", proxy_named(X.GetProxyRequest, "users/me/proxies/tun_x")),
        extra=("name", proxy_named(X.GetProxyRequest, "{proxy}/x")),
        nul=("name", proxy_named(X.GetProxyRequest, "{proxy}\x00")),
        huge=("name", proxy_named(X.GetProxyRequest, "users/me/proxies/" + "x" * 20_000)),
    ),
    *rows(
        f"{PX}.ListProxies",
        parent=("parent", lambda c: X.ListProxiesRequest(parent="users")),
        negative_size=(
            "page_size",
            lambda c: X.ListProxiesRequest(parent="users/me", page_size=-1),
        ),
        bad_filter=(
            "filter",
            lambda c: X.ListProxiesRequest(parent="users/me", filter='state = "asleep"'),
        ),
        bad_order=(
            "order_by",
            lambda c: X.ListProxiesRequest(parent="users/me", order_by="config"),
        ),
        bad_token=(
            "page_token",
            lambda c: X.ListProxiesRequest(parent="users/me", page_token="garbage"),
        ),
    ),
    *rows(
        f"{PX}.StopProxy",
        bad_id=("name", proxy_named(X.StopProxyRequest, "users/me/proxies/prx_")),
    ),
    *rows(
        f"{PX}.UpdateProxy",
        no_name=(
            "proxy.name",
            lambda c: X.UpdateProxyRequest(
                proxy=X.Proxy(display_name="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
        ),
        bad_path=("update_mask", patch_proxy(("state",))),
        unknown_path=("update_mask", patch_proxy(("config.nope",))),
        empty_name=("proxy.display_name", patch_proxy(("display_name",), display_name=" ")),
        timeout=(
            "proxy.config.timeout",
            patch_proxy(("config.timeout",), config=X.ProxyConfig(timeout=dur(0, 1))),
        ),
        scaling=(
            "proxy.config.scaling.min_instances",
            patch_proxy(
                ("config.scaling.min_instances",),
                config=X.ProxyConfig(scaling=X.ProxyScalingPolicy(min_instances=-1)),
            ),
        ),
    ),
    *rows(
        f"{PX}.ListProxyConfigRevisions",
        parent=("parent", proxy_named(X.ListProxyConfigRevisionsRequest, "users/me", "parent")),
        negative_size=(
            "page_size",
            proxy_named(X.ListProxyConfigRevisionsRequest, "{proxy}", "parent", page_size=-1),
        ),
    ),
    *rows(
        f"{PX}.RollbackProxyConfig",
        zero=("version", proxy_named(X.RollbackProxyConfigRequest, "{proxy}", version=0)),
        negative=("version", proxy_named(X.RollbackProxyConfigRequest, "{proxy}", version=-3)),
        bad_name=("name", proxy_named(X.RollbackProxyConfigRequest, "{proxy}/x", version=1)),
    ),
    *rows(
        f"{PX}.ScaleProxy",
        zero=("instances", proxy_named(X.ScaleProxyRequest, "{proxy}", instances=0)),
        over=("instances", proxy_named(X.ScaleProxyRequest, "{proxy}", instances=11)),
        negative=("instances", proxy_named(X.ScaleProxyRequest, "{proxy}", instances=-1)),
        bad_name=("name", proxy_named(X.ScaleProxyRequest, "users/me/proxies", instances=1)),
    ),
    *rows(
        f"{PX}.ListProxyScalingEvents",
        parent=("parent", proxy_named(X.ListProxyScalingEventsRequest, "{uid}", "parent")),
        bad_token=(
            "page_token",
            proxy_named(X.ListProxyScalingEventsRequest, "{proxy}", "parent", page_token="nope"),
        ),
    ),
    *rows(
        f"{PX}.GetProxyMetrics",
        no_suffix=("name", proxy_named(X.GetProxyMetricsRequest, "{proxy}")),
        wrong_suffix=("name", proxy_named(X.GetProxyMetricsRequest, "{proxy}/usage")),
        bad_id=("name", proxy_named(X.GetProxyMetricsRequest, "users/me/proxies/x/metrics")),
    ),
    *rows(
        f"{PX}.WatchProxies",
        empty=("name", proxy_named(X.WatchProxiesRequest, "")),
        collection=("name", proxy_named(X.WatchProxiesRequest, "users/me/proxies")),
        bad_id=("name", proxy_named(X.WatchProxiesRequest, "users/me/proxies/tun_x")),
        resume=("resume_after", proxy_named(X.WatchProxiesRequest, "{proxy}", resume_after="x")),
    ),
    *rows(
        f"{PX}.GetProxyDiagnostics",
        no_suffix=("name", proxy_named(X.GetProxyDiagnosticsRequest, "{proxy}")),
        extra=("name", proxy_named(X.GetProxyDiagnosticsRequest, "{proxy}/diagnostics/x")),
    ),
    *rows(
        f"{OP}.ListOperations",
        negative_size=(
            "page_size",
            lambda c: operations_pb2.ListOperationsRequest(parent="users/me", page_size=-1),
        ),
        bad_filter=(
            "filter",
            lambda c: operations_pb2.ListOperationsRequest(parent="users/me", filter="done = 3"),
        ),
    ),
]

#: Methods whose only input is a credential: a bad one is UNAUTHENTICATED by design (it
#: must not say more), and writes nothing either.
BAD_CREDENTIALS = {
    f"{A}.RefreshToken": [
        auth_pb2.RefreshTokenRequest(),
        auth_pb2.RefreshTokenRequest(refresh_token="not-a-token"),
        auth_pb2.RefreshTokenRequest(refresh_token="x" * 10_000),
        auth_pb2.RefreshTokenRequest(refresh_token="\x00"),
        auth_pb2.RefreshTokenRequest(refresh_token="' OR 1=1 --"),
    ],
}

#: Methods with nothing a caller could get wrong, and why.
EXEMPT = {
    f"{A}.GetJwks": "takes no input",
    f"{AD}.GetSystemStatus": "takes no input",
    f"{U}.ListTiers": "takes no input",
    f"{A}.Logout": "its only field is a bool; the session comes from the credential",
    f"{AG}.Connect": "a bidirectional stream: its bad hellos and reports are refused in "
    "tests/integration/test_agents.py",
}


# --- fixtures and helpers ---------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def app(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """This module's own server, on a database of its own that holds only what the module
    makes: no agent to sweep, no endpoint to probe, and no webhook dispatcher, so nothing
    but the call under test can write between the two snapshots of a test."""
    directory = tmp_path_factory.mktemp("bad-input")
    async with own_server(backend, directory, webhook_dispatch=False) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to this module's server."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        yield ch


@pytest_asyncio.fixture(scope="module")
async def ctx(app: App, channel: grpc.aio.Channel) -> Ctx:
    """An ordinary user with two API keys and an agent key, a super admin, and real page
    tokens."""
    client = Client(app, channel)
    user = await client.new_user(tag="badinput")
    admin = await client.new_user(role=Role.SUPER_ADMIN, tag="badadmin")
    await client.api_key(user)
    await client.api_key(user)
    keys = await client.auth.ListApiKeys(
        auth_pb2.ListApiKeysRequest(parent="users/me", page_size=1), metadata=user.metadata
    )
    users = await client.users.ListUsers(
        users_pb2.ListUsersRequest(filter='email : "@"', page_size=1), metadata=admin.metadata
    )
    assert keys.next_page_token
    assert users.next_page_token
    made = await client.tunnel(user, "bad-input-target")
    target = await client.webhook(user, "http://127.0.0.1:9/bad-input")
    agent = await client.api_key(user, ["agent.connect"])
    proxy = await client.proxies.StartProxy(
        proxies_pb2.StartProxyRequest(parent="users/me"), metadata=user.metadata
    )
    return Ctx(
        user,
        admin,
        keys.api_keys[0].name,
        keys.next_page_token,
        users.next_page_token,
        made.name,
        target.name,
        agent,
        proxy.name,
    )


def stub_method(client: Client, method: str) -> Callable[..., Any]:
    """The stub callable of ``Service.Method``."""
    service, name = method.split(".")
    stub = {
        A: client.auth,
        U: client.users,
        AD: client.admin,
        AU: client.audit,
        T: client.tunnels,
        EV: client.events,
        WH: client.webhooks,
        OP: client.operations,
        PX: client.proxies,
    }[service]
    rpc = getattr(stub, name)
    if name not in {"WatchTunnels", "WatchProxies", "ExportAuditEntries", "ExportActivity"}:
        return rpc  # type: ignore[no-any-return]

    async def first_message(request: Message, **kwargs: Any) -> Any:
        stream = rpc(request, **kwargs)
        try:
            return await stream.read()
        finally:
            stream.cancel()

    return first_message


def metadata_for(ctx: Ctx, caller: str) -> tuple[tuple[str, str], ...]:
    """Call metadata of ``caller``."""
    return {
        "user": ctx.user.metadata,
        "admin": ctx.admin.metadata,
        "agent": bearer(ctx.agent_key),
        "anon": (),
    }[caller]


async def use_agent_key(client: Client, ctx: Ctx) -> None:
    """Use the agent key once now: an API key records its last use (at most once a
    minute), and that write belongs to this call, not to the bad one that follows."""
    await client.proxies.AuthorizeAgentLink(
        proxies_pb2.AuthorizeAgentLinkRequest(tunnel=ctx.tunnel), metadata=bearer(ctx.agent_key)
    )


async def snapshot(app: App) -> dict[str, tuple[int, str]]:
    """Row count and a digest of the contents of every watched table."""
    result: dict[str, tuple[int, str]] = {}
    async with app.db.engine.connect() as conn:
        for table in WATCHED:
            columns = [
                sa.func.length(c) if isinstance(c.type, sa.LargeBinary) else c for c in table.c
            ]
            stmt = sa.select(*columns).order_by(*table.primary_key.columns)
            found = (await conn.execute(stmt)).all()
            result[table.name] = (len(found), hashlib.sha256(repr(found).encode()).hexdigest())
    return result


# --- tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_REQUESTS)
async def test_bad_request_is_refused_and_writes_nothing(
    client: Client, ctx: Ctx, bad: Bad
) -> None:
    request = bad.build(ctx)
    if bad.caller == "agent":
        await use_agent_key(client, ctx)
    before = await snapshot(client.app)
    error = await fails(
        stub_method(client, bad.method)(request, metadata=metadata_for(ctx, bad.caller)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert bad.field in violations(error), violations(error)
    assert len(error.details() or "") <= 1000, "the message must not echo unbounded input"
    assert await snapshot(client.app) == before


@pytest.mark.parametrize(
    ("method", "request_message"),
    [(m, r) for m, requests in BAD_CREDENTIALS.items() for r in requests],
)
async def test_bad_credentials_are_refused_and_write_nothing(
    client: Client, method: str, request_message: Message
) -> None:
    before = await snapshot(client.app)
    await fails(stub_method(client, method)(request_message), grpc.StatusCode.UNAUTHENTICATED)
    assert await snapshot(client.app) == before


def test_every_rpc_is_covered() -> None:
    methods = {f"{s.name}.{m.name}" for s in SERVICES for m in s.methods}
    tabled = {row.values[0].method for row in BAD_REQUESTS}
    covered = tabled | set(BAD_CREDENTIALS) | set(EXEMPT)
    assert methods - covered == set(), "every RPC needs bad-input rows or an exemption"
    assert covered - methods == set(), "rows or exemptions for RPCs that do not exist"
    assert not tabled & set(EXEMPT), "an exempt method has rows; drop the exemption"
    assert all(EXEMPT.values())


async def test_unparseable_request_bytes_are_invalid_argument(client: Client) -> None:
    before = await snapshot(client.app)
    raw = client.channel.unary_unary(
        "/tunnelplane.v1.AuthService/Register",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    # Field 1 (email) holding bytes that are not UTF-8, then a valid password.
    body = b"\x0a\x04\xff\xfe\xfd\xfc\x12\x14" + PASSWORD.encode()[:20]
    error = await fails(raw(body), grpc.StatusCode.INVALID_ARGUMENT)
    assert "DecodeError" not in (error.details() or "")
    truncated = b"\x0a\x7f" + b"a@example.com"
    await fails(raw(truncated), grpc.StatusCode.INVALID_ARGUMENT)
    assert await snapshot(client.app) == before
    # The server is fine afterwards.
    await client.users.ListTiers(users_pb2.ListTiersRequest())


async def test_filter_injection_matches_nothing_and_does_no_harm(client: Client, ctx: Ctx) -> None:
    marker = f"inj{ctx.uid[-10:]}"
    made = [await client.register(f"{marker}-{i}@example.com") for i in range(2)]
    before = await snapshot(client.app)
    scoped = f'email : "{marker}"'
    for flt in (
        'email = "x\' OR 1=1 --"',
        'email = "x\\" OR 1=1 --"',
        'display_name = "\'; DROP TABLE users; --"',
        'email : "%"',
        'email : "_"',
        'email : "\\\\"',
    ):
        page = await client.users.ListUsers(
            users_pb2.ListUsersRequest(filter=f"{scoped} AND {flt}"), metadata=ctx.admin.metadata
        )
        assert list(page.users) == [], flt
    everyone = await client.users.ListUsers(
        users_pb2.ListUsersRequest(filter=scoped), metadata=ctx.admin.metadata
    )
    assert [u.name for u in everyone.users] == [u.name for u in made]
    assert await snapshot(client.app) == before


async def test_sql_metacharacters_in_display_names_are_stored_verbatim(
    client: Client, ctx: Ctx
) -> None:
    names = [
        "Robert'); DROP TABLE users;--",
        "' OR '1'='1",
        '100% "real" \\ name_with_%wildcards%',
        "Ünïcödé ☃ 名前 — ok",
    ]
    email = unique_email("verbatim")
    registered = await client.auth.Register(
        auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name=names[0])
    )
    assert registered.user.display_name == names[0]
    user = await client.login(email)
    token = (("authorization", f"Bearer {user.tokens.access_token}"),)
    for name in names:
        updated = await client.users.UpdateUser(
            users_pb2.UpdateUserRequest(
                user=users_pb2.User(name="users/me", display_name=name),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=token,
        )
        assert updated.display_name == name
        fetched = await client.users.GetUser(
            users_pb2.GetUserRequest(name="users/me"), metadata=token
        )
        assert fetched.display_name == name
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        found = await client.users.ListUsers(
            users_pb2.ListUsersRequest(filter=f'email = "{email}" AND display_name = "{quoted}"'),
            metadata=ctx.admin.metadata,
        )
        assert [u.name for u in found.users] == [registered.user.name], name
