"""Webhook custom headers are secrets at rest: stored sealed (never in the clear in any
column), write-only in the API (responses name them, over gRPC and HTTP alike), still sent
with every delivery, and changed one at a time without resending the others. Rows from the
release before (plaintext ``headers``) are read as they are and sealed at start-up.

Also here: the embedded SQLite database file is this user's alone.
"""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from tunnelplane.v1 import webhooks_pb2

from server.app import App
from server.domain.common.clock import SystemClock
from server.domain.common.ids import new_id
from server.domain.webhooks.rules import new_secret
from server.storage import tables
from server.storage.database import Database
from server.workers.webhooks import seal_plain_headers
from tests.conftest import make_settings, migrate
from tests.helpers import Client, TestUser
from tests.webhook_receiver import Receiver

W = webhooks_pb2
TOKEN = "Bearer s3cr3t-value-that-must-not-leak"
OTHER = "team-value-also-secret"


@pytest_asyncio.fixture
async def rx() -> AsyncIterator[Receiver]:
    async with Receiver() as receiver:
        yield receiver


def auth(user: TestUser) -> dict[str, str]:
    return {"authorization": f"Bearer {user.access_token}"}


async def raw_row(app: App, webhook_name: str) -> dict[str, Any]:
    """The endpoint's row as stored, every column."""
    webhook_id = webhook_name.rsplit("/", 1)[1]
    async with app.db.engine.connect() as conn:
        row = (
            (
                await conn.execute(
                    sa.select(tables.webhooks).where(tables.webhooks.c.id == webhook_id)
                )
            )
            .mappings()
            .one()
        )
    return dict(row)


def leaks(values: tuple[str, ...], text: str | bytes) -> list[str]:
    """Those of ``values`` found in ``text``."""
    raw = text if isinstance(text, bytes) else text.encode()
    return [v for v in values if v.encode() in raw]


async def delivered_headers(
    client: Client, owner: TestUser, name: str, rx: Receiver
) -> dict[str, str]:
    """Send a test event to the endpoint; the headers its request carried."""
    before = len(rx.seen)
    sent = await client.webhooks.TestWebhook(
        W.TestWebhookRequest(name=name), metadata=owner.metadata
    )
    assert sent.state == W.WebhookDelivery.STATE_SUCCEEDED
    return rx.seen[before].headers


