"""Server reflection, v1 and v1alpha, as grpcurl uses it (list, describe)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from server.app import App

EXPECTED = {
    "tunnelplane.v1.AuthService",
    "tunnelplane.v1.UserService",
    "tunnelplane.v1.AdminService",
    "tunnelplane.v1.AuditService",
    "tunnelplane.v1.TunnelService",
    "tunnelplane.v1.AgentService",
    "tunnelplane.v1.EventService",
    "tunnelplane.v1.WebhookService",
    "tunnelplane.v1.OperationService",
    "tunnelplane.v1.ProxyService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
}


async def ask(
    channel: grpc.aio.Channel, version: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    """One request on the reflection stream of ``version`` (the messages are wire-identical)."""
    method = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = method(iter([request]))
    responses = [response async for response in call]
    assert len(responses) == 1
    return responses[0]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_list_services(app: App, channel: grpc.aio.Channel, version: str) -> None:
    response = await ask(channel, version, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert {s.name for s in response.list_services_response.service} == EXPECTED


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
@pytest.mark.parametrize(
    "symbol",
    [
        "tunnelplane.v1.UserService",
        "tunnelplane.v1.AuthService.Login",
        "tunnelplane.v1.User",
        "grpc.reflection.v1.ServerReflection",
    ],
)
async def test_describe_symbols(
    app: App, channel: grpc.aio.Channel, version: str, symbol: str
) -> None:
    response = await ask(
        channel, version, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    assert files, response
    names = {f.name for f in files}
    package = symbol.rsplit(".", 2)[0] if symbol.endswith(".Login") else symbol.rsplit(".", 1)[0]
    assert any(f.package == package for f in files), names
    if symbol.startswith("tunnelplane"):
        # The policy option travels with the descriptors, so clients can read it too.
        assert "tunnelplane/v1/options.proto" in {d for f in files for d in f.dependency} | names


async def test_unknown_symbol_is_not_found(app: App, channel: grpc.aio.Channel) -> None:
    response = await ask(
        channel, "v1", reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such")
    )
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
