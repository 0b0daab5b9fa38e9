"""ListAuditEntries and ExportAuditEntries over gRPC and HTTP on both databases: an
auditor finds admin actions by action, actor, subject and time, pages through them, and
exports a time range as NDJSON; the export is itself audited."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import grpc
import httpx
from tunnelplane.v1 import audit_pb2, users_pb2

from server.domain.identity.model import Role, Tier
from tests.helpers import Client, fails, reason, violations

A = audit_pb2
U = users_pb2


async def test_an_auditor_finds_pages_and_exports_admin_actions(
    client: Client, http: httpx.AsyncClient
) -> None:
    support = await client.new_user(role=Role.SUPPORT_ADMIN, tag="support")
    users = [await client.new_user() for _ in range(3)]
    since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    for user in users:
        await client.users.SuspendUser(
            users_pb2.SuspendUserRequest(name=user.name, reason=f"case {user.id}"),
            metadata=support.metadata,
        )
    mine = f'action = "users.suspend_user" AND actor = "{support.id}"'

    listed = await client.audit.ListAuditEntries(
        A.ListAuditEntriesRequest(filter=mine), metadata=support.metadata
    )
    assert [e.subject for e in listed.entries] == [u.name for u in reversed(users)]  # newest first
    first = listed.entries[0]
    assert first.actor == support.name
    assert first.details["reason"] == f"case {users[-1].id}"
    assert (first.details["state_from"], first.details["state_to"]) == ("active", "suspended")
    assert first.hash
    assert first.chain_sequence > 0

    # One subject, and pages of one.
    one = await client.audit.ListAuditEntries(
        A.ListAuditEntriesRequest(filter=f'{mine} AND subject = "{users[0].id}"'),
        metadata=support.metadata,
    )
    assert [e.subject for e in one.entries] == [users[0].name]
    page = await client.audit.ListAuditEntries(
        A.ListAuditEntriesRequest(filter=mine, page_size=1), metadata=support.metadata
    )
    rest = await client.audit.ListAuditEntries(
        A.ListAuditEntriesRequest(filter=mine, page_size=5, page_token=page.next_page_token),
        metadata=support.metadata,
    )
    assert [e.name for e in page.entries] + [e.name for e in rest.entries] == [
        e.name for e in listed.entries
    ]

    # Export, oldest first: a gRPC stream and NDJSON over HTTP say the same.
    bounded = f'{mine} AND create_time >= "{since}"'
    streamed = [
        e.name
        async for e in client.audit.ExportAuditEntries(
            A.ExportAuditEntriesRequest(filter=bounded), metadata=support.metadata
        )
    ]
    assert streamed == [e.name for e in reversed(listed.entries)]
    headers = {"authorization": f"Bearer {support.access_token}", "accept": "application/x-ndjson"}
    answer = await http.get("/v1/audit/entries:export", params={"filter": bounded}, headers=headers)
    assert answer.status_code == 200, answer.text
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert [line["result"]["name"] for line in lines] == streamed

    # An export names its time range; and each export is audited.
    refused = await fails(
        client.audit.ListAuditEntries(
            A.ListAuditEntriesRequest(filter="nonsense ="), metadata=support.metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "filter" in violations(refused)
    unbounded = client.audit.ExportAuditEntries(
        A.ExportAuditEntriesRequest(filter=mine), metadata=support.metadata
    )
    assert "filter" in violations(await fails(_first(unbounded), grpc.StatusCode.INVALID_ARGUMENT))
    exports = await client.audit.ListAuditEntries(
        A.ListAuditEntriesRequest(
            filter=f'action = "audit.export_audit_entries" AND actor = "{support.id}"'
        ),
        metadata=support.metadata,
    )
    # gRPC and HTTP, then the unbounded one, refused (newest first).
    assert [e.outcome for e in exports.entries] == ["INVALID_ARGUMENT", "OK", "OK"]
    assert [e.details["filter"] for e in exports.entries[1:]] == [bounded, bounded]


async def _first(stream: object) -> object:
    async for message in stream:  # type: ignore[attr-defined]
        return message
    return None


async def test_an_enterprise_user_exports_their_own_activity(
    client: Client, http: httpx.AsyncClient
) -> None:
    since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    customer = await client.new_user(tier=Tier.ENTERPRISE)
    await client.login(customer.email)
    bounded = f'create_time >= "{since}"'
    request = U.ExportActivityRequest(parent="users/me", filter=bounded)
    streamed = [e async for e in client.users.ExportActivity(request, metadata=customer.metadata)]
    # Oldest first, this export's own entry last (it is written before the first goes out).
    assert [e.action for e in streamed] == [
        "auth.register",
        "auth.login",
        "auth.login",
        "users.export_activity",
    ]
    assert all(e.name.startswith(f"{customer.name}/activity/") for e in streamed)
    headers = {"authorization": f"Bearer {customer.access_token}", "accept": "application/x-ndjson"}
    answer = await http.get(
        "/v1/users/me/activity:export", params={"filter": bounded}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    lines = [json.loads(line)["result"] for line in answer.text.splitlines()]
    assert [line["name"] for line in lines][: len(streamed)] == [e.name for e in streamed]

    # The feature is the enterprise tier's; the filter must bound the time.
    free = await client.new_user()
    refused = await fails(
        _first(
            client.users.ExportActivity(
                U.ExportActivityRequest(parent="users/me", filter=bounded), metadata=free.metadata
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason(refused) == "TIER_TOO_LOW"
    unbounded = client.users.ExportActivity(
        U.ExportActivityRequest(parent="users/me", filter='action = "auth.login"'),
        metadata=customer.metadata,
    )
    assert "filter" in violations(await fails(_first(unbounded), grpc.StatusCode.INVALID_ARGUMENT))
