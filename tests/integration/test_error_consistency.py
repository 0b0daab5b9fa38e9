"""Property 10, error response consistency: for any failure a use case can raise, a gRPC
caller and an HTTP caller of the same method get the same code, message and details
(``google.rpc.Status``), the HTTP status is the code's mapping, and ``Retry-After`` says
the same as ``RetryInfo``. Generated failures are raised from inside the real server's
use case, through the whole pipeline, over both transports."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnelplane.v1 import users_pb2, users_pb2_grpc

from gateway.errors import http_status
from server.app import App
from server.domain.common import errors as e
from server.domain.identity.users import UserService
from tests.conftest import sqlite_server
from tests.helpers import Client, TestUser, status_of

text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF, blacklist_categories=("Cs",)),
    min_size=1,
    max_size=60,
)
reason = st.from_regex(r"[A-Z][A-Z_]{2,30}", fullmatch=True)
field = st.from_regex(r"[a-z][a-z_]{0,20}(\.[a-z][a-z_]{0,20}){0,2}", fullmatch=True)
seconds = st.one_of(st.none(), st.floats(min_value=0.001, max_value=86400, allow_nan=False))
metadata = st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True), text, max_size=3)

failures = st.one_of(
    st.builds(
        e.InvalidArgument,
        st.lists(st.builds(e.FieldViolation, field, text, reason), min_size=1, max_size=4),
    ),
    st.builds(e.NotFound, st.sampled_from(["tunnel", "user", "webhook"]), text),
    st.builds(e.AlreadyExists, st.sampled_from(["tunnel", "user"]), text),
    st.builds(
        e.FailedPrecondition,
        text,
        st.lists(st.builds(e.PreconditionViolation, reason, field, text), max_size=3),
        reason=st.one_of(st.none(), reason),
        metadata=metadata,
    ),
    st.builds(e.Aborted, text, reason=st.one_of(st.none(), reason)),
    st.builds(e.PermissionDenied, text, reason=st.one_of(st.none(), reason), metadata=metadata),
    st.builds(
        e.ResourceExhausted,
        text,
        retry_after=seconds,
        violations=st.lists(st.builds(e.QuotaViolation, field, text), max_size=2),
        reason=st.one_of(st.none(), reason),
    ),
    st.builds(e.Unavailable, text, retry_after=seconds),
    st.builds(e.DeadlineExceeded, text),
    st.builds(e.Unimplemented, text),
    st.just(e.Internal()),
    # Not a domain error at all: the error stage's generic INTERNAL.
    st.builds(RuntimeError, text),
)


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[App, TestUser]]:
    async with sqlite_server(tmp_path_factory.mktemp("consistency")) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            user = await Client(app, channel).new_user()
        yield app, user


def retry_seconds(status: status_pb2.Status) -> float | None:
    for detail in status.details:
        if detail.type_url.endswith("google.rpc.RetryInfo"):
            from google.rpc import error_details_pb2

            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def semantic(status: status_pb2.Status) -> dict[str, Any]:
    """A status as data, its details unpacked: equal whatever order maps were written in."""
    return json_format.MessageToDict(status, preserving_proto_field_name=True)


def http_body_status(body: dict[str, Any]) -> status_pb2.Status:
    """The HTTP error body, read back as a ``google.rpc.Status`` (it also carries
    ``requestId``)."""
    return json_format.ParseDict(body, status_pb2.Status(), ignore_unknown_fields=True)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(failure=failures)
async def test_both_transports_answer_a_failure_the_same(
    served: tuple[App, TestUser], failure: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, user = served

    async def failing(*_args: object, **_kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(UserService, "get", failing)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        try:
            await users_pb2_grpc.UserServiceStub(channel).GetUser(
                users_pb2.GetUserRequest(name="users/me"), metadata=user.metadata
            )
        except grpc.aio.AioRpcError as error:
            over_grpc = status_of(error)
            grpc_code = error.code().value[0]
            grpc_retry_after = dict(await_trailers(error)).get("retry-after")
        else:
            raise AssertionError("the call succeeded")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
        answer = await http.get(
            "/v1/users/me", headers={"authorization": f"Bearer {user.access_token}"}
        )
    over_http = http_body_status(answer.json())

    assert over_grpc.code == grpc_code
    assert semantic(over_http) == semantic(over_grpc)
    assert answer.status_code == http_status(over_grpc.code)
    expected_code = failure.code if isinstance(failure, e.DomainError) else e.Code.INTERNAL
    assert over_grpc.code == int(expected_code)
    retry = retry_seconds(over_grpc)
    if retry is None:
        assert "retry-after" not in answer.headers
    else:
        assert answer.headers["retry-after"] == str(max(1, math.ceil(retry)))
        assert grpc_retry_after == answer.headers["retry-after"]
    if not isinstance(failure, e.DomainError) or isinstance(failure, e.Internal):
        assert over_grpc.message == "internal error"


def await_trailers(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    return [(k, v) for k, v in error.trailing_metadata() or () if isinstance(v, str)]
