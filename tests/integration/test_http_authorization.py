"""The authorization matrix again, over HTTP: every bound RPC, every kind of caller, through
the embedded gateway. The outcome must match the gRPC matrix cell for cell."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from tunnelplane.v1 import options_pb2

from gateway.bindings import Binding
from server.app import App
from tests.helpers import Client
from tests.integration.test_authorization import (
    ALLOWED,
    BUILDERS,
    CASES,
    DENIED,
    UNAUTHENTICATED,
    credentials_for,
    expected,
    make_target,
    others,
)

#: Bidirectional streams have no HTTP binding: transcoding cannot carry them.
HTTP_CASES = [case for case in CASES if not case[1].client_streaming]

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


@pytest.mark.parametrize(
    ("service", "method", "caller"), HTTP_CASES, ids=lambda v: getattr(v, "name", v)
)
async def test_authorization_matrix_over_http(
    app: App,
    client: Client,
    http: httpx.AsyncClient,
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
    target = await make_target(client)
    metadata = await credentials_for(caller, client, target, policy, await others(client, caller))
    request = http_request(binding, BUILDERS[name](target))
    request.setdefault("headers", {}).update(dict(metadata))
    async with http.stream(**request) as response:  # a watch streams until we leave
        if not method.server_streaming or response.status_code != 200:
            await response.aread()
    outcome = {401: UNAUTHENTICATED, 403: DENIED}.get(response.status_code, ALLOWED)
    if outcome == ALLOWED:
        assert response.status_code in {200, 400, 404}, f"{name} as {caller}: {response.text}"
    assert outcome == expected(policy, caller, name), f"{name} as {caller}: {response.text}"
