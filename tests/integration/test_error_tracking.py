"""Error tracking against a real HTTP receiver of Sentry envelopes on loopback: an
unexpected error over gRPC and over HTTP is one event each, tagged with the call and
scrubbed; a NOT_FOUND, a refused credential and a success are none."""

from __future__ import annotations

import asyncio
import gzip
import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import sentry_sdk
from tunnelplane.v1 import tunnels_pb2, users_pb2

from server.domain.common.ids import new_id
from server.domain.identity.users import UserService
from server.errortracking import release
from tests.conftest import sqlite_server
from tests.helpers import Client, fails

# Made at run time: the events carry source lines of the frames, this file's included,
# and what must not leave is what the server had in memory, not what a test file says.
SECRET_EMAIL = f"leaky.{secrets.token_hex(4)}@example.com"
SECRET_TOKEN = (
    f"eyJ{secrets.token_urlsafe(12)}.eyJ{secrets.token_urlsafe(12)}.{secrets.token_urlsafe(16)}"
)
SQL_PARAMETER = secrets.token_hex(6)


class Receiver:
    """A Sentry ingestion endpoint: stores the items of every envelope it is sent."""

    def __init__(self) -> None:
        self.envelopes: list[bytes] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.paths.append(self.path)
                receiver.envelopes.append(body)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def items(self, kind: str) -> list[dict[str, Any]]:
        """The payloads of every item of ``kind`` (``event``, ``transaction``) received."""
        found = []
        for envelope in self.envelopes:
            lines = envelope.split(b"\n")
            # Line 0 is the envelope header; then item header and payload pairs.
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if json.loads(header).get("type") == kind:
                    found.append(json.loads(payload))
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    thread = threading.Thread(target=found.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        found.server.shutdown()
        found.server.server_close()


async def flush() -> None:
    """Wait until the SDK has sent what it queued (its transport is a thread)."""
    await asyncio.to_thread(sentry_sdk.flush, 10)


async def test_unexpected_errors_are_reported_tagged_and_scrubbed_and_answers_are_not(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = f"http://publickey@127.0.0.1:{receiver.port}/42"
    async with (
        sqlite_server(tmp_path, sentry_dsn=dsn, sentry_environment="test") as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        client = Client(app, channel)
        user = await client.new_user()
        me = users_pb2.GetUserRequest(name="users/me")
        # Answers, not incidents: a success, NOT_FOUND, a refused credential.
        await client.users.GetUser(me, metadata=user.metadata)
        missing = f"{user.name}/tunnels/{new_id('tun')}"
        await fails(
            client.tunnels.GetTunnel(
                tunnels_pb2.GetTunnelRequest(name=missing), metadata=user.metadata
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        await fails(
            client.users.GetUser(me, metadata=(("authorization", "Bearer forged"),)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        await flush()
        assert receiver.items("event") == []

        async def broken(*_args: object, **_kwargs: object) -> None:
            raise RuntimeError(
                f"lookup failed for {SECRET_EMAIL} with Bearer {SECRET_TOKEN} "
                f"[parameters: ('{SQL_PARAMETER}',)]"
            )

        monkeypatch.setattr(UserService, "get", broken)
        await fails(
            client.users.GetUser(me, metadata=(*user.metadata, ("x-request-id", "req-grpc-1"))),
            grpc.StatusCode.INTERNAL,
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
            answer = await http.get(
                "/v1/users/me",
                headers={
                    "authorization": f"Bearer {user.access_token}",
                    "x-request-id": "req-http-1",
                    "cookie": "tp_refresh=secret-cookie",
                },
            )
        assert answer.status_code == 500
        await flush()

    events = receiver.items("event")
    assert len(events) == 2
    assert all(path == "/api/42/envelope/" for path in receiver.paths)
    by_request = {event["tags"]["request_id"]: event for event in events}
    assert set(by_request) == {"req-grpc-1", "req-http-1"}
    for request_id, transport in (("req-grpc-1", "grpc"), ("req-http-1", "http")):
        event = by_request[request_id]
        tags = event["tags"]
        assert tags["method"] == "/tunnelplane.v1.UserService/GetUser"
        assert tags["transport"] == transport
        assert tags["principal"] == "session"
        assert len(tags["trace_id"]) == 32
        assert event["environment"] == "test"
        assert event["release"] == release()
        (exception,) = event["exception"]["values"]
        assert exception["type"] == "RuntimeError"
        assert "[email]" in exception["value"]
        assert "Bearer [Filtered]" in exception["value"]
        assert all("vars" not in frame for frame in exception["stacktrace"]["frames"])
        for absent in ("request", "user", "breadcrumbs"):
            assert absent not in event
    raw = b"".join(receiver.envelopes)
    for secret in (SECRET_EMAIL, SECRET_TOKEN, SQL_PARAMETER, "secret-cookie", user.access_token):
        assert secret.encode() not in raw, secret


async def test_a_failing_background_loop_is_reported_once_per_run_of_failures(
    tmp_path: Path, receiver: Receiver
) -> None:
    from server.workers.supervisor import Backoff, Loop

    dsn = f"http://publickey@127.0.0.1:{receiver.port}/7"
    async with sqlite_server(tmp_path, sentry_dsn=dsn) as app:
        failures: list[int] = []
        done = asyncio.Event()

        async def step() -> float | None:
            failures.append(1)
            if len(failures) >= 3:
                done.set()
                return None
            raise ValueError(f"step failed for {SECRET_EMAIL}")

        app.supervisor.start(
            [Loop("flaky", step, interval=0.0, backoff=Backoff(base=0.001, cap=0.001), once=True)]
        )
        await asyncio.wait_for(done.wait(), 10)
        await flush()
    events = receiver.items("event")
    assert [event["tags"]["loop"] for event in events] == ["flaky"]
    assert events[0]["exception"]["values"][0]["type"] == "ValueError"
    assert SECRET_EMAIL.encode() not in b"".join(receiver.envelopes)


async def test_sampled_calls_are_sent_as_transactions_named_after_the_method(
    tmp_path: Path, receiver: Receiver
) -> None:
    dsn = f"http://publickey@127.0.0.1:{receiver.port}/9"
    async with (
        sqlite_server(tmp_path, sentry_dsn=dsn, sentry_traces_sample_rate=1.0) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        client = Client(app, channel)
        user = await client.new_user()
        await client.users.GetUser(
            users_pb2.GetUserRequest(name="users/me"), metadata=user.metadata
        )
        await flush()
    names = {item["transaction"] for item in receiver.items("transaction")}
    assert "/tunnelplane.v1.UserService/GetUser" in names
    assert receiver.items("event") == []
    assert user.email.encode() not in b"".join(receiver.envelopes)
