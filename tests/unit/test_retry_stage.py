"""A safe unary call whose database connection failed runs once more; nothing else does."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import empty_pb2
from prometheus_client import CollectorRegistry
from tunnelplane.v1 import users_pb2

from server.domain.common.errors import DatabaseUnavailable, Unavailable
from server.interceptors.retry import RetryStage
from server.pipeline import Call, MethodInfo
from server.policy import policy_of

GET_USER = users_pb2.DESCRIPTOR.services_by_name["UserService"].methods_by_name["GetUser"]
UPDATE_USER = users_pb2.DESCRIPTOR.services_by_name["UserService"].methods_by_name["UpdateUser"]


def info(descriptor: object) -> MethodInfo:
    return MethodInfo(
        full_name=f"/{descriptor.containing_service.full_name}/{descriptor.name}",  # type: ignore[attr-defined]
        service=descriptor.containing_service.full_name,  # type: ignore[attr-defined]
        name=descriptor.name,  # type: ignore[attr-defined]
        grpc_type="unary",
        request_type=empty_pb2.Empty,
        response_type=empty_pb2.Empty,
        policy=policy_of(descriptor),  # type: ignore[arg-type]
        descriptor=descriptor,  # type: ignore[arg-type]
    )


def failing(times: int, error: Exception) -> tuple[list[int], object]:
    runs: list[int] = []

    async def handler(request: object, call: Call) -> empty_pb2.Empty:
        runs.append(1)
        call.trailers.append(("etag", f"run {len(runs)}"))
        if len(runs) <= times:
            raise error
        return empty_pb2.Empty()

    return runs, handler


def run(descriptor: object, times: int, error: Exception) -> tuple[list[int], Call, object]:
    method = info(descriptor)
    runs, handler = failing(times, error)
    call = Call(method, {}, peer="ipv4:127.0.0.1:1", transport="grpc")
    call.trailers.append(("ratelimit", "kept"))
    wrapped = RetryStage(CollectorRegistry()).wrap(method, handler)  # type: ignore[arg-type]
    try:
        outcome: object = asyncio.run(wrapped(empty_pb2.Empty(), call))
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test reads
        outcome = exc
    return runs, call, outcome


def test_a_safe_call_runs_once_more_after_a_lost_connection() -> None:
    assert policy_of(GET_USER).safe
    runs, call, outcome = run(GET_USER, 1, DatabaseUnavailable("gone"))
    assert (len(runs), outcome) == (2, empty_pb2.Empty())
    # The first run's trailers went; those of the stages outside stayed.
    assert call.trailers == [("ratelimit", "kept"), ("etag", "run 2")]


def test_only_once() -> None:
    runs, _, outcome = run(GET_USER, 2, DatabaseUnavailable("gone"))
    assert len(runs) == 2
    assert isinstance(outcome, DatabaseUnavailable)


@pytest.mark.parametrize(
    ("descriptor", "error"),
    [(UPDATE_USER, DatabaseUnavailable("gone")), (GET_USER, Unavailable("shedding"))],
)
def test_writes_and_other_failures_never_run_again(descriptor: object, error: Exception) -> None:
    runs, _, outcome = run(descriptor, 1, error)
    assert len(runs) == 1
    assert outcome is error
