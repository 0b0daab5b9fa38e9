"""SuspendUser and ReactivateUser, over gRPC and HTTP on both databases: a suspended user's
access tokens, API keys, agent keys, sessions, watch streams and agents' streams stop at
once; sign-in says the account is suspended (only to whoever knows the password); each
change is an event that reaches the user's webhooks; reactivation lets them back in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest_asyncio
from tunnelplane.v1 import auth_pb2, events_pb2, tunnels_pb2, users_pb2

from server.domain.identity.model import Role
from tests.helpers import (
    PASSWORD,
    Agent,
    Client,
    TestUser,
    agent_key,
    bearer,
    fails,
    reason,
    sse_blocks,
    watch_synced,
)
from tests.webhook_receiver import Receiver

U = users_pb2
SUSPENDED, ACTIVE = U.User.STATE_SUSPENDED, U.User.STATE_ACTIVE
ME = U.GetUserRequest(name="users/me")
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as started:
        yield started


async def user_events(client: Client, user: TestUser, admin: TestUser) -> list[str]:
    page = await client.events.ListEvents(
        events_pb2.ListEventsRequest(parent=user.name, filter='type : "user."', page_size=50),
        metadata=admin.metadata,
    )
    return [e.type for e in reversed(page.events)]


async def test_a_suspended_user_is_stopped_at_once_and_reactivation_lets_them_back(
    client: Client, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    support = await client.new_user(role=Role.SUPPORT_ADMIN, tag="support")
    user = await client.new_user()
    key = await client.api_key(user)
    await client.webhook(
        user, receiver.url("/u"), event_types=["user.suspended", "user.reactivated"]
    )
    tunnel = await client.tunnel(user)
    agent_secret = await agent_key(client, user)
    agent = Agent(client.agents, agent_secret, tunnel.name)
    assert (await agent.greet()).WhichOneof("kind") == "welcome"
    watch = client.tunnels.WatchTunnels(
        tunnels_pb2.WatchTunnelsRequest(name="users/me"), metadata=user.metadata
    )
    await watch_synced(watch)
    headers = {"authorization": f"Bearer {user.access_token}", "accept": "text/event-stream"}
    async with http.stream("GET", "/v1/users/me/tunnels:watch", headers=headers) as sse:
        blocks = sse_blocks(sse)
        while "KIND_SYNCED" not in await anext(blocks):
            pass

        suspended = await client.users.SuspendUser(
            U.SuspendUserRequest(name=user.name, reason="abuse report 42"),
            metadata=support.metadata,
        )
        assert suspended.state == SUSPENDED
        # Admins still find a suspended user, by name and by state.
        found = await client.users.ListUsers(
            U.ListUsersRequest(filter=f'email = "{user.email}" AND state = "suspended"'),
            metadata=support.metadata,
        )
        assert [u.name for u in found.users] == [user.name]
        got = await client.users.GetUser(
            U.GetUserRequest(name=user.name), metadata=support.metadata
        )
        assert got.state == SUSPENDED

        # Open streams end at once: the watch over gRPC and SSE, and the agent's.
        await fails(_drain(watch), UNAUTHENTICATED)  # its session revoked, its user suspended
        last = await asyncio.wait_for(anext(blocks), 10)
        assert last.startswith("event: error"), last
        assert '"code":16' in last, last
    told = await agent.next()
    while told.WhichOneof("kind") != "go_away":
        told = await agent.next()

    # Every credential stops.
    await fails(client.users.GetUser(ME, metadata=user.metadata), grpc.StatusCode.UNAUTHENTICATED)
    refused = await http.get("/v1/users/me", headers={"authorization": f"Bearer {key}"})
    assert refused.status_code == 401, refused.text
    again = Agent(client.agents, agent_secret, tunnel.name, agent_id="agent-2")
    await fails(again.greet(), grpc.StatusCode.UNAUTHENTICATED)
    await fails(
        client.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=user.refresh_token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    # Sign-in tells the suspended user so, and only them.
    wrong = await fails(
        client.login(user.email, "wrong password!"), grpc.StatusCode.UNAUTHENTICATED
    )
    assert reason(wrong) == "INVALID_CREDENTIALS"
    right = await http.post("/v1/auth:login", json={"email": user.email, "password": PASSWORD})
    assert right.status_code == 403, right.text
    assert right.json()["details"][0]["reason"] == "ACCOUNT_SUSPENDED"

    # Suspending again changes nothing; nobody suspends themselves.
    await client.users.SuspendUser(
        U.SuspendUserRequest(name=user.name, reason="again"), metadata=support.metadata
    )
    own = await fails(
        client.users.SuspendUser(
            U.SuspendUserRequest(name=support.name, reason="oops"), metadata=support.metadata
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason(own) == "SELF_SUSPENSION"

    # Reactivated over HTTP: the user signs in again (the old session ended) and their
    # API key works again.
    back = await http.post(
        f"/v1/{user.name}:reactivate",
        json={"reason": "appeal upheld"},
        headers={"authorization": f"Bearer {support.access_token}"},
    )
    assert back.status_code == 200, back.text
    assert back.json()["state"] == "STATE_ACTIVE"
    await fails(client.users.GetUser(ME, metadata=user.metadata), grpc.StatusCode.UNAUTHENTICATED)
    login = await client.login(user.email)
    me = await client.users.GetUser(ME, metadata=bearer(login.tokens.access_token))
    assert me.state == ACTIVE
    assert (await http.get("/v1/users/me", headers={"authorization": f"Bearer {key}"})).is_success

    # One event each way, to the log and to the user's webhook, with the reason.
    assert await user_events(client, user, support) == [
        "user.created",
        "user.suspended",
        "user.reactivated",
    ]
    await receiver.wait_for(2)
    sent = [(r.json["type"], r.json["data"]["object"]["reason"]) for r in receiver.at("/u")]
    assert sent == [("user.suspended", "abuse report 42"), ("user.reactivated", "appeal upheld")]


async def test_only_an_admin_with_users_suspend_may_suspend(client: Client) -> None:
    finance = await client.new_user(role=Role.FINANCE_ADMIN, tag="finance")
    user = await client.new_user()
    for caller in (finance, user):
        await fails(
            client.users.SuspendUser(
                U.SuspendUserRequest(name=user.name, reason="no"), metadata=caller.metadata
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert (await client.users.GetUser(ME, metadata=user.metadata)).state == ACTIVE


async def _drain(stream: Any) -> None:
    while await asyncio.wait_for(stream.read(), 10) is not grpc.aio.EOF:
        pass
