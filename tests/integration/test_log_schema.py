"""The JSON log keeps its documented shape (``docs/log-schema.json``): every line a real
server writes from start to stop, calls over both transports included, validates."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc
import httpx
from jsonschema import Draft202012Validator
from tunnelplane.v1 import users_pb2, users_pb2_grpc

from tests.helpers import fails
from tests.processes import ROOT, child_env, serving

SCHEMA = json.loads((ROOT / "docs" / "log-schema.json").read_text())


async def test_every_line_from_start_to_stop_matches_the_schema(tmp_path: Path) -> None:
    async with serving(child_env(tmp_path)) as server:
        following = asyncio.create_task(server.follow_log())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            await fails(
                users_pb2_grpc.UserServiceStub(channel).GetUser(
                    users_pb2.GetUserRequest(name="users/me"),
                    metadata=(("x-request-id", "schema-1"),),
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{server.http_port}/v1/users/me")
        assert answer.status_code == 401
        server.process.send_signal(signal.SIGTERM)
        assert await server.process.wait() == 0
        await following

    validator = Draft202012Validator(SCHEMA)
    for entry in server.log:
        errors = [e.message for e in validator.iter_errors(entry)]
        assert not errors, (entry, errors)
    access = [e for e in server.log if e["logger"] == "tunnelplane.access"]
    assert {e["transport"] for e in access} == {"grpc", "http"}
    assert any(e.get("request_id") == "schema-1" for e in access)
    assert all("trace_id" in e for e in access)
    assert {"serving", "stopped"} <= {e["message"] for e in server.log}