async def test_header_values_are_sealed_write_only_and_still_sent_over_grpc(
    client: Client, rx: Receiver
) -> None:
    owner = await client.new_user()
    made = await client.webhook(owner, rx.url(), headers={"Authorization": TOKEN, "X-Team": OTHER})
    secrets = (TOKEN, OTHER)
    # Stored: no column holds a value in the clear.
    row = await raw_row(client.app, made.name)
    assert leaks(secrets, repr(row)) == []
    assert row["headers"] == {}
    assert row["sealed_headers"].startswith("sealed:v1:")
    # Returned: names only, by every call that returns the endpoint.
    got = await client.webhooks.GetWebhook(
        W.GetWebhookRequest(name=made.name), metadata=owner.metadata
    )
    listed = await client.webhooks.ListWebhooks(
        W.ListWebhooksRequest(parent=owner.name), metadata=owner.metadata
    )
    updated = await client.webhooks.UpdateWebhook(
        W.UpdateWebhookRequest(
            webhook=W.Webhook(name=made.name, description="now"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        ),
        metadata=owner.metadata,
    )
    rotated = await client.webhooks.RotateWebhookSecret(
        W.RotateWebhookSecretRequest(name=made.name), metadata=owner.metadata
    )
    for response in (made, got, listed, updated, rotated):
        assert leaks(secrets, response.SerializeToString()) == [], type(response)
    for hook in (made, got, listed.webhooks[0], updated, rotated):
        assert list(hook.header_names) == ["authorization", "x-team"]
        assert dict(hook.headers) == {}
    # Sent: the delivery carries both, with their values (the update kept them).
    sent = await delivered_headers(client, owner, made.name, rx)
    assert sent["authorization"] == TOKEN
    assert sent["x-team"] == OTHER


async def test_header_values_never_come_back_over_http(
    client: Client, http: httpx.AsyncClient, rx: Receiver
) -> None:
    owner = await client.new_user()
    made = await http.post(
        f"/v1/{owner.name}/webhooks",
        json={"url": rx.url(), "headers": {"Authorization": TOKEN, "X-Team": OTHER}},
        headers=auth(owner),
    )
    assert made.status_code == 200, made.text
    name = made.json()["name"]
    got = await http.get(f"/v1/{name}", headers=auth(owner))
    listed = await http.get(f"/v1/{owner.name}/webhooks", headers=auth(owner))
    # A read-modify-write of the whole resource, without a mask: the headers stay.
    whole = got.json()
    whole["description"] = "edited"
    patched = await http.patch(f"/v1/{name}", json=whole, headers=auth(owner))
    assert patched.status_code == 200, patched.text
    for response in (made, got, listed, patched):
        assert leaks((TOKEN, OTHER), response.text) == [], response.url
    for body in (made.json(), got.json(), listed.json()["webhooks"][0], patched.json()):
        assert body["headerNames"] == ["authorization", "x-team"]
        assert "headers" not in body  # input-only: never in a reply
    assert patched.json()["description"] == "edited"
    assert leaks((TOKEN, OTHER), repr(await raw_row(client.app, name))) == []
    sent = await delivered_headers(client, owner, name, rx)
    assert (sent["authorization"], sent["x-team"]) == (TOKEN, OTHER)


async def test_one_header_changes_without_resending_the_others(
    client: Client, http: httpx.AsyncClient, rx: Receiver
) -> None:
    owner = await client.new_user()
    made = await client.webhook(owner, rx.url(), headers={"Authorization": TOKEN, "X-Team": OTHER})
    # gRPC: set one by its map-key path; the other keeps its value unseen.
    await client.webhooks.UpdateWebhook(
        W.UpdateWebhookRequest(
            webhook=W.Webhook(name=made.name, headers={"Authorization": "Bearer rotated"}),
            update_mask=field_mask_pb2.FieldMask(paths=["headers.authorization"]),
        ),
        metadata=owner.metadata,
    )
    sent = await delivered_headers(client, owner, made.name, rx)
    assert (sent["authorization"], sent["x-team"]) == ("Bearer rotated", OTHER)
    # HTTP: add one (backquoted path) and remove another (named, not given).
    patched = await http.patch(
        f"/v1/{made.name}",
        params={"updateMask": "headers.`x-new`,headers.x-team"},
        json={"headers": {"x-new": "fresh"}},
        headers=auth(owner),
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["headerNames"] == ["authorization", "x-new"]
    sent = await delivered_headers(client, owner, made.name, rx)
    assert (sent["authorization"], sent["x-new"]) == ("Bearer rotated", "fresh")
    assert "x-team" not in sent
    # "headers" replaces them all.
    await client.webhooks.UpdateWebhook(
        W.UpdateWebhookRequest(
            webhook=W.Webhook(name=made.name, headers={"X-Only": "one"}),
            update_mask=field_mask_pb2.FieldMask(paths=["headers"]),
        ),
        metadata=owner.metadata,
    )
    got = await client.webhooks.GetWebhook(
        W.GetWebhookRequest(name=made.name), metadata=owner.metadata
    )
    assert list(got.header_names) == ["x-only"]


async def test_a_bad_header_path_names_the_mask(client: Client) -> None:
    owner = await client.new_user()
    made = await client.webhook(owner, "http://127.0.0.1:9/x")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.webhooks.UpdateWebhook(
            W.UpdateWebhookRequest(
                webhook=W.Webhook(name=made.name),
                update_mask=field_mask_pb2.FieldMask(paths=["headers.two words"]),
            ),
            metadata=owner.metadata,
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_rows_of_the_previous_release_are_read_and_then_sealed(
    client: Client, rx: Receiver
) -> None:
    """A row written in the clear (the release before migration 0008) keeps working, and
    the start-up pass seals it."""
    owner = await client.new_user()
    now = datetime.now(UTC)
    webhook_id = new_id("whk", now.timestamp())
    async with client.app.db.engine.begin() as conn:
        await conn.execute(
            tables.webhooks.insert().values(
                id=webhook_id,
                user_id=owner.id,
                url=rx.url(),
                description="",
                event_types=[],
                transform="",
                rate_limit=0,
                headers={"authorization": TOKEN},  # as the previous release wrote it
                disabled_reason="",
                secret=new_secret(),
                version=1,
                create_time=now,
                update_time=now,
            )
        )
    name = f"{owner.name}/webhooks/{webhook_id}"
    got = await client.webhooks.GetWebhook(W.GetWebhookRequest(name=name), metadata=owner.metadata)
    assert list(got.header_names) == ["authorization"]
    assert leaks((TOKEN,), got.SerializeToString()) == []
    assert (await delivered_headers(client, owner, name, rx))["authorization"] == TOKEN

    await seal_plain_headers(client.app.db)
    row = await raw_row(client.app, name)
    assert leaks((TOKEN,), repr(row)) == []
    assert row["sealed_headers"].startswith("sealed:v1:")
    assert (await delivered_headers(client, owner, name, rx))["authorization"] == TOKEN


async def test_sealed_headers_do_not_open_in_another_row(client: Client) -> None:
    """The seal is bound to its row: copied into another endpoint, it does not open."""
    owner = await client.new_user()
    first = await client.webhook(owner, "http://127.0.0.1:9/a", headers={"X-A": TOKEN})
    second = await client.webhook(owner, "http://127.0.0.1:9/b")
    sealed = (await raw_row(client.app, first.name))["sealed_headers"]
    async with client.app.db.engine.begin() as conn:
        await conn.execute(
            tables.webhooks.update()
            .where(tables.webhooks.c.id == second.name.rsplit("/", 1)[1])
            .values(sealed_headers=sealed)
        )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.webhooks.GetWebhook(
                W.GetWebhookRequest(name=second.name), metadata=owner.metadata
            )
        assert caught.value.code() is grpc.StatusCode.INTERNAL
        assert leaks((TOKEN,), caught.value.details() or "") == []
    finally:
        async with client.app.db.engine.begin() as conn:
            await conn.execute(
                tables.webhooks.update()
                .where(tables.webhooks.c.id == second.name.rsplit("/", 1)[1])
                .values(sealed_headers=None)
            )


# --- the SQLite file ----------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_sqlite_database_is_private_to_its_user(tmp_path: Path) -> None:
    data = tmp_path / "fresh" / "data"
    url = f"sqlite+aiosqlite:///{data / 'tunnelplane.db'}"
    await migrate(url)
    db = Database(url, clock=SystemClock())
    try:
        async with db() as uow:  # a write: the WAL and its index exist now
            await uow.webhooks.seal_plain_headers(1)
        files = [data / "tunnelplane.db", data / "tunnelplane.db-wal", data / "tunnelplane.db-shm"]
        assert {f.name: mode(f) for f in files if f.exists()} == {f.name: 0o600 for f in files}
        assert mode(data) == 0o700
    finally:
        await db.dispose()


async def test_a_world_readable_database_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    path.touch()
    path.chmod(0o644)
    await migrate(f"sqlite+aiosqlite:///{path}")
    assert mode(path) & 0o007 == 0


async def test_the_server_creates_its_default_database_privately(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", database_url="", redis_url="")
    app = App(settings)
    try:
        await app.db.ping()
        assert mode(tmp_path / "data" / "tunnelplane.db") == 0o600
        assert mode(tmp_path / "data") == 0o700
    finally:
        await app.close()
