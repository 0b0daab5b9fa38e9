"""The generic OpenAPI generator on the echo test service: valid OpenAPI 3.1 for every
binding style (Property 15: every bound RPC appears, every path parameter exists)."""

from __future__ import annotations

import re

import pytest
from openapi_spec_validator import validate

from gateway.bindings import Catalog, load_descriptor_set
from gateway.openapi import build_document, openapi_path
from gateway.routes import parse_template
from tests.gateway.echo_proto import DESCRIPTOR_SET

_PARAM = re.compile(r"\{([^}]+)\}")


@pytest.fixture(scope="module")
def spec() -> dict[str, object]:
    catalog = Catalog.build(load_descriptor_set(DESCRIPTOR_SET))
    return build_document(catalog, "Echo", "v1")


def test_valid_openapi_3_1(spec: dict[str, object]) -> None:
    validate(spec)  # type: ignore[arg-type]


def test_every_binding_appears_with_declared_path_parameters(spec: dict[str, object]) -> None:
    catalog = Catalog.build(load_descriptor_set(DESCRIPTOR_SET))
    paths = spec["paths"]
    assert isinstance(paths, dict)
    operation_ids = {op["operationId"] for item in paths.values() for op in item.values()}
    for binding in catalog.bindings:
        path, _ = openapi_path(binding.template)
        method = binding.http_method.lower()
        operation = paths[path][method]
        expected_id = f"EchoService_{binding.method.name}" + (
            f"_{binding.index}" if binding.index else ""
        )
        assert operation["operationId"] == expected_id
        declared = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
        assert declared == set(_PARAM.findall(path))
    assert "EchoService_Hidden" not in operation_ids  # no http rule, no operation
    assert len(operation_ids) == len(catalog.bindings)


@pytest.mark.parametrize(
    ("template", "path", "params"),
    [
        ("/v1/{name=things/*}", "/v1/things/{thing}", ["thing"]),
        ("/v1/{name=things/*}:frobnicate", "/v1/things/{thing}:frobnicate", ["thing"]),
        ("/v1/files/{path=**}", "/v1/files/{path}", ["path"]),
        ("/v1/echo/{string_value}/{nested.name}", "/v1/echo/{string_value}/{nested.name}",
         ["string_value", "nested.name"]),
        ("/v1/{parent=users/*}/apiKeys/{key=*}", "/v1/users/{user}/apiKeys/{key}", ["user", "key"]),
        ("/v1/{name=users/*/apiKeys/*}", "/v1/users/{user}/apiKeys/{apiKey}", ["user", "apiKey"]),
        ("/v1/{name=categories/*}", "/v1/categories/{category}", ["category"]),
        ("/v1/*/x", "/v1/{_1}/x", ["_1"]),
    ],
)  # fmt: skip
def test_slashed_variables_are_expanded(template: str, path: str, params: list[str]) -> None:
    rendered, parameters = openapi_path(parse_template(template))
    assert rendered == path
    assert [name for name, _ in parameters] == params


def test_binding_styles_are_described(spec: dict[str, object]) -> None:
    paths = spec["paths"]
    assert isinstance(paths, dict)
    stream = paths["/v1/things:stream"]["get"]["responses"]["200"]["content"]
    assert set(stream) == {"application/x-ndjson", "text/event-stream"}
    upload = paths["/v1/things/{thing}/blob"]["put"]["requestBody"]["content"]
    assert upload == {"*/*": {"schema": {"type": "string", "format": "binary"}}}
    tags = paths["/v1/things/{thing}/tags"]["get"]["responses"]["200"]
    assert tags["content"]["application/json"]["schema"] == {
        "type": "array",
        "items": {"type": "string"},
    }
    body_field = paths["/v1/echo/{int64_value}"]["put"]["requestBody"]["content"]
    assert body_field["application/json"]["schema"] == {
        "$ref": "#/components/schemas/echo.v1.Nested"
    }
    query = {p["name"] for p in paths["/v1/echo"]["get"]["parameters"]}
    assert {"int64_value", "nested.name", "nested.deeper.flag", "wrapped_bool"} <= query
    assert "labels" not in query
    assert "repeated_nested" not in query


def test_schemas_map_every_field_kind(spec: dict[str, object]) -> None:
    schemas = spec["components"]["schemas"]  # type: ignore[index]
    props = schemas["echo.v1.Everything"]["properties"]
    assert props["int64Value"] == {"type": "string", "format": "int64"}
    assert props["uint32Value"]["minimum"] == 0
    assert props["bytesValue"]["format"] == "byte"
    assert props["labels"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert props["repeatedColor"]["items"] == {"$ref": "#/components/schemas/echo.v1.Color"}
    assert props["wrappedBool"]["type"] == ["boolean", "null"]
    assert props["duration"]["type"] == "string"
    assert props["any"]["required"] == ["@type"]
    assert "customJsonName" in props
    assert props["optionalString"] == {"type": "string"}


def test_if_match_is_a_header_parameter_where_it_sets_the_etag(spec: dict[str, object]) -> None:
    paths = spec["paths"]
    assert isinstance(paths, dict)

    def headers(path: str, method: str) -> dict[str, str]:
        parameters = paths[path][method]["parameters"]
        return {p["name"]: p["description"] for p in parameters if p["in"] == "header"}

    assert "`record.etag`" in headers("/v1/records/{record}", "patch")["If-Match"]
    assert "`etag`" in headers("/v1/records/{record}", "delete")["If-Match"]
    assert "`etag`" in headers("/v1/records/{record}:archive", "post")["If-Match"]
    assert headers("/v1/things/{thing}", "get") == {}
    assert headers("/v1/things/{thing}", "patch") == {}  # Thing has no etag
