"""UserService end to end over real gRPC, on every backend: profiles, deletion, roles,
tiers, listing, activity and avatars."""

from __future__ import annotations

import struct
import uuid
import zlib
from typing import Any

import grpc
import httpx
import sqlalchemy as sa
from google.api import httpbody_pb2
from google.protobuf import field_mask_pb2, json_format
from tunnelplane.v1 import auth_pb2, common_pb2, events_pb2, users_pb2

from server.domain.identity.model import Role, Tier
from server.domain.identity.tiers import DEFAULT_TIERS
from server.storage import tables
from tests.helpers import (
    PASSWORD,
    Client,
    TestUser,
    bearer,
    fails,
    reason,
    unique_email,
    violations,
)

Prefs = users_pb2.Preferences
Notes = users_pb2.NotificationPreferences
GIB = 1 << 30


def png(width: int = 2, height: int = 1) -> bytes:
    """A small but complete, valid RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\xff\x80\x00" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    """A FieldMask with ``paths``."""
    return field_mask_pb2.FieldMask(paths=list(paths))


async def me(client: Client, user: TestUser) -> users_pb2.User:
    """The user as they see themselves."""
    return await client.users.GetUser(
        users_pb2.GetUserRequest(name="users/me"), metadata=user.metadata
    )


async def update(
    client: Client, user: TestUser, message: users_pb2.User, *paths: str, use_mask: bool = True
) -> users_pb2.User:
    """UpdateUser of ``user`` itself with ``message`` (its name filled in)."""
    message.name = user.name
    request = users_pb2.UpdateUserRequest(user=message)
    if use_mask:
        request.update_mask.CopyFrom(mask(*paths))
    return await client.users.UpdateUser(request, metadata=user.metadata)


async def count(client: Client, table: sa.Table, column: str, value: str) -> int:
    """Rows of ``table`` whose ``column`` equals ``value``, read from storage directly."""
    async with client.app.db.engine.connect() as conn:
        stmt = sa.select(sa.func.count()).select_from(table).where(table.c[column] == value)
        return int(await conn.scalar(stmt) or 0)


def request_id_of(metadata: Any) -> str:
    """The ``x-request-id`` the server sent back."""
    values = [v for k, v in metadata if k == "x-request-id"]
    assert len(values) == 1
    return str(values[0])


# --- GetUser --------------------------------------------------------------------------


async def test_get_user_self_by_id_and_by_me(client: Client) -> None:
    user = await client.new_user()
    by_me = await me(client, user)
    by_id = await client.users.GetUser(
        users_pb2.GetUserRequest(name=user.name), metadata=user.metadata
    )
    assert by_me == by_id
    assert by_me.name == user.name
    assert by_me.email == user.email
    assert by_me.state == users_pb2.User.STATE_ACTIVE
    assert by_me.role == common_pb2.ROLE_USER
    assert by_me.tier == common_pb2.TIER_FREE
    assert by_me.etag


async def test_get_other_user_needs_users_read(client: Client) -> None:
    user = await client.new_user()
    other = await client.new_user()
    error = await fails(
        client.users.GetUser(users_pb2.GetUserRequest(name=other.name), metadata=user.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason(error) == "NOT_OWNER"
    support = await client.new_user(role=Role.SUPPORT_ADMIN)
    seen = await client.users.GetUser(
        users_pb2.GetUserRequest(name=other.name), metadata=support.metadata
    )
    assert seen.email == other.email


# --- UpdateUser -----------------------------------------------------------------------


async def test_update_with_explicit_mask_changes_only_the_masked_paths(client: Client) -> None:
    user = await client.new_user()
    before = await me(client, user)

    renamed = await update(
        client,
        user,
        users_pb2.User(display_name="Ada Lovelace", preferences=Prefs(theme=Prefs.THEME_DARK)),
        "display_name",
    )
    assert renamed.display_name == "Ada Lovelace"
    assert renamed.preferences == before.preferences

    themed = await update(
        client,
        user,
        users_pb2.User(display_name="ignored", preferences=Prefs(theme=Prefs.THEME_DARK)),
        "preferences.theme",
    )
    assert themed.display_name == "Ada Lovelace"
    assert themed.preferences.theme == Prefs.THEME_DARK
    assert themed.preferences.language == before.preferences.language
    assert themed.preferences.notifications == before.preferences.notifications

    assert before.preferences.notifications.email
    assert before.preferences.notifications.security_alerts
    muted = await update(
        client,
        user,
        users_pb2.User(preferences=Prefs(notifications=Notes(email=False, security_alerts=False))),
        "preferences.notifications.email",
    )
    assert not muted.preferences.notifications.email
    # security_alerts was sent as false too, but is not in the mask.
    assert muted.preferences.notifications.security_alerts
    assert muted.preferences.theme == Prefs.THEME_DARK
    assert await me(client, user) == muted


async def test_update_without_mask_changes_only_populated_fields(client: Client) -> None:
    user = await client.new_user()
    await update(
        client,
        user,
        users_pb2.User(preferences=Prefs(language="pt-BR", time_zone="Europe/Lisbon")),
        "preferences.language",
        "preferences.time_zone",
    )
    before = await me(client, user)

    updated = await update(
        client,
        user,
        users_pb2.User(display_name="Grace Hopper", preferences=Prefs(theme=Prefs.THEME_LIGHT)),
        use_mask=False,
    )
    assert updated.display_name == "Grace Hopper"
    assert updated.preferences.theme == Prefs.THEME_LIGHT
    assert updated.preferences.language == "pt-BR"
    assert updated.preferences.time_zone == "Europe/Lisbon"
    assert updated.preferences.notifications == before.preferences.notifications


async def test_update_with_star_replaces_every_updatable_field(client: Client) -> None:
    user = await client.new_user()
    before = await me(client, user)
    wanted = users_pb2.User(
        display_name="Katherine Johnson",
        preferences=Prefs(
            theme=Prefs.THEME_DARK,
            language="fr-CA",
            time_zone="America/Toronto",
            notifications=Notes(email=False, security_alerts=True, product_updates=True),
        ),
    )
    updated = await update(client, user, wanted, "*")
    assert updated.display_name == wanted.display_name
    # A full replacement: service_alerts was left unset, so it is now false.
    assert updated.preferences == wanted.preferences
    assert not updated.preferences.notifications.service_alerts
    assert before.preferences.notifications.service_alerts
    # Output-only fields are untouched by `*`.
    assert (updated.email, updated.role, updated.tier) == (before.email, before.role, before.tier)


async def test_update_mask_naming_a_field_that_cannot_be_updated(client: Client) -> None:
    user = await client.new_user()
    before = await me(client, user)
    for path in ("email", "role", "tier", "state", "nonexistent", "preferences.nope"):
        error = await fails(
            update(client, user, users_pb2.User(display_name="x", email="a@b.example"), path),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "update_mask" in violations(error), path
    assert await me(client, user) == before
    # name and etag select the resource and its version (a PATCH body carries them, so the
    # gateway's inferred mask names them): they are skipped, never updated.
    kept = await update(client, user, users_pb2.User(etag=before.etag), "etag")
    assert kept == before


async def test_stale_etag_is_aborted_and_changes_nothing(client: Client) -> None:
    user = await client.new_user()
    first = await me(client, user)
    second = await update(
        client, user, users_pb2.User(display_name="Second", etag=first.etag), "display_name"
    )
    assert second.etag != first.etag
    assert second.display_name == "Second"

    error = await fails(
        update(client, user, users_pb2.User(display_name="Stale", etag=first.etag), "display_name"),
        grpc.StatusCode.ABORTED,
    )
    assert reason(error) == "ETAG_MISMATCH"
    assert await me(client, user) == second

    third = await update(
        client, user, users_pb2.User(display_name="Third", etag=second.etag), "display_name"
    )
    assert third.display_name == "Third"
    assert third.etag not in {first.etag, second.etag}


async def test_invalid_profile_values_name_their_field(client: Client) -> None:
    user = await client.new_user()
    before = await me(client, user)
    cases = [
        (
            users_pb2.User(display_name="<script>alert(1)</script>"),
            "display_name",
            "user.display_name",
        ),
        (
            users_pb2.User(preferences=Prefs(language="not a language")),
            "preferences.language",
            "user.preferences.language",
        ),
        (
            users_pb2.User(preferences=Prefs(time_zone="Mars/Olympus_Mons")),
            "preferences.time_zone",
            "user.preferences.time_zone",
        ),
        (
            users_pb2.User(preferences=Prefs(theme=99)),
            "preferences.theme",  # type: ignore[arg-type]
            "user.preferences.theme",
        ),
    ]
    for message, path, field in cases:
        error = await fails(update(client, user, message, path), grpc.StatusCode.INVALID_ARGUMENT)
        assert field in violations(error), (path, violations(error))
    assert await me(client, user) == before


# --- DeleteUser / UndeleteUser ----------------------------------------------------------


async def test_soft_delete_ends_every_credential_and_undelete_restores(client: Client) -> None:
    user = await client.new_user()
    key = await client.api_key(user)
    await client.users.GetUser(users_pb2.GetUserRequest(name="users/me"), metadata=bearer(key))

    deleted = await client.users.DeleteUser(
        users_pb2.DeleteUserRequest(name="users/me"), metadata=user.metadata
    )
    assert deleted.state == users_pb2.User.STATE_DELETED
    assert deleted.HasField("delete_time")
    assert deleted.HasField("purge_time")
    assert deleted.purge_time.ToDatetime() > deleted.delete_time.ToDatetime()

    for credential in (user.access_token, key):
        await fails(
            client.users.GetUser(
                users_pb2.GetUserRequest(name="users/me"), metadata=bearer(credential)
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    await fails(
        client.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=user.refresh_token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await fails(client.login(user.email), grpc.StatusCode.UNAUTHENTICATED)

    support = await client.new_user(role=Role.SUPPORT_ADMIN)
    await fails(
        client.users.GetUser(users_pb2.GetUserRequest(name=user.name), metadata=support.metadata),
        grpc.StatusCode.NOT_FOUND,
    )
    seen = await client.users.GetUser(
        users_pb2.GetUserRequest(name=user.name, show_deleted=True), metadata=support.metadata
    )
    assert seen.state == users_pb2.User.STATE_DELETED
    assert seen.purge_time == deleted.purge_time

    admin = await client.new_user(role=Role.SUPER_ADMIN)
    restored = await client.users.UndeleteUser(
        users_pb2.UndeleteUserRequest(name=user.name), metadata=admin.metadata
    )
    assert restored.state == users_pb2.User.STATE_ACTIVE
    assert not restored.HasField("delete_time")
    assert not restored.HasField("purge_time")
    login = await client.login(user.email)
    assert login.user.name == user.name

    error = await fails(
        client.users.UndeleteUser(
            users_pb2.UndeleteUserRequest(name=user.name), metadata=admin.metadata
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason(error) == "NOT_DELETED"


async def test_purge_erases_the_user_and_everything_they_own(client: Client) -> None:
    user = await client.new_user()
    await client.api_key(user)
    await client.users.UploadAvatar(
        users_pb2.UploadAvatarRequest(
            name="users/me/avatar",
            avatar=httpbody_pb2.HttpBody(content_type="image/png", data=png()),
        ),
        metadata=user.metadata,
    )
    await update(client, user, users_pb2.User(display_name="Soon Gone"), "display_name")
    owned = {
        tables.users: "id",
        tables.sessions: "user_id",
        tables.refresh_tokens: "user_id",
        tables.api_keys: "user_id",
        tables.avatars: "user_id",
    }
    for table, column in owned.items():
        assert await count(client, table, column, user.id) >= 1, table.name
    activity = await client.users.ListActivity(
        users_pb2.ListActivityRequest(parent="users/me"), metadata=user.metadata
    )
    assert {"auth.login", "users.update_user"} <= {e.action for e in activity.entries}

    purged = await client.users.DeleteUser(
        users_pb2.DeleteUserRequest(name="users/me", purge=True), metadata=user.metadata
    )
    assert purged.state == users_pb2.User.STATE_DELETED

    for table, column in owned.items():
        assert await count(client, table, column, user.id) == 0, table.name
    async with client.app.db.engine.connect() as conn:
        left = (
            await conn.execute(
                sa.select(tables.audit_log.c.action).where(
                    tables.audit_log.c.subject_user_id == user.id
                )
            )
        ).all()
    # Only the record of the erasure itself may name the erased id.
    assert [row.action for row in left] in ([], ["users.delete_user"])

    admin = await client.new_user(role=Role.SUPER_ADMIN)
    await fails(
        client.users.GetUser(
            users_pb2.GetUserRequest(name=user.name, show_deleted=True), metadata=admin.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await fails(
        client.users.UndeleteUser(
            users_pb2.UndeleteUserRequest(name=user.name), metadata=admin.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    again = await client.register(user.email)
    assert again.name != user.name
    assert (await client.login(user.email)).user.name == again.name


# --- SetUserRole ----------------------------------------------------------------------


async def test_super_admin_sets_roles_but_not_their_own(client: Client) -> None:
    admin = await client.new_user(role=Role.SUPER_ADMIN)
    target = await client.new_user()
    await fails(
        client.users.ListUsers(users_pb2.ListUsersRequest(), metadata=target.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    promoted = await client.users.SetUserRole(
        users_pb2.SetUserRoleRequest(
            name=target.name, role=common_pb2.ROLE_SUPPORT_ADMIN, reason="a test"
        ),
        metadata=admin.metadata,
    )
    assert promoted.role == common_pb2.ROLE_SUPPORT_ADMIN
    changes = await client.events.ListEvents(
        events_pb2.ListEventsRequest(parent=target.name, filter='type = "user.role_changed"'),
        metadata=admin.metadata,
    )
    assert [json_format.MessageToDict(e.payload) for e in changes.events] == [
        {"name": target.name, "from": "user", "to": "support_admin", "reason": "a test"}
    ]
    # The new role applies to the access token the target already holds.
    listed = await client.users.ListUsers(
        users_pb2.ListUsersRequest(filter=f'email = "{target.email}"'), metadata=target.metadata
    )
    assert [u.name for u in listed.users] == [target.name]

    error = await fails(
        client.users.SetUserRole(
            users_pb2.SetUserRoleRequest(
                name="users/me", role=common_pb2.ROLE_USER, reason="a test"
            ),
            metadata=admin.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason(error) == "SELF_ROLE_CHANGE"
    error = await fails(
        client.users.SetUserRole(
            users_pb2.SetUserRoleRequest(
                name=target.name, role=common_pb2.ROLE_UNSPECIFIED, reason="a test"
            ),
            metadata=admin.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "role" in violations(error)
    # The promoted support admin lacks users.admin: it cannot hand out roles.
    await fails(
        client.users.SetUserRole(
            users_pb2.SetUserRoleRequest(
                name=admin.name, role=common_pb2.ROLE_USER, reason="a test"
            ),
            metadata=target.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


# --- Tiers ----------------------------------------------------------------------------

EXPECTED_TIERS = {
    "tiers/free": (common_pb2.TIER_FREE, 100, 3, 5, 10_000, GIB, True),
    "tiers/premium": (common_pb2.TIER_PREMIUM, 1_000, 50, 100, 1_000_000, 100 * GIB, True),
    "tiers/enterprise": (common_pb2.TIER_ENTERPRISE, 10_000, -1, -1, -1, -1, False),
}


def tier_numbers(t: users_pb2.TierDetails) -> tuple[int | bool, ...]:
    """The limits of a tier in the order of :data:`EXPECTED_TIERS`."""
    return (
        t.tier,
        t.requests_per_minute,
        t.max_tunnels,
        t.max_concurrent_connections,
        t.requests_per_month,
        t.transfer_bytes_per_month,
        t.self_service,
    )


async def test_tiers_are_public_with_the_documented_limits(client: Client) -> None:
    listed = await client.users.ListTiers(users_pb2.ListTiersRequest())
    assert [t.name for t in listed.tiers] == list(EXPECTED_TIERS)
    for tier in listed.tiers:
        assert tier_numbers(tier) == EXPECTED_TIERS[tier.name]
        assert tier.display_name
        fetched = await client.users.GetTier(users_pb2.GetTierRequest(name=tier.name))
        assert fetched == tier
    premium = {t.name: t for t in listed.tiers}["tiers/premium"]
    assert "endpoint_failover" in premium.features
    assert "tunnel_sharing" in premium.features
    await fails(
        client.users.GetTier(users_pb2.GetTierRequest(name="tiers/nope")),
        grpc.StatusCode.NOT_FOUND,
    )
    error = await fails(
        client.users.GetTier(users_pb2.GetTierRequest(name="bogus")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "name" in violations(error)


async def test_tiers_show_their_stream_limits(client: Client, http: httpx.AsyncClient) -> None:
    """The per-user caps on open watches and agent streams are part of what a tier allows,
    over gRPC and HTTP alike."""
    listed = await client.users.ListTiers(users_pb2.ListTiersRequest())
    over_grpc = {t.name: (t.max_watch_streams, t.max_agent_streams) for t in listed.tiers}
    expected = {
        f"tiers/{name}": (limits.max_watch_streams, limits.max_agent_streams)
        for name, limits in DEFAULT_TIERS.items()
    }
    assert over_grpc == expected
    assert expected == {
        "tiers/free": (5, 5),
        "tiers/premium": (50, 100),
        "tiers/enterprise": (1_000, 1_000),
    }
    response = await http.get("/v1/tiers")
    assert response.status_code == 200
    over_http = {
        t["name"]: (int(t["maxWatchStreams"]), int(t["maxAgentStreams"]))
        for t in response.json()["tiers"]
    }
    assert over_http == expected
    fetched = (await http.get("/v1/tiers/free")).json()
    assert (fetched["maxWatchStreams"], fetched["maxAgentStreams"]) == ("5", "5")


async def test_self_service_tier_change_takes_effect_at_once(client: Client) -> None:
    user = await client.new_user()
    changed = await client.users.ChangeTier(
        users_pb2.ChangeTierRequest(name="users/me", tier=common_pb2.TIER_PREMIUM),
        metadata=user.metadata,
    )
    assert changed.tier == common_pb2.TIER_PREMIUM
    assert (await me(client, user)).tier == common_pb2.TIER_PREMIUM

    error = await fails(
        client.users.ChangeTier(
            users_pb2.ChangeTierRequest(name="users/me", tier=common_pb2.TIER_ENTERPRISE),
            metadata=user.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason(error) == "TIER_NOT_SELF_SERVICE"
    assert (await me(client, user)).tier == common_pb2.TIER_PREMIUM

    back = await client.users.ChangeTier(
        users_pb2.ChangeTierRequest(name="users/me", tier=common_pb2.TIER_FREE),
        metadata=user.metadata,
    )
    assert back.tier == common_pb2.TIER_FREE


async def test_finance_admin_assigns_enterprise_to_another_user(client: Client) -> None:
    finance = await client.new_user(role=Role.FINANCE_ADMIN)
    customer = await client.new_user()
    other = await client.new_user()
    await fails(
        client.users.ChangeTier(
            users_pb2.ChangeTierRequest(name=customer.name, tier=common_pb2.TIER_PREMIUM),
            metadata=other.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    changed = await client.users.ChangeTier(
        users_pb2.ChangeTierRequest(
            name=customer.name, tier=common_pb2.TIER_ENTERPRISE, reason="contract signed"
        ),
        metadata=finance.metadata,
    )
    assert changed.tier == common_pb2.TIER_ENTERPRISE
    assert (await me(client, customer)).tier == common_pb2.TIER_ENTERPRISE


# --- ListUsers ------------------------------------------------------------------------


async def make_users(client: Client, marker: str, n: int) -> list[users_pb2.User]:
    """``n`` registered users whose emails contain ``marker``, oldest first."""
    return [await client.register(f"{marker}-{i}@example.com") for i in range(n)]


async def list_all(client: Client, admin: TestUser, **fields: Any) -> tuple[list[str], int]:
    """Every page of ListUsers: the names in order and how many pages it took."""
    names: list[str] = []
    token, pages = "", 0
    while True:
        page = await client.users.ListUsers(
            users_pb2.ListUsersRequest(page_token=token, **fields), metadata=admin.metadata
        )
        pages += 1
        names.extend(u.name for u in page.users)
        token = page.next_page_token
        if not token:
            return names, pages
        assert pages < 50, "paging does not end"


async def test_list_users_filters(client: Client) -> None:
    admin = await client.new_user(role=Role.SUPPORT_ADMIN)
    marker = f"lf{uuid.uuid4().hex[:10]}"
    made = await make_users(client, marker, 4)
    names = [u.name for u in made]
    ids = [n.split("/")[1] for n in names]
    await client.app.identity.users.change_tier(
        _root(), ids[1], Tier.PREMIUM, etag="", reason="test set-up"
    )
    await client.app.identity.users.promote(made[2].email, Role.FINANCE_ADMIN)

    async def matching(flt: str, **fields: Any) -> list[str]:
        result, _ = await list_all(
            client, admin, filter=f'email : "{marker}" AND ({flt})', **fields
        )
        return result

    assert await matching('email : "@example.com"') == names
    assert await matching(f'email : "{marker.upper()}-2"') == [names[2]]
    assert await matching('tier = "premium"') == [names[1]]
    assert await matching("tier = TIER_PREMIUM") == [names[1]]
    assert await matching('tier != "premium"') == [names[0], names[2], names[3]]
    assert await matching('role = "finance_admin"') == [names[2]]
    assert await matching('role = "user" AND tier = "free"') == [names[0], names[3]]
    assert await matching('state = "active"') == names
    stamp = made[2].create_time.ToJsonString()
    assert await matching(f'create_time >= "{stamp}"') == names[2:]
    assert await matching(f'create_time < "{stamp}"') == names[:2]
    assert await matching(f'create_time > "{stamp}" OR tier = "premium"') == [names[1], names[3]]
    assert await matching('NOT role = "user"') == [names[2]]
    # Only made[3] has signed in: a user who never did matches no comparison.
    signed_in = await client.login(made[3].email)
    seen = signed_in.user.last_login_time.ToJsonString()
    assert await matching(f'last_login_time >= "{seen}"') == [names[3]]
    assert await matching(f'last_login_time < "{seen}"') == []
    # Something that looks like SQL is just a value that matches nobody.
    assert await matching('email = "x\' OR 1=1 --"') == []


async def test_list_users_order_and_paging(client: Client) -> None:
    admin = await client.new_user(role=Role.SUPPORT_ADMIN)
    marker = f"lp{uuid.uuid4().hex[:10]}"
    made = await make_users(client, marker, 5)
    names = [u.name for u in made]
    flt = f'email : "{marker}"'

    by_time, pages = await list_all(client, admin, filter=flt, page_size=2)
    assert by_time == names
    assert pages == 3
    ordered, _ = await list_all(client, admin, filter=flt, page_size=2, order_by="create_time")
    assert ordered == names
    newest, _ = await list_all(client, admin, filter=flt, page_size=2, order_by="create_time desc")
    assert newest == names[::-1]
    by_email, _ = await list_all(client, admin, filter=flt, page_size=2, order_by="email desc")
    assert by_email == [u.name for u in sorted(made, key=lambda u: u.email, reverse=True)]
    one_page = await client.users.ListUsers(
        users_pb2.ListUsersRequest(filter=flt, page_size=10), metadata=admin.metadata
    )
    assert [u.name for u in one_page.users] == names
    assert one_page.next_page_token == ""


async def test_list_users_refuses_bad_paging_and_filters(client: Client) -> None:
    admin = await client.new_user(role=Role.SUPPORT_ADMIN)
    marker = f"lb{uuid.uuid4().hex[:10]}"
    await make_users(client, marker, 3)
    flt = f'email : "{marker}"'
    first = await client.users.ListUsers(
        users_pb2.ListUsersRequest(filter=flt, page_size=1), metadata=admin.metadata
    )
    token = first.next_page_token
    assert token
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    cases = [
        (users_pb2.ListUsersRequest(filter=flt, page_size=1, page_token=tampered), "page_token"),
        (users_pb2.ListUsersRequest(filter=flt, page_size=1, page_token="garbage!"), "page_token"),
        # A genuine token for another filter.
        (users_pb2.ListUsersRequest(filter='email : "x"', page_token=token), "page_token"),
        (users_pb2.ListUsersRequest(page_size=-1), "page_size"),
        (users_pb2.ListUsersRequest(filter="email ="), "filter"),
        (users_pb2.ListUsersRequest(filter='password_hash : "a"'), "filter"),
        (users_pb2.ListUsersRequest(filter='tier = "gold"'), "filter"),
        (users_pb2.ListUsersRequest(filter='create_time > "yesterday"'), "filter"),
        (users_pb2.ListUsersRequest(order_by="password_hash"), "order_by"),
    ]
    for request, field in cases:
        error = await fails(
            client.users.ListUsers(request, metadata=admin.metadata),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert field in violations(error), (request, violations(error))


async def test_list_users_show_deleted(client: Client) -> None:
    admin = await client.new_user(role=Role.SUPER_ADMIN)
    marker = f"ld{uuid.uuid4().hex[:10]}"
    made = await make_users(client, marker, 3)
    gone = made[1]
    await client.users.DeleteUser(
        users_pb2.DeleteUserRequest(name=gone.name), metadata=admin.metadata
    )
    flt = f'email : "{marker}"'
    visible, _ = await list_all(client, admin, filter=flt)
    assert visible == [made[0].name, made[2].name]
    everyone, _ = await list_all(client, admin, filter=flt, show_deleted=True)
    assert everyone == [u.name for u in made]
    deleted, _ = await list_all(
        client, admin, filter=f'{flt} AND state = "deleted"', show_deleted=True
    )
    assert deleted == [gone.name]


# --- ListActivity ---------------------------------------------------------------------


async def test_activity_records_sign_ins_updates_and_failures(client: Client) -> None:
    email = unique_email("activity")
    await client.register(email)
    login_call = client.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
    login = await login_call
    login_request_id = request_id_of(await login_call.initial_metadata())
    token = login.tokens.access_token
    update_call = client.users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=users_pb2.User(name="users/me", display_name="Audited"),
            update_mask=mask("display_name"),
        ),
        metadata=bearer(token),
    )
    await update_call
    update_request_id = request_id_of(await update_call.initial_metadata())
    await fails(
        client.login(email, "definitely the wrong password"), grpc.StatusCode.UNAUTHENTICATED
    )

    page = await client.users.ListActivity(
        users_pb2.ListActivityRequest(parent="users/me"), metadata=bearer(token)
    )
    entries = list(page.entries)
    times = [e.create_time.ToDatetime() for e in entries]
    assert times == sorted(times, reverse=True)
    by_request = {e.request_id: e for e in entries}
    user_name = login.user.name

    signed_in = by_request[login_request_id]
    assert (signed_in.action, signed_in.outcome) == ("auth.login", "OK")
    assert signed_in.method == "/tunnelplane.v1.AuthService/Login"
    assert signed_in.ip_address == "127.0.0.1"
    assert signed_in.name.startswith(f"{user_name}/activity/")

    updated = by_request[update_request_id]
    assert (updated.action, updated.outcome) == ("users.update_user", "OK")
    assert updated.actor == user_name
    assert updated.resource == user_name
    assert updated.ip_address == "127.0.0.1"

    newest = entries[0]
    assert (newest.action, newest.outcome, newest.reason) == (
        "auth.login",
        "UNAUTHENTICATED",
        "INVALID_CREDENTIALS",
    )
    assert "auth.register" in {e.action for e in entries}

    failures = await client.users.ListActivity(
        users_pb2.ListActivityRequest(parent="users/me", filter='outcome != "OK"'),
        metadata=bearer(token),
    )
    assert [(e.action, e.outcome) for e in failures.entries] == [("auth.login", "UNAUTHENTICATED")]
    logins = await client.users.ListActivity(
        users_pb2.ListActivityRequest(parent=user_name, filter='action = "auth.login"'),
        metadata=bearer(token),
    )
    assert [e.outcome for e in logins.entries] == ["UNAUTHENTICATED", "OK"]

    stranger = await client.new_user()
    await fails(
        client.users.ListActivity(
            users_pb2.ListActivityRequest(parent=user_name), metadata=stranger.metadata
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    support = await client.new_user(role=Role.SUPPORT_ADMIN)
    seen = await client.users.ListActivity(
        users_pb2.ListActivityRequest(parent=user_name), metadata=support.metadata
    )
    assert [e.name for e in seen.entries] == [e.name for e in entries]


async def test_activity_pages_newest_first(client: Client) -> None:
    user = await client.new_user()
    for i in range(3):
        await update(client, user, users_pb2.User(display_name=f"Name {i}"), "display_name")
    everything = await client.users.ListActivity(
        users_pb2.ListActivityRequest(parent="users/me"), metadata=user.metadata
    )
    paged: list[str] = []
    token = ""
    while True:
        page = await client.users.ListActivity(
            users_pb2.ListActivityRequest(parent="users/me", page_size=2, page_token=token),
            metadata=user.metadata,
        )
        paged.extend(e.name for e in page.entries)
        token = page.next_page_token
        if not token:
            break
    assert paged == [e.name for e in everything.entries]
    assert len(paged) >= 5


# --- Avatars --------------------------------------------------------------------------


def upload(name: str, content_type: str, data: bytes) -> users_pb2.UploadAvatarRequest:
    """An UploadAvatar request."""
    return users_pb2.UploadAvatarRequest(
        name=name, avatar=httpbody_pb2.HttpBody(content_type=content_type, data=data)
    )


async def test_avatar_upload_download_and_delete(client: Client) -> None:
    user = await client.new_user()
    assert not (await me(client, user)).has_avatar
    image = png(3, 2)
    updated = await client.users.UploadAvatar(
        upload("users/me/avatar", "image/png", image), metadata=user.metadata
    )
    assert updated.has_avatar
    assert (await me(client, user)).has_avatar

    fetched = await client.users.GetAvatar(
        users_pb2.GetAvatarRequest(name=f"{user.name}/avatar"), metadata=user.metadata
    )
    assert fetched.content_type == "image/png"
    assert fetched.data == image

    stranger = await client.new_user()
    await fails(
        client.users.GetAvatar(
            users_pb2.GetAvatarRequest(name=f"{user.name}/avatar"), metadata=stranger.metadata
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )

    await client.users.DeleteAvatar(
        users_pb2.DeleteAvatarRequest(name="users/me/avatar"), metadata=user.metadata
    )
    assert not (await me(client, user)).has_avatar
    await fails(
        client.users.GetAvatar(
            users_pb2.GetAvatarRequest(name="users/me/avatar"), metadata=user.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await fails(
        client.users.DeleteAvatar(
            users_pb2.DeleteAvatarRequest(name="users/me/avatar"), metadata=user.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_bad_avatars_are_refused(client: Client) -> None:
    user = await client.new_user()
    image = png()
    limit = client.app.settings.avatar_max_bytes
    cases = [
        ("text/html", b"<html><script>alert(1)</script></html>", "avatar.content_type"),
        ("image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "avatar.content_type"),
        ("", image, "avatar.content_type"),
        ("image/png", b"\xff\xd8\xff\xe0" + b"\x00" * 16, "avatar.data"),
        ("image/jpeg", image, "avatar.data"),
        ("image/webp", b"RIFF\x00\x00\x00\x00WAVEfmt ", "avatar.data"),
        ("image/png", b"", "avatar.data"),
        ("image/png", image + b"\x00" * (limit + 1 - len(image)), "avatar.data"),
    ]
    for content_type, data, field in cases:
        error = await fails(
            client.users.UploadAvatar(
                upload("users/me/avatar", content_type, data), metadata=user.metadata
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert field in violations(error), (content_type, len(data), violations(error))
    assert not (await me(client, user)).has_avatar
    assert await count(client, tables.avatars, "user_id", user.id) == 0
    # Exactly at the limit is fine.
    at_limit = image + b"\x00" * (limit - len(image))
    accepted = await client.users.UploadAvatar(
        upload("users/me/avatar", "image/png; charset=binary", at_limit), metadata=user.metadata
    )
    assert accepted.has_avatar


def _root() -> Any:
    from server.domain.identity.model import CredentialKind, Principal
    from server.domain.identity.rules import permissions_for

    return Principal(
        user_id="usr_testroot",
        role=Role.SUPER_ADMIN,
        tier=Tier.ENTERPRISE,
        credential=CredentialKind.SESSION,
        permissions=permissions_for(Role.SUPER_ADMIN),
    )
