"""WebhookService and OperationService end to end, over gRPC and the HTTP gateway, against
real loopback receivers: endpoints and their secrets, Standard Webhooks signatures checked
by an independent implementation (the ``standardwebhooks`` package), filters, JMESPath
transformations, secret rotation, test sends, replays as operations, recovery, the
per-endpoint rate limit, and the SSRF rules of production mode."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, timestamp_pb2
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError
from tunnelplane.v1 import events_pb2, operations_pb2, tunnels_pb2, users_pb2, webhooks_pb2

from server.app import App
from server.domain.common.ids import new_id
from server.domain.identity.model import Tier
from server.domain.identity.tokens import generate_private_key_pem
from server.domain.webhooks.model import DisabledReason, Webhook
from server.domain.webhooks.rules import new_secret
from server.storage import tables
from server.storage.sealing import new_key
from tests.conftest import Backend, make_settings, own_database, own_server
from tests.helpers import (
    Client,
    TestUser,
    client_of,
    eventually,
    fails,
    http_of,
    reason,
    violations,
)
from tests.webhook_receiver import Receiver, Seen

W = webhooks_pb2
#: How early a rate-limited send may be taken (the dispatcher's slot slack, and more).
SLACK = 0.02
O = operations_pb2  # noqa: E741 - the module's short name, like W


@pytest_asyncio.fixture
async def rx() -> AsyncIterator[Receiver]:
    """A receiver of this test's own."""
    async with Receiver() as receiver:
        yield receiver


def auth(user: TestUser) -> dict[str, str]:
    """HTTP headers carrying the user's access token."""
    return {"authorization": f"Bearer {user.access_token}"}


def verified(secret: str, seen: Seen) -> dict[str, Any]:
    """The payload, once ``standardwebhooks`` has accepted its signature with ``secret``."""
    payload: dict[str, Any] = StandardWebhook(secret).verify(seen.body, seen.headers)
    return payload


async def deliveries(client: Client, owner: TestUser, name: str) -> list[W.WebhookDelivery]:
    """Every delivery of the endpoint ``name`` (newest first)."""
    found = await client.webhooks.ListWebhookDeliveries(
        W.ListWebhookDeliveriesRequest(parent=name, page_size=1000), metadata=owner.metadata
    )
    return list(found.deliveries)


async def events_of(client: Client, owner: TestUser) -> list[events_pb2.Event]:
    """The owner's events, newest first."""
    found = await client.events.ListEvents(
        events_pb2.ListEventsRequest(parent=owner.name, page_size=1000), metadata=owner.metadata
    )
    return list(found.events)


async def settled(client: Client, owner: TestUser, name: str) -> W.WebhookDelivery:
    """The delivery once its attempt is recorded (the receiver hears it a moment before)."""

    async def attempted() -> W.WebhookDelivery | None:
        got = await client.webhooks.GetWebhookDelivery(
            W.GetWebhookDeliveryRequest(name=name), metadata=owner.metadata
        )
        return got if got.attempts else None

    return await eventually(attempted, within=10)


# --- endpoints ---------------------------------------------------------------------------


async def test_the_secret_is_shown_on_create_only_and_reads_hide_it(
    client: Client, rx: Receiver
) -> None:
    owner = await client.new_user()
    made = await client.webhook(owner, rx.url(), description="orders", event_types=["tunnel.*"])
    assert made.secret.startswith("whsec_")
    assert len(made.secret) >= 6 + 32
    assert made.name.startswith(f"{owner.name}/webhooks/whk_")
    assert not made.disabled
    assert made.etag
    got = await client.webhooks.GetWebhook(
        W.GetWebhookRequest(name=made.name), metadata=owner.metadata
    )
    listed = await client.webhooks.ListWebhooks(
        W.ListWebhooksRequest(parent="users/me"), metadata=owner.metadata
    )
    assert got.secret == ""
    assert [w.secret for w in listed.webhooks] == [""]
    assert got.url == rx.url()
    assert list(got.event_types) == ["tunnel.*"]


