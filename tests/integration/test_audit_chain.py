"""The audit log's hash chain and its guard, on both databases, with a server of its own:
every audited call joins its day's chain; VerifyAuditLog (gRPC and HTTP) finds it intact;
an entry changed, removed from the middle or from the end is found, with where and what;
a purged user's entries are erased in place and the chain still holds. On PostgreSQL the
application cannot UPDATE, DELETE or TRUNCATE the log (a trigger); the tampering below is
what someone who can switch the trigger off could do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import sqlalchemy as sa
from tunnelplane.v1 import audit_pb2, audit_pb2_grpc, users_pb2

from server.app import App
from server.domain.identity.model import Role
from tests.conftest import REDIS_URL, Backend, own_server, redis_prefix, require_redis
from tests.helpers import Client, TestUser, client_of, fails, http_of

pytestmark = pytest.mark.slow
VERIFY = audit_pb2.VerifyAuditLogRequest()


@pytest_asyncio.fixture
async def server(backend: Backend, tmp_path: Path) -> AsyncIterator[App]:
    async with own_server(backend, tmp_path) as started:
        yield started


async def verify(client: Client, auditor: TestUser) -> audit_pb2.AuditVerification:
    stub = audit_pb2_grpc.AuditServiceStub(client.channel)
    return await stub.VerifyAuditLog(VERIFY, metadata=auditor.metadata)


async def execute(app: App, statement: str, **params: object) -> int:
    """Run SQL as a superuser of the database would, past the trigger on PostgreSQL."""
    async with app.db.engine.begin() as conn:
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            await conn.execute(
                sa.text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
            )
        result = await conn.execute(sa.text(statement), params)
        if postgres:
            await conn.execute(
                sa.text("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")
            )
        return int(result.rowcount or 0)


async def nth_entry(app: App, seq: int) -> str:
    async with app.db.engine.connect() as conn:
        found = await conn.execute(
            sa.text("SELECT id FROM audit_log WHERE chain_seq = :seq ORDER BY chain_day DESC"),
            {"seq": seq},
        )
        return str(found.scalars().first())


async def test_the_chain_holds_and_every_kind_of_tampering_is_found(server: App) -> None:
    async with client_of(server) as client, http_of(server) as http:
        auditor = await client.new_user(role=Role.SUPPORT_ADMIN, tag="auditor")
        for _ in range(3):
            user = await client.new_user()
            await client.login(user.email)
        # Intact, over both transports.
        found = await verify(client, auditor)
        assert found.intact, found
        assert found.entries_checked >= 8  # registrations and sign-ins
        assert found.days_checked == 1
        answer = await http.post(
            "/v1/audit:verify", json={}, headers={"authorization": f"Bearer {auditor.access_token}"}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["intact"] is True

        # One entry's content changed: found at that entry.
        third = await nth_entry(server, 3)
        assert (
            await execute(
                server, "UPDATE audit_log SET outcome = 'OK', reason = 'x' WHERE id = :id", id=third
            )
            == 1
        )
        broken = await verify(client, auditor)
        assert not broken.intact
        assert (broken.first_break.entry_id, broken.first_break.sequence) == (third, 3)
        assert broken.first_break.problem == "its content was changed"


async def test_a_removed_entry_is_found_whether_in_the_middle_or_at_the_end(server: App) -> None:
    async with client_of(server) as client:
        auditor = await client.new_user(role=Role.SUPPORT_ADMIN, tag="auditor")
        await client.new_user()
        last = (await verify(client, auditor)).entries_checked
        tail = await nth_entry(server, int(last))
        await execute(server, "DELETE FROM audit_log WHERE id = :id", id=tail)
        at_end = await verify(client, auditor)
        assert at_end.first_break.problem == "the chain ends before its head"
        second = await nth_entry(server, 2)
        await execute(server, "DELETE FROM audit_log WHERE id = :id", id=second)
        middle = await verify(client, auditor)
        assert middle.first_break.problem == "entry 2 is missing"
        assert middle.first_break.sequence == 3


async def test_a_purged_users_entries_are_erased_in_place_and_the_chain_holds(server: App) -> None:
    async with client_of(server) as client:
        auditor = await client.new_user(role=Role.SUPPORT_ADMIN, tag="auditor")
        user = await client.new_user()
        await client.users.DeleteUser(
            users_pb2.DeleteUserRequest(name="users/me", purge=True), metadata=user.metadata
        )
        async with server.db.engine.connect() as conn:
            rows = (
                await conn.execute(sa.text("SELECT ip_address, erased FROM audit_log WHERE erased"))
            ).all()
        assert rows
        assert all(ip == "" for ip, _ in rows)
        assert (await verify(client, auditor)).intact


async def test_the_application_cannot_change_or_remove_entries_on_postgres(
    postgres_database: str, tmp_path: Path
) -> None:
    require_redis()
    postgres = Backend("postgres", postgres_database, REDIS_URL, redis_prefix())
    async with own_server(postgres, tmp_path) as server:
        async with client_of(server) as client:
            await client.new_user()
        for statement in (
            "UPDATE audit_log SET outcome = 'OK'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
            "UPDATE audit_log SET erased = true, ip_address = '', user_agent = '', hash = 'x'",
        ):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"):
                async with server.db.engine.begin() as conn:
                    await conn.execute(sa.text(statement))


async def test_only_auditors_verify(server: App) -> None:
    async with client_of(server) as client:
        user = await client.new_user()
        stub = audit_pb2_grpc.AuditServiceStub(client.channel)
        await fails(
            stub.VerifyAuditLog(VERIFY, metadata=user.metadata), grpc.StatusCode.PERMISSION_DENIED
        )
