"""Prometheus metrics on their own port, with the standard gRPC names."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.request import urlopen

import grpc
from tunnelplane.v1 import users_pb2

from server.app import App
from tests.conftest import make_settings
from tests.helpers import Client, fails


def scrape(port: int) -> str:
    return urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


async def test_metrics_count_calls_by_method_and_code(tmp_path: Path) -> None:
    from tests.conftest import migrate

    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await migrate(url)
    server = App(make_settings(tmp_path, database_url=url, metrics_port=0))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            client = Client(server, channel)
            await client.register()
            await fails(
                client.users.GetUser(users_pb2.GetUserRequest(name="users/me")),
                grpc.StatusCode.UNAUTHENTICATED,
            )
        text = await asyncio.to_thread(scrape, server.metrics_port)
    finally:
        await server.stop(grace=0)
    labels = 'grpc_method="{}",grpc_service="tunnelplane.v1.{}",grpc_type="unary"'
    register = labels.format("Register", "AuthService")
    get_user = labels.format("GetUser", "UserService")
    assert f"grpc_server_started_total{{{register}}} 1.0" in text
    assert f'grpc_server_handled_total{{grpc_code="OK",{register}}} 1.0' in text
    assert f'grpc_server_handled_total{{grpc_code="UNAUTHENTICATED",{get_user}}} 1.0' in text
    assert f'grpc_server_handling_seconds_count{{grpc_code="OK",{register}}} 1.0' in text
    # Labels stay low-cardinality: no user ids, request ids or emails.
    assert "usr_" not in text
    assert "@example.com" not in text