async def test_secrets_are_sealed_at_rest(client: Client, rx: Receiver) -> None:
    owner = await client.new_user()
    made = await client.webhook(owner, rx.url())
    rotated = await client.webhooks.RotateWebhookSecret(
        W.RotateWebhookSecretRequest(name=made.name), metadata=owner.metadata
    )
    async with client.app.db.engine.connect() as conn:
        stored = (
            await conn.execute(
                sa.select(tables.webhooks.c.secret, tables.webhooks.c.previous_secret).where(
                    tables.webhooks.c.id == made.name.rsplit("/", 1)[1]
                )
            )
        ).one()
    for value in stored:
        assert value.startswith("sealed:v1:")
    assert made.secret not in "".join(stored)
    assert rotated.secret not in "".join(stored)
    await client.webhooks.TestWebhook(W.TestWebhookRequest(name=made.name), metadata=owner.metadata)
    (seen,) = rx.seen
    verified(rotated.secret, seen)
    verified(made.secret, seen)


async def test_a_retried_create_with_the_same_request_id_returns_the_same_endpoint(
    client: Client, rx: Receiver
) -> None:
    owner = await client.new_user()
    request = W.CreateWebhookRequest(
        parent=owner.name, webhook=W.Webhook(url=rx.url()), request_id="create-once"
    )
    first = await client.webhooks.CreateWebhook(request, metadata=owner.metadata)
    again = await client.webhooks.CreateWebhook(request, metadata=owner.metadata)
    assert again.name == first.name
    assert again.secret == first.secret
    listed = await client.webhooks.ListWebhooks(
        W.ListWebhooksRequest(parent=owner.name), metadata=owner.metadata
    )
    assert len(listed.webhooks) == 1


