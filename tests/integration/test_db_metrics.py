"""Database pool and query metrics and the slow-query log, on SQLite and on PostgreSQL:
scraped from the server's own metrics port after real calls."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from urllib.request import urlopen

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tunnelplane.v1 import users_pb2

from tests.conftest import Backend, own_server
from tests.helpers import Client


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_pool_and_query_metrics_and_the_slow_query_log(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tunnelplane.db")
    # Every statement is "slow" at a microsecond: each one is logged and counted.
    async with (
        own_server(backend, tmp_path, metrics_port=0, slow_query_ms=0.001) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        client = Client(app, channel)
        user = await client.new_user()
        for _ in range(3):
            await client.users.GetUser(
                users_pb2.GetUserRequest(name="users/me"), metadata=user.metadata
            )
        found = await asyncio.to_thread(scrape, app.metrics_port)

    primary = (("role", "primary"),)
    assert found["tunnelplane_db_pool_size", primary] >= 1
    assert found["tunnelplane_db_pool_checked_out", primary] >= 0
    assert ("tunnelplane_db_pool_overflow", primary) in found
    assert found["tunnelplane_db_pool_wait_seconds_count", primary] >= 3
    by_statement = {
        dict(labels)["statement"]: value
        for (name, labels), value in found.items()
        if name == "tunnelplane_db_query_duration_seconds_count"
    }
    assert by_statement["insert users"] >= 1  # the sign-up
    assert by_statement["select users"] >= 1
    slow = {
        dict(labels)["statement"]: value
        for (name, labels), value in found.items()
        if name == "tunnelplane_db_slow_queries_total"
    }
    assert slow["insert users"] == by_statement["insert users"]

    lines = [r for r in caplog.records if r.getMessage() == "slow query"]
    assert {r.statement for r in lines} >= {"insert users", "select users"}  # type: ignore[attr-defined]
    for record in lines:
        assert record.role == "primary"  # type: ignore[attr-defined]
        assert record.duration_ms >= 0  # type: ignore[attr-defined]
        assert user.email not in str(record.__dict__)  # never the parameters
