"""Circuit breakers as operators see them: ``GetSystemStatus`` lists every breaker that is
not closed, ``ResetCircuitBreaker`` closes one, over gRPC and HTTP, audited with the
reason and the state before and after."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import grpc
import sqlalchemy as sa
from tunnelplane.v1 import admin_pb2

from server.app import App
from server.domain.identity.model import Role
from server.storage.tables import audit_log
from tests.conftest import sqlite_server
from tests.helpers import client_of, fails, http_of

STATUS = admin_pb2.GetSystemStatusRequest()


async def open_breaker(app: App, target: str) -> None:
    for _ in range(app.settings.breaker_threshold):
        with contextlib.suppress(ConnectionError):
            async with app.infra.breakers.guard("webhook", target):
                raise ConnectionError


async def test_status_lists_open_breakers_and_an_admin_resets_them(tmp_path: Path) -> None:
    async with sqlite_server(tmp_path, breaker_threshold=2) as app, client_of(app) as client:
        admin = await client.new_user(role=Role.SUPER_ADMIN, tag="admin")
        before = await client.admin.GetSystemStatus(STATUS, metadata=admin.metadata)
        assert list(before.circuit_breakers) == []

        await open_breaker(app, "whk_one")
        await open_breaker(app, "whk_two")
        status = await client.admin.GetSystemStatus(STATUS, metadata=admin.metadata)
        assert [(b.name, b.kind, b.state, b.failures) for b in status.circuit_breakers] == [
            ("circuitBreakers/webhook.whk_one", "webhook", "opened", 2),
            ("circuitBreakers/webhook.whk_two", "webhook", "opened", 2),
        ]
        assert all(b.HasField("open_time") for b in status.circuit_breakers)
        assert status.state == "SERVING"  # a receiver that is down is not the server's

        reset = await client.admin.ResetCircuitBreaker(
            admin_pb2.ResetCircuitBreakerRequest(
                name="circuitBreakers/webhook.whk_one", reason="receiver redeployed"
            ),
            metadata=(*admin.metadata, ("x-request-id", "reset-one")),
        )
        assert (reset.name, reset.state, reset.failures) == (
            "circuitBreakers/webhook.whk_one",
            "closed",
            0,
        )
        async with app.db.engine.connect() as conn:
            (entry,) = (
                await conn.execute(
                    sa.select(audit_log).where(audit_log.c.request_id == "reset-one")
                )
            ).mappings()
        details = entry["details"]
        details = json.loads(details) if isinstance(details, str) else details
        assert entry["resource"] == "circuitBreakers/webhook.whk_one"
        assert (details["reason"], details["before"], details["after"]) == (
            "receiver redeployed",
            "opened",
            "closed",
        )

        async with http_of(app) as http:
            auth = {"authorization": admin.metadata[0][1]}
            listed = (await http.get("/v1/system/status", headers=auth)).json()
            assert [b["name"] for b in listed["circuitBreakers"]] == [
                "circuitBreakers/webhook.whk_two"
            ]
            closed = await http.post(
                "/v1/circuitBreakers/webhook.whk_two:reset", headers=auth, json={"reason": "ok"}
            )
            assert closed.status_code == 200
            assert closed.json()["state"] == "closed"
            missing = await http.post(
                "/v1/circuitBreakers/webhook.nowhere:reset", headers=auth, json={}
            )
            assert missing.status_code == 404
        after = await client.admin.GetSystemStatus(STATUS, metadata=admin.metadata)
        assert list(after.circuit_breakers) == []

        user = await client.new_user()
        await fails(
            client.admin.ResetCircuitBreaker(
                admin_pb2.ResetCircuitBreakerRequest(name="circuitBreakers/webhook.whk_two"),
                metadata=user.metadata,
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