async def test_update_takes_a_mask_and_an_etag_and_delete_drops_the_history(
    client: Client, rx: Receiver
) -> None:
    owner = await client.new_user()
    made = await client.webhook(owner, rx.url())
    changed = await client.webhooks.UpdateWebhook(
        W.UpdateWebhookRequest(
            webhook=W.Webhook(
                name=made.name, description="new", url="http://ignored/", etag=made.etag
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        ),
        metadata=owner.metadata,
    )
    assert changed.description == "new"
    assert changed.url == rx.url()
    assert changed.etag != made.etag
    stale = await fails(
        client.webhooks.UpdateWebhook(
            W.UpdateWebhookRequest(
                webhook=W.Webhook(name=made.name, description="late", etag=made.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            ),
            metadata=owner.metadata,
        ),
        grpc.StatusCode.ABORTED,
    )
    assert reason(stale) == "ETAG_MISMATCH"
    await client.webhooks.TestWebhook(W.TestWebhookRequest(name=made.name), metadata=owner.metadata)
    await client.webhooks.DeleteWebhook(
        W.DeleteWebhookRequest(name=made.name), metadata=owner.metadata
    )
    await fails(
        client.webhooks.GetWebhook(W.GetWebhookRequest(name=made.name), metadata=owner.metadata),
        grpc.StatusCode.NOT_FOUND,
    )
    await fails(
        client.webhooks.ListWebhookDeliveries(
            W.ListWebhookDeliveriesRequest(parent=made.name), metadata=owner.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    webhook_id = made.name.rsplit("/", 1)[1]
    deliveries_table = tables.webhook_deliveries
    async with client.app.db.engine.connect() as conn:
        left = await conn.execute(
            sa.select(sa.func.count())
            .select_from(deliveries_table.join(tables.webhook_attempts))
            .where(deliveries_table.c.webhook_id == webhook_id)
        )
        assert left.scalar_one() == 0  # the test send's delivery and attempt went with it
        kept = await conn.execute(
            sa.select(sa.func.count())
            .select_from(deliveries_table)
            .where(deliveries_table.c.webhook_id == webhook_id)
        )
        assert kept.scalar_one() == 0


async def test_a_user_has_a_limited_number_of_endpoints(client: Client, rx: Receiver) -> None:
    owner = await client.new_user()
    limit = client.app.settings.webhook_max_per_user
    for _ in range(limit):
        await client.webhook(owner, rx.url())
    error = await fails(client.webhook(owner, rx.url()), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert reason(error) == "WEBHOOK_LIMIT"


async def test_endpoints_over_http_and_the_secret_in_json(
    client: Client, http: httpx.AsyncClient, rx: Receiver
) -> None:
    owner = await client.new_user()
    made = await http.post(
        f"/v1/{owner.name}/webhooks",
        json={"url": rx.url(), "eventTypes": ["user.*"], "headers": {"X-Team": "billing"}},
        headers=auth(owner),
    )
    assert made.status_code == 200, made.text
    body = made.json()
    assert body["secret"].startswith("whsec_")
    assert "headers" not in body  # write-only: the names are in headerNames
    assert body["headerNames"] == ["x-team"]
    patched = await http.patch(
        f"/v1/{body['name']}", json={"rateLimit": 5, "disabled": True}, headers=auth(owner)
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["rateLimit"] == 5
    assert patched.json()["disabledReason"] == "DISABLED_REASON_MANUAL"
    listed = await http.get(
        f"/v1/{owner.name}/webhooks",
        params={"filter": 'disabled_reason = "manual"'},
        headers=auth(owner),
    )
    assert [w["name"] for w in listed.json()["webhooks"]] == [body["name"]]
    bad = await http.post(
        f"/v1/{owner.name}/webhooks", json={"url": "ftp://x/"}, headers=auth(owner)
    )
    assert bad.status_code == 400
    fields = [v["field"] for d in bad.json()["details"] for v in d.get("fieldViolations", [])]
    assert fields == ["webhook.url"]


# --- delivery: signatures, payloads, filters, transformations --------------------------


async def test_events_arrive_signed_as_standard_webhooks_says(client: Client, rx: Receiver) -> None:
    owner = await client.new_user()
    hook = await client.webhook(
        owner, rx.url(), event_types=["tunnel.*"], headers={"X-Env": "test"}
    )
    tunnel = await client.tunnel(owner, "signed")
    (seen,) = await rx.wait_for(1)
    payload = verified(hook.secret, seen)
    assert payload["type"] == "tunnel.created"
    assert payload["data"]["subject"] == tunnel.name
    assert payload["data"]["actor"] == owner.name
    # The object carries the JSON API's names, as GET /v1/{tunnel} spells them.
    described = payload["data"]["object"]
    assert described["displayName"] == "signed"
    assert described["name"] == tunnel.name
    assert "activeEndpoint" in described
    assert not [key for key in described if "_" in key]
    (event,) = [e for e in await events_of(client, owner) if e.type == "tunnel.created"]
    assert seen.message_id == event.id
    sent_time = datetime.fromisoformat(payload["timestamp"].replace("Z", "+00:00"))
    assert abs(sent_time - event.create_time.ToDatetime(UTC)) < timedelta(milliseconds=1)
    assert abs(int(seen.headers["webhook-timestamp"]) - time.time()) < 60
    assert seen.headers["x-env"] == "test"
    assert seen.headers["content-type"] == "application/json"
    with pytest.raises(WebhookVerificationError):
        StandardWebhook("whsec_" + "A" * 43 + "=").verify(seen.body, seen.headers)
    (delivered,) = await deliveries(client, owner, hook.name)
    assert delivered.message_id == event.id
    assert delivered.event == event.name
    done = await settled(client, owner, delivered.name)
    assert done.state == W.WebhookDelivery.STATE_SUCCEEDED
    (attempt,) = done.attempts
    assert attempt.status_code == 200
    assert attempt.succeeded
    assert attempt.response_excerpt == "ok"
    # The delivery log is in the owner's audit trail, and in the metrics.
    activity = await client.users.ListActivity(
        users_pb2.ListActivityRequest(parent=owner.name, page_size=100), metadata=owner.metadata
    )
    delivered_log = [e for e in activity.entries if e.action == "webhook.deliver"]
    assert [e.resource for e in delivered_log] == [delivered.name]
    assert delivered_log[0].outcome == "OK"
    succeeded = client.app.registry.get_sample_value(
        "tunnelplane_webhook_deliveries_total", {"result": "succeeded"}
    )
    assert succeeded is not None
    assert succeeded >= 1
    latency = client.app.registry.get_sample_value("tunnelplane_webhook_attempt_seconds_count")
    assert latency is not None
    assert latency >= 1


async def test_filters_decide_in_the_events_own_transaction(client: Client, rx: Receiver) -> None:
    owner = await client.new_user()
    users_only = await client.webhook(owner, rx.url("/users"), event_types=["user.*"])
    created_only = await client.webhook(owner, rx.url("/created"), event_types=["tunnel.created"])
    everything = await client.webhook(owner, rx.url("/all"))
    tunnel = await client.tunnel(owner)
    await client.tunnels.StartTunnel(
        tunnels_pb2.StartTunnelRequest(name=tunnel.name), metadata=owner.metadata
    )
    # The outbox is written with each event: what is queued is known at once.
    assert await deliveries(client, owner, users_only.name) == []
    assert [d.event_type for d in await deliveries(client, owner, created_only.name)] == [
        "tunnel.created"
    ]
    kinds = {d.event_type for d in await deliveries(client, owner, everything.name)}
    assert {"tunnel.created", "tunnel.status_changed"} <= kinds
    await rx.wait_for(len(kinds) + 1)
    assert {s.json["type"] for s in rx.at("/created")} == {"tunnel.created"}
    assert rx.at("/users") == []


async def test_a_transformation_reshapes_data(client: Client, rx: Receiver) -> None:
    owner = await client.new_user()
    hook = await client.webhook(
        owner,
        rx.url(),
        event_types=["tunnel.created"],
        transform="{tunnel: data.subject, title: data.object.displayName, kind: type}",
    )
    tunnel = await client.tunnel(owner, "shaped")
    (seen,) = await rx.wait_for(1)
    payload = verified(hook.secret, seen)
    assert payload["type"] == "tunnel.created"
    # The transformation sees the whole payload, the object with the API's JSON names.
    assert payload["data"] == {"tunnel": tunnel.name, "title": "shaped", "kind": "tunnel.created"}


async def test_during_a_rotation_both_secrets_sign_for_a_day(client: Client, rx: Receiver) -> None:
    owner = await client.new_user()
    old = await client.webhook(owner, rx.url(), event_types=["tunnel.*"])
    rotated = await client.webhooks.RotateWebhookSecret(
        W.RotateWebhookSecretRequest(name=old.name), metadata=owner.metadata
    )
    assert rotated.secret.startswith("whsec_")
    assert rotated.secret != old.secret
    expires = rotated.previous_secret_expire_time.ToDatetime(UTC)
    assert abs((expires - datetime.now(UTC)) - timedelta(hours=24)) < timedelta(minutes=1)
    await client.tunnel(owner)
    (seen,) = await rx.wait_for(1)
    assert len(seen.headers["webhook-signature"].split()) == 2
    assert verified(rotated.secret, seen) == verified(old.secret, seen)


# --- test sends, replays, recovery ----------------------------------------------------


async def test_a_test_send_returns_its_attempt_over_grpc(client: Client, rx: Receiver) -> None:
    owner = await client.new_user()
    hook = await client.webhook(owner, rx.url(), event_types=["user.*"])
    sent = await client.webhooks.TestWebhook(
        W.TestWebhookRequest(name=hook.name), metadata=owner.metadata
    )
    assert sent.state == W.WebhookDelivery.STATE_SUCCEEDED
    assert sent.event_type == "webhook.test"
    (attempt,) = sent.attempts
    assert attempt.status_code == 200
    assert attempt.latency.ToTimedelta() > timedelta(0)
    (seen,) = rx.seen
    assert verified(hook.secret, seen) == {
        "type": "webhook.test",
        "timestamp": verified(hook.secret, seen)["timestamp"],
        "data": {"subject": hook.name, "actor": owner.name, "object": {"message": "test"}},
    }
    rx.script("/hook", 500)
    failed = await client.webhooks.TestWebhook(
        W.TestWebhookRequest(name=hook.name), metadata=owner.metadata
    )
    assert failed.state == W.WebhookDelivery.STATE_FAILED
    assert [a.status_code for a in failed.attempts] == [500]
    assert not failed.HasField("next_attempt_time")  # a test is never retried
    got = await client.webhooks.GetWebhook(
        W.GetWebhookRequest(name=hook.name), metadata=owner.metadata
    )
    assert not got.HasField("failing_since")  # nor does it count against the endpoint


async def test_a_test_send_over_http(client: Client, http: httpx.AsyncClient, rx: Receiver) -> None:
    owner = await client.new_user()
    hook = await client.webhook(owner, rx.url())
    response = await http.post(
        f"/v1/{hook.name}:test", json={"data": {"order": 7}}, headers=auth(owner)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "STATE_SUCCEEDED"
    assert body["attempts"][0]["statusCode"] == 200
    assert verified(hook.secret, rx.seen[0])["data"]["object"] == {"order": 7}


async def test_replaying_a_time_range_is_an_operation_over_http(
    client: Client, http: httpx.AsyncClient, rx: Receiver
) -> None:
    owner = await client.new_user(tier=Tier.PREMIUM)
    start = datetime.now(UTC) - timedelta(seconds=5)
    hook = await client.webhook(owner, rx.url(), event_types=["tunnel.created"])
    for _ in range(3):
        await client.tunnel(owner)
    first = await rx.wait_for(3)
    started = await http.post(
        f"/v1/{hook.name}:replay",
        json={"startTime": start.isoformat(), "requestId": "replay-1"},
        headers=auth(owner),
    )
    assert started.status_code == 200, started.text
    operation = started.json()
    assert operation["name"].startswith(f"{owner.name}/operations/opr_")
    assert operation["metadata"]["kind"] == "webhook.replay"
    # What the endpoint's filter takes: the 3 tunnels, not user.created or user.tier_changed.
    assert operation["metadata"]["total"] == "3"
    done = await poll_operation(http, owner, operation["name"])
    assert done["replayWebhookEvents"] == {"queued": "3"}
    assert done["metadata"]["processed"] == "3"
    again = await rx.wait_for(6)
    assert sorted(s.message_id for s in again[3:]) == sorted(s.message_id for s in first)
    retried = await http.post(
        f"/v1/{hook.name}:replay",
        json={"startTime": start.isoformat(), "requestId": "replay-1"},
        headers=auth(owner),
    )
    assert retried.json()["name"] == operation["name"]  # the same operation, not another
    listed = await http.get(f"/v1/{owner.name}/operations", headers=auth(owner))
    assert [o["name"] for o in listed.json()["operations"]] == [operation["name"]]


async def test_a_replay_counts_the_events_it_will_deliver(client: Client, rx: Receiver) -> None:
    owner = await client.new_user()
    start = datetime.now(UTC) - timedelta(seconds=5)
    hook = await client.webhook(owner, rx.url(), event_types=["tunnel.*"])
    made = [await client.tunnel(owner) for _ in range(2)]
    await client.tunnels.DeleteTunnel(
        tunnels_pb2.DeleteTunnelRequest(name=made[0].name), metadata=owner.metadata
    )
    await rx.wait_until(
        lambda seen: (
            sorted(s.json["type"] for s in seen)
            == ["tunnel.created", "tunnel.created", "tunnel.deleted"]
        )
    )
    started = await client.webhooks.ReplayWebhookEvents(
        W.ReplayWebhookEventsRequest(
            name=hook.name, start_time=stamp(start), event_types=["tunnel.created"]
        ),
        metadata=owner.metadata,
    )
    # user.created is outside the endpoint's filter, tunnel.deleted outside the replay's.
    assert started.metadata.total == 2
    done = await finished(client, owner, started.name)
    assert done.replay_webhook_events.queued == 2
    assert (done.metadata.processed, done.metadata.total) == (2, 2)


def stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """``moment`` as a Timestamp."""
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(moment)
    return value


async def get_operation(client: Client, owner: TestUser, name: str) -> O.Operation:
    """The operation as GetOperation returns it."""
    return await client.operations.GetOperation(
        O.GetOperationRequest(name=name), metadata=owner.metadata
    )


async def finished(client: Client, owner: TestUser, name: str) -> O.Operation:
    """GetOperation until it is done (the runner works in the background)."""

    async def done() -> O.Operation | None:
        got = await get_operation(client, owner, name)
        return got if got.done else None

    return await eventually(done, within=20, every=0.05)


async def poll_operation(http: httpx.AsyncClient, owner: TestUser, name: str) -> dict[str, Any]:
    """GetOperation over HTTP until it is done (the runner works in the background)."""

    async def done() -> dict[str, Any] | None:
        got = await http.get(f"/v1/{name}", headers=auth(owner))
        assert got.status_code == 200, got.text
        return dict(got.json()) if got.json().get("done") else None

    return await eventually(done, within=20, every=0.05)


async def test_replaying_one_event_over_grpc(client: Client, rx: Receiver) -> None:
    owner = await client.new_user()
    hook = await client.webhook(owner, rx.url(), event_types=["tunnel.created"])
    await client.tunnel(owner)
    (first,) = await rx.wait_for(1)
    user_created = next(e for e in await events_of(client, owner) if e.type == "user.created")
    for event in (first.message_id, user_created.id):
        operation = await client.webhooks.ReplayWebhookEvents(
            W.ReplayWebhookEventsRequest(name=hook.name, event=f"{owner.name}/events/{event}"),
            metadata=owner.metadata,
        )
        assert operation.metadata.total == 1
    seen = await rx.wait_for(3)
    # One event is replayed even when the endpoint's filter would not have matched it.
    assert sorted(s.message_id for s in seen[1:]) == sorted([first.message_id, user_created.id])
    again = next(s for s in seen[1:] if s.message_id == first.message_id)
    assert again.body == first.body
    await fails(
        client.webhooks.ReplayWebhookEvents(
            W.ReplayWebhookEventsRequest(
                name=hook.name, event=f"{owner.name}/events/evt_01jd3k0000000000000000000a"
            ),
            metadata=owner.metadata,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await fails(
        client.operations.GetOperation(
            O.GetOperationRequest(name=f"{owner.name}/operations/opr_01jd3k0000000000000000000a"),
            metadata=owner.metadata,
        ),
        grpc.StatusCode.NOT_FOUND,
    )


@pytest_asyncio.fixture
async def api_only(backend: Backend, tmp_path: Path) -> AsyncIterator[App]:
    """A replica that runs no operations (``TP_RUN_OPERATIONS=false``), on a database of its
    own: an operation it starts waits until a test steps a runner by hand."""
    async with own_server(backend, tmp_path, run_operations=False) as server:
        yield server


async def test_a_replay_cancelled_before_it_runs_queues_nothing_over_http(
    api_only: App, rx: Receiver
) -> None:
    async with client_of(api_only) as client, http_of(api_only) as http:
        owner = await client.new_user()
        start = datetime.now(UTC) - timedelta(seconds=5)
        hook = await client.webhook(owner, rx.url(), event_types=["tunnel.created"])
        await client.tunnel(owner)
        await rx.wait_for(1)
        started = await http.post(
            f"/v1/{hook.name}:replay", json={"startTime": start.isoformat()}, headers=auth(owner)
        )
        name = started.json()["name"]
        cancelled = await http.post(f"/v1/{name}:cancel", json={}, headers=auth(owner))
        assert cancelled.status_code == 200, cancelled.text
        body = cancelled.json()
        assert body["done"] is True
        assert body["error"]["code"] == 1  # CANCELLED
        again = await http.post(f"/v1/{name}:cancel", json={}, headers=auth(owner))
        assert again.json() == body  # a finished operation stays as it is
        # A runner finds nothing to do: no step ran, no delivery was queued again.
        assert await api_only.operations.runner.run_once() is False
        operation = await client.operations.GetOperation(
            O.GetOperationRequest(name=name), metadata=owner.metadata
        )
        assert operation.metadata.processed == 0
        assert len(await deliveries(client, owner, hook.name)) == 1


async def test_events_missed_while_disabled_are_recovered_over_http(
    client: Client, http: httpx.AsyncClient, rx: Receiver
) -> None:
    owner = await client.new_user()
    since = datetime.now(UTC) - timedelta(seconds=5)
    hook = await client.webhook(owner, rx.url(), event_types=["tunnel.*"], disabled=True)
    await client.tunnel(owner)
    (missed,) = await deliveries(client, owner, hook.name)
    assert missed.state == W.WebhookDelivery.STATE_FAILED
    assert not missed.attempts
    refused = await http.post(
        f"/v1/{hook.name}:recover", json={"startTime": since.isoformat()}, headers=auth(owner)
    )
    assert refused.status_code == 400
    assert refused.json()["details"][0]["reason"] == "WEBHOOK_DISABLED"
    enabled = await http.patch(f"/v1/{hook.name}", json={"disabled": False}, headers=auth(owner))
    assert enabled.json()["disabled"] is False
    recovered = await http.post(
        f"/v1/{hook.name}:recover", json={"startTime": since.isoformat()}, headers=auth(owner)
    )
    assert recovered.status_code == 200, recovered.text
    assert recovered.json() == {"recovered": "1"}
    (seen,) = await rx.wait_for(1)
    assert seen.message_id == missed.message_id

    async def succeeded() -> list[W.WebhookDelivery]:
        filtered = await client.webhooks.ListWebhookDeliveries(
            W.ListWebhookDeliveriesRequest(parent=hook.name, filter='state = "succeeded"'),
            metadata=owner.metadata,
        )
        return list(filtered.deliveries)

    delivered = await eventually(succeeded, within=10, every=0.05)
    assert [d.message_id for d in delivered] == [missed.message_id]


# --- the per-endpoint rate limit -----------------------------------------------------


async def test_the_rate_limit_spaces_deliveries(client: Client, rx: Receiver) -> None:
    owner = await client.new_user(tier=Tier.PREMIUM)
    hook = await client.webhook(owner, rx.url(), event_types=["tunnel.created"], rate_limit=5)
    for _ in range(6):
        await client.tunnel(owner)
    await rx.wait_for(6)
    queued = await deliveries(client, owner, hook.name)
    sent = sorted(
        [(await settled(client, owner, d.name)).attempts[0].time.ToDatetime() for d in queued]
    )
    # Five a second: each send waits for its turn, 0.2 s after the one before (a turn
    # may only come late, on a busy machine, never early). The times are the dispatcher's
    # own, taken when it sends; arrival times would add the network's jitter.
    offsets = [(t - sent[0]).total_seconds() for t in sent]
    assert all(offset >= 0.2 * i - SLACK for i, offset in enumerate(offsets)), offsets


# --- production rules: https only, public addresses only -----------------------------


@pytest_asyncio.fixture(scope="module")
async def production(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[App]:
    """A server in production mode, on a database of its own."""
    directory = tmp_path_factory.mktemp("production")
    async with own_database(backend, directory) as isolated:
        settings = make_settings(
            directory,
            database_url=isolated.database_url,
            redis_url=isolated.redis_url,
            redis_prefix=isolated.redis_prefix,
            mode="production",
            jwt_private_key=generate_private_key_pem().decode(),
            page_token_secret="s" * 40,
            secrets_key=new_key(),
            webhook_timeout=2.0,
            # The test's calls stand for calls through a TLS-terminating proxy on loopback.
            grpc_tls_proxies="127.0.0.1/32",
        )
        server = App(settings)
        await server.start()
        yield server
        await server.stop(grace=0)


class ThroughTlsProxy(grpc.aio.UnaryUnaryClientInterceptor):
    """Marks every call as a declared TLS proxy marks what it forwards."""

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        metadata = [*(client_call_details.metadata or ()), ("x-forwarded-proto", "https")]
        return await continuation(client_call_details._replace(metadata=metadata), request)


async def test_production_refuses_plain_http_and_private_addresses(
    production: App, rx: Receiver
) -> None:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{production.grpc_port}", interceptors=[ThroughTlsProxy()]
    ) as channel:
        client = Client(production, channel)
        owner = await client.new_user()
        error = await fails(client.webhook(owner, rx.url()), grpc.StatusCode.INVALID_ARGUMENT)
        assert violations(error) == {"webhook.url": "must use https"}
        private = (
            f"https://127.0.0.1:{rx.port}/hook",
            f"https://localhost:{rx.port}/hook",
            f"https://[::1]:{rx.port}/hook",
            f"https://[::ffff:127.0.0.1]:{rx.port}/hook",
            "https://10.0.0.1/hook",
            "https://169.254.169.254/latest/meta-data",
        )
        for url in private:
            refused = await fails(client.webhook(owner, url), grpc.StatusCode.INVALID_ARGUMENT)
            assert "webhook.url" in violations(refused), url
        # A name whose answer changes after the check (DNS rebinding) is caught when it is
        # dialled: the stored URL below stands for such a name.
        for url in private:
            hook = await stored_webhook(production, owner, url)
            sent = await client.webhooks.TestWebhook(
                W.TestWebhookRequest(name=hook), metadata=owner.metadata
            )
            (attempt,) = sent.attempts
            assert attempt.error == "address not allowed", (url, attempt)
            assert attempt.status_code == 0
        assert rx.seen == []


async def stored_webhook(app: App, owner: TestUser, url: str) -> str:
    """An endpoint written straight to storage, past the API's checks; its name."""
    now = datetime.now(UTC)
    webhook = Webhook(
        id=new_id("whk"),
        user_id=owner.id,
        url=url,
        description="",
        event_types=(),
        transform="",
        rate_limit=0,
        headers={},
        disabled_reason=DisabledReason.NONE,
        secret=new_secret(),
        previous_secret=None,
        previous_secret_expire_time=None,
        failing_since=None,
        version=1,
        create_time=now,
        update_time=now,
    )
    async with app.db() as uow:
        await uow.webhooks.add(webhook)
    return webhook.name
