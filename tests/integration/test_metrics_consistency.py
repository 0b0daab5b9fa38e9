"""Property 11, metrics consistency: for any generated sequence of calls over gRPC and
HTTP (successes, bad input, a missing resource, no credential, a forged one), the
server's started and handled counters and its handling-time histogram agree with exactly
what was sent, by method and code, scraped from its metrics port."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from urllib.request import urlopen

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from tunnelplane.v1 import tunnels_pb2, users_pb2

from server.app import App
from server.domain.common.ids import new_id
from tests.conftest import sqlite_server
from tests.helpers import Client, TestUser

#: What a generated call is: (transport, kind). Each kind's method and expected code.
KINDS = {
    "me": ("UserService", "GetUser", "OK"),
    "bad_id": ("TunnelService", "GetTunnel", "INVALID_ARGUMENT"),
    "anonymous": ("UserService", "GetUser", "UNAUTHENTICATED"),
    "forged": ("UserService", "GetUser", "UNAUTHENTICATED"),
    "missing_tunnel": ("TunnelService", "GetTunnel", "NOT_FOUND"),
}
calls = st.lists(
    st.tuples(st.sampled_from(["grpc", "http"]), st.sampled_from(sorted(KINDS))),
    min_size=1,
    max_size=12,
)
Key = tuple[str, str, str]  # service, method, code


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[App, TestUser]]:
    directory = tmp_path_factory.mktemp("metrics")
    async with sqlite_server(directory, metrics_port=0, rate_limit_enabled=False) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            user = await Client(app, channel).new_user()
        yield app, user


def scrape(port: int) -> dict[str, Counter[Key]]:
    """started, handled and histogram counts of the unary calls, by (service, method, code)."""
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found: dict[str, Counter[Key]] = {
        "started": Counter(),
        "handled": Counter(),
        "timed": Counter(),
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            service = labels.get("grpc_service", "").removeprefix("tunnelplane.v1.")
            method, code = labels.get("grpc_method", ""), labels.get("grpc_code", "")
            if sample.name == "grpc_server_started_total":
                found["started"][service, method, ""] += int(sample.value)
            elif sample.name == "grpc_server_handled_total":
                found["handled"][service, method, code] += int(sample.value)
            elif sample.name == "grpc_server_handling_seconds_count":
                found["timed"][service, method, code] += int(sample.value)
    return found


async def send(app: App, user: TestUser, transport: str, kind: str) -> None:
    bearer = {
        "me": user.access_token,
        "bad_id": user.access_token,
        "missing_tunnel": user.access_token,
        "forged": "eyJhbGciOiJFZERTQSJ9.e30.c2ln",
        "anonymous": "",
    }[kind]
    tunnel = f"{user.name}/tunnels/{'x' if kind == 'bad_id' else new_id('tun')}"
    on_tunnel = kind in ("missing_tunnel", "bad_id")
    if transport == "grpc":
        metadata = (("authorization", f"Bearer {bearer}"),) if bearer else ()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            client = Client(app, channel)
            with contextlib.suppress(grpc.aio.AioRpcError):
                if on_tunnel:
                    await client.tunnels.GetTunnel(
                        tunnels_pb2.GetTunnelRequest(name=tunnel), metadata=metadata
                    )
                else:
                    await client.users.GetUser(
                        users_pb2.GetUserRequest(name="users/me"), metadata=metadata
                    )
        return
    headers = {"authorization": f"Bearer {bearer}"} if bearer else {}
    path = f"/v1/{tunnel}" if on_tunnel else "/v1/users/me"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
        await http.get(path, headers=headers)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=calls)
async def test_the_counters_agree_with_what_was_sent(
    served: tuple[App, TestUser], sequence: list[tuple[str, str]]
) -> None:
    app, user = served
    before = await asyncio.to_thread(scrape, app.metrics_port)
    for transport, kind in sequence:
        await send(app, user, transport, kind)
    after = await asyncio.to_thread(scrape, app.metrics_port)

    sent: Counter[Key] = Counter()
    started: Counter[Key] = Counter()
    for _, kind in sequence:
        service, method, code = KINDS[kind]
        sent[service, method, code] += 1
        started[service, method, ""] += 1
    for family, expected in (("handled", sent), ("timed", sent), ("started", started)):
        grew = after[family] - before[family]
        assert grew == expected, (family, grew, expected)
