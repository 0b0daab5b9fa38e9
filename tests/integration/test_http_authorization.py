"""The authorization matrix again, over HTTP: every bound RPC, every kind of caller, through
the embedded gateway. The outcome must match the gRPC matrix cell for cell."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from tunnelplane.v1 import auth_pb2, options_pb2

from gateway.bindings import Binding
from server.app import App
from server.domain.principal import Role
from tests.helpers import Client, TestUser
from tests.integration.test_authorization import (
    ALLOWED,
    BUILDERS,
    CALLERS,
    DENIED,
    METHODS,
    UNAUTHENTICATED,
    Target,
    credentials_for,
    expected,
)

_VARIABLE = re.compile(r"\{([a-z_.]+)(=[^}]*)?\}")


def field(message: Message, path: str) -> Any:
    value: Any = message
    for part in path.split("."):
        value = getattr(value, part)
    return value


def http_request(binding: Binding, message: Message) -> dict[str, Any]:
    """The HTTP request that transcodes to ``message`` on ``binding``."""
    url = _VARIABLE.sub(lambda m: str(field(message, m.group(1))), binding.template.source)
    request: dict[str, Any] = {"method": binding.http_method, "url": url}
    shape = binding.shape
    if shape.http_body:
        body = field(message, shape.body_field.name) if shape.body_field else message
        request["content"] = body.data
        request["headers"] = {"content-type": body.content_type}
    elif shape.body == "*":
        request["json"] = json_format.MessageToDict(message)
    elif shape.body:
        request["json"] = json_format.MessageToDict(field(message, shape.body))
    return request


@pytest.fixture
async def admin(client: Client) -> TestUser:
    return await client.new_user(role=Role.SUPER_ADMIN, tag="admin")


@pytest.fixture
async def other_user(client: Client) -> TestUser:
    return await client.new_user(tag="other")


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(("service", "method"), METHODS, ids=lambda v: getattr(v, "name", v))
async def test_authorization_matrix_over_http(
    app: App,
    client: Client,
    http: httpx.AsyncClient,
    admin: TestUser,
    other_user: TestUser,
    service: str,
    method: Any,
    caller: str,
) -> None:
    name = f"{service}/{method.name}"
    policy = method.GetOptions().Extensions[options_pb2.policy]
    assert app.gateway is not None
    binding = next(
        b for b in app.gateway.catalog.bindings if b.method.full_name == method.full_name
    )
    owner = await client.new_user(tag="owner")
    key = await client.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(parent=owner.name, api_key=auth_pb2.ApiKey(display_name="k")),
        metadata=owner.metadata,
    )
    target = Target(owner, key.api_key.name)
    metadata = await credentials_for(
        caller, client, target, policy, {"admin": admin, "other_user": other_user}
    )
    request = http_request(binding, BUILDERS[name](target))
    request.setdefault("headers", {}).update(dict(metadata))
    response = await http.request(**request)
    outcome = {401: UNAUTHENTICATED, 403: DENIED}.get(response.status_code, ALLOWED)
    if outcome == ALLOWED:
        assert response.status_code in {200, 400, 404}, f"{name} as {caller}: {response.text}"
    assert outcome == expected(policy, caller), f"{name} as {caller}: {response.text}"
