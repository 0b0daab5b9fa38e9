"""The tunnel cache behind the proxies' questions (``CheckTunnelAccess``): repeated
lookups are served from memory, and a change is seen at once, on the replica that made it
and, through the event bus in Redis, on another replica whose entry would otherwise live
for a minute."""

from __future__ import annotations

from pathlib import Path

import grpc
from tunnelplane.v1 import tunnels_pb2

from server.app import App
from server.settings import Settings
from tests.conftest import REDIS_URL, migrate, require_redis, sqlite_server
from tests.helpers import Client, client_of, eventually
from tests.integration.test_tunnel_basic_access import (
    SECRET,
    USER,
    D,
    basic_tunnel,
    check,
    said,
)
from tests.processes import replica_envs, serving

P = tunnels_pb2


def lookups(app: App, result: str) -> float:
    value = app.registry.get_sample_value(
        "tunnelplane_cache_requests_total", {"cache": "tunnels", "result": result}
    )
    return value or 0.0


async def test_lookups_are_cached_and_a_change_is_seen_at_once(tmp_path: Path) -> None:
    async with sqlite_server(tmp_path, cache_ttl=60.0) as app, client_of(app) as client:
        owner = await client.new_user()
        tunnel = await basic_tunnel(client, owner)
        misses, hits = lookups(app, "miss"), lookups(app, "hit")
        for _ in range(5):
            assert said(await check(client, tunnel, USER, SECRET))[0]
        assert lookups(app, "miss") == misses + 1
        assert lookups(app, "hit") == hits + 4

        await client.tunnels.StopTunnel(
            P.StopTunnelRequest(name=tunnel.name), metadata=owner.metadata
        )
        stopped = await check(client, tunnel, USER, SECRET)
        assert said(stopped) == (False, D.REFUSAL_NOT_RUNNING, tunnel.name, True)

        # Absent tunnels are cached too.
        unknown = tunnel.name.rsplit("/", 1)[1][:-4] + "zzzz"
        before = lookups(app, "miss")
        for _ in range(3):
            assert not (await check(client, unknown)).allowed
        assert lookups(app, "miss") == before + 1


async def test_a_change_on_one_replica_reaches_the_others_cache(
    postgres_database: str, tmp_path: Path
) -> None:
    require_redis()
    await migrate(postgres_database)
    env_a, env_b = replica_envs(postgres_database, REDIS_URL, tmp_path)
    env_a["TP_CACHE_TTL"] = env_b["TP_CACHE_TTL"] = "60"
    async with serving(env_a) as a, serving(env_b) as b:
        app = App(Settings.from_env(env_a))  # for the client's helpers only; not started
        channel_a = grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}")
        channel_b = grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc_port}")
        try:
            on_a, on_b = Client(app, channel_a), Client(app, channel_b)
            owner = await on_a.new_user()
            tunnel = await basic_tunnel(on_a, owner)
            assert said(await check(on_a, tunnel, USER, SECRET))[0]  # cached on A
            await on_b.tunnels.StopTunnel(
                P.StopTunnelRequest(name=tunnel.name), metadata=owner.metadata
            )

            async def seen_on_a() -> bool:
                decision = await check(on_a, tunnel, USER, SECRET)
                return bool(decision.refusal == D.REFUSAL_NOT_RUNNING)

            await eventually(seen_on_a, within=5)  # well within the 60 s an entry lives
        finally:
            await channel_a.close()
            await channel_b.close()
            await app.close()
