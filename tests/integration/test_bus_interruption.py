"""A watch stream follows the event log, with the bus only waking it: two replicas on one
PostgreSQL and a Redis of the test's own, which dies and comes back while a watcher stays
connected to one replica and the other writes. The watcher gets every change, in the log's
order, on the same stream: what the other replica wrote while Redis was away comes with
the next change this replica hears of, or when its bus subscribes again."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from tunnelplane.v1 import tunnels_pb2, tunnels_pb2_grpc

from server.domain.identity.tokens import generate_private_key_pem
from server.storage.bus import RedisBus
from server.storage.sealing import new_key
from tests.conftest import make_settings, migrate, require_redis, started
from tests.helpers import Client, free_port
from tests.processes import redis_server

pytestmark = pytest.mark.slow
W = tunnels_pb2.WatchTunnelsResponse


async def test_a_watcher_gets_what_another_replica_wrote_while_redis_was_away(
    postgres_database: str, tmp_path: Path
) -> None:
    require_redis()
    await migrate(postgres_database)
    port = free_port()
    shared = {
        "database_url": postgres_database,
        "redis_url": f"redis://127.0.0.1:{port}/0",
        "jwt_private_key": generate_private_key_pem().decode(),
        "page_token_secret": "p" * 40,
        "secrets_key": new_key(),
        "redis_prefix": "tp:",  # its own Redis
        "health_interval": 0.1,
    }
    redis = contextlib.AsyncExitStack()
    await redis.enter_async_context(redis_server(port))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        async with (
            started(make_settings(tmp_path / "a", **shared)) as a,
            started(make_settings(tmp_path / "b", **shared)) as b,
            grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}") as to_a,
            grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc_port}") as to_b,
        ):
            on_a, on_b = Client(a, to_a), Client(b, to_b)
            user = await on_a.new_user()
            stream = tunnels_pb2_grpc.TunnelServiceStub(to_a).WatchTunnels(
                tunnels_pb2.WatchTunnelsRequest(name="users/me"), metadata=user.metadata
            )

            async def next_change() -> W:
                while True:
                    message = await asyncio.wait_for(stream.read(), 10)
                    assert message is not grpc.aio.EOF
                    if message.kind == W.KIND_CHANGED:
                        return message

            while (await asyncio.wait_for(stream.read(), 10)).kind != W.KIND_SYNCED:
                pass
            for app in (a, b):
                assert isinstance(app.events.bus, RedisBus)
                await app.events.bus.wait_connected()
            first = await on_b.tunnel(user, "first")  # through Redis
            assert (await next_change()).tunnel.name == first.name

            await redis.aclose()  # Redis dies: B's writes reach A's watcher by no bus
            away = await on_b.tunnel(user, "away")
            here = await on_a.tunnel(user, "here")  # heard on A, which reads the log
            assert [(await next_change()).tunnel.name for _ in range(2)] == [away.name, here.name]

            await on_b.tunnels.UpdateTunnel(  # nothing on A wakes the watcher...
                tunnels_pb2.UpdateTunnelRequest(
                    tunnel=tunnels_pb2.Tunnel(name=first.name, description="later"),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                ),
                metadata=user.metadata,
            )
            await redis.enter_async_context(redis_server(port))
            # ...until A's bus subscribes again.
            later = await next_change()
            assert (later.tunnel.name, later.tunnel.description) == (first.name, "later")
            stream.cancel()
    finally:
        await redis.aclose()
