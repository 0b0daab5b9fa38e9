"""Two server processes on one PostgreSQL and one Redis behave as one service: what one
replica revokes, changes or suspends, the other honours at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tunnelplane.v1 import auth_pb2, common_pb2, tunnels_pb2, users_pb2

from server.app import App
from server.domain.identity.model import Role
from server.settings import Settings
from tests.conftest import REDIS_URL, migrate, require_redis
from tests.helpers import Client, bearer, fails, unique_email, watch_synced
from tests.processes import replica_envs, serving

pytestmark = pytest.mark.slow
ME = users_pb2.GetUserRequest(name="users/me")


@contextlib.asynccontextmanager
async def two_replicas(database: str, tmp_path: Path) -> AsyncIterator[tuple[Client, Client]]:
    """Two server processes on ``database`` and the shared Redis, with the same keys (a
    token one issues, the other verifies); a client of each."""
    require_redis()
    await migrate(database)
    env_a, env_b = replica_envs(database, REDIS_URL, tmp_path)
    async with serving(env_a) as a, serving(env_b) as b:
        channel_a = grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}")
        channel_b = grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc_port}")
        app = App(Settings.from_env(env_a))  # only for the client's role helpers; not started
        try:
            yield Client(app, channel_a), Client(app, channel_b)
        finally:
            await channel_a.close()
            await channel_b.close()
            await app.close()


async def test_revocation_and_changes_cross_replicas(
    postgres_database: str, tmp_path: Path
) -> None:
    async with two_replicas(postgres_database, tmp_path) as (on_a, on_b):
        user = await on_a.new_user()
        # A token issued by A works on B, and is cached there once verified.
        await on_b.users.GetUser(ME, metadata=user.metadata)

        # Tier change on B is effective on A for the same token (shared subject cache).
        await on_b.users.ChangeTier(
            users_pb2.ChangeTierRequest(name="users/me", tier=common_pb2.TIER_PREMIUM),
            metadata=user.metadata,
        )
        seen = await on_a.users.GetUser(ME, metadata=user.metadata)
        assert seen.tier == common_pb2.TIER_PREMIUM

        # An API key revoked on A stops working on B at once (cache invalidated in Redis).
        secret = await on_a.api_key(user)
        await on_b.users.GetUser(ME, metadata=bearer(secret))
        keys = await on_a.auth.ListApiKeys(
            auth_pb2.ListApiKeysRequest(parent="users/me"), metadata=user.metadata
        )
        await on_a.auth.RevokeApiKey(
            auth_pb2.RevokeApiKeyRequest(name=keys.api_keys[0].name), metadata=user.metadata
        )
        await fails(
            on_b.users.GetUser(ME, metadata=bearer(secret)), grpc.StatusCode.UNAUTHENTICATED
        )

        # Logout on B revokes the token everywhere, including A's verified-token cache.
        await on_b.auth.Logout(auth_pb2.LogoutRequest(), metadata=user.metadata)
        await fails(on_a.users.GetUser(ME, metadata=user.metadata), grpc.StatusCode.UNAUTHENTICATED)

        # Refresh-token reuse detected on one replica ends the session on the other.
        email = unique_email()
        await on_a.register(email)
        login = await on_a.login(email)
        request = auth_pb2.RefreshTokenRequest(refresh_token=login.tokens.refresh_token)
        await on_a.auth.RefreshToken(request)
        await fails(on_b.auth.RefreshToken(request), grpc.StatusCode.UNAUTHENTICATED)
        await fails(
            on_a.users.GetUser(ME, metadata=bearer(login.tokens.access_token)),
            grpc.StatusCode.UNAUTHENTICATED,
        )


async def test_a_suspension_on_one_replica_stops_the_user_on_the_other_at_once(
    postgres_database: str, tmp_path: Path
) -> None:
    async with two_replicas(postgres_database, tmp_path) as (on_a, on_b):
        support = await on_a.new_user(role=Role.SUPPORT_ADMIN, tag="support")
        user = await on_a.new_user()
        await on_b.users.GetUser(ME, metadata=user.metadata)  # B has it cached
        watch = on_b.tunnels.WatchTunnels(
            tunnels_pb2.WatchTunnelsRequest(name="users/me"), metadata=user.metadata
        )
        await watch_synced(watch)

        await on_a.users.SuspendUser(
            users_pb2.SuspendUserRequest(name=user.name, reason="abuse"),
            metadata=support.metadata,
        )
        # B's watch ends without any other change to wake it, and B refuses the token.
        await fails(_drain(watch), grpc.StatusCode.UNAUTHENTICATED)
        await fails(on_b.users.GetUser(ME, metadata=user.metadata), grpc.StatusCode.UNAUTHENTICATED)

        await on_b.users.ReactivateUser(
            users_pb2.ReactivateUserRequest(name=user.name, reason="appeal"),
            metadata=support.metadata,
        )
        login = await on_a.login(user.email)
        await on_a.users.GetUser(ME, metadata=bearer(login.tokens.access_token))


async def _drain(stream: Any) -> None:
    while await asyncio.wait_for(stream.read(), 10) is not grpc.aio.EOF:
        pass
