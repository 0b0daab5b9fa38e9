"""The OpenAPI document and the docs page of the embedded gateway (plan Property 15)."""

from __future__ import annotations

import re
from typing import Any

import httpx
from google.api import annotations_pb2
from openapi_spec_validator import validate
from tunnelplane.v1 import options_pb2

from server.app import SERVICES, App

_PARAM = re.compile(r"\{([^}]+)\}")


async def document(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    spec: dict[str, Any] = response.json()
    return spec


async def test_the_document_is_valid_openapi_3_1(http: httpx.AsyncClient) -> None:
    spec = await document(http)
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def bound(service: Any) -> list[Any]:
    """The methods of ``service`` with an HTTP binding (a bidi stream has none)."""
    return [m for m in service.methods if m.GetOptions().HasExtension(annotations_pb2.http)]


async def test_every_rpc_with_a_binding_appears_with_its_path_parameters(
    http: httpx.AsyncClient,
) -> None:
    spec = await document(http)
    operations = {
        op["operationId"]: (path, op)
        for path, item in spec["paths"].items()
        for op in item.values()
    }
    for service in SERVICES:
        for method in bound(service):
            path, operation = operations[f"{service.name}_{method.name}"]
            declared = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
            assert declared == set(_PARAM.findall(path)), path
            assert all(p["required"] for p in operation["parameters"] if p["in"] == "path")


async def test_operations_carry_policy_security_and_errors(http: httpx.AsyncClient) -> None:
    spec = await document(http)
    get_user = spec["paths"]["/v1/users/{user}"]["get"]
    assert get_user["security"] == [{"bearer": []}]
    assert get_user["x-tunnelplane-policy"] == {
        "access": "authenticated",
        "audited": False,
        "permission": "profile.read",
        "ownerField": "name",
        "adminPermission": "users.read",
    }
    assert get_user["summary"].startswith("Returns a user.")
    for status in ("400", "401", "403", "404", "409", "429", "500", "503", "504"):
        schema = get_user["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/google.rpc.Status"}
    login = spec["paths"]["/v1/auth:login"]["post"]
    assert login["security"] == []
    assert login["x-tunnelplane-policy"]["audited"] is True
    logout = spec["paths"]["/v1/auth:logout"]["post"]
    assert logout["x-tunnelplane-policy"]["credentials"] == ["session"]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_only_the_watches_may_be_authenticated_by_the_access_cookie(
    http: httpx.AsyncClient,
) -> None:
    spec = await document(http)
    scheme = spec["components"]["securitySchemes"]["accessCookie"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "cookie", "tp_access")
    by_cookie = {
        (path, verb)
        for path, item in spec["paths"].items()
        for verb, operation in item.items()
        if {"accessCookie": []} in operation.get("security", [])
    }
    assert by_cookie == {
        ("/v1/users/{user}/tunnels/{tunnel}:watch", "get"),
        ("/v1/users/{user}/tunnels:watch", "get"),
        ("/v1/users/{user}/proxies/{proxy}:watch", "get"),
        ("/v1/users/{user}/proxies:watch", "get"),
    }
    watch = spec["paths"]["/v1/users/{user}/tunnels:watch"]["get"]
    assert watch["security"] == [{"bearer": []}, {"accessCookie": []}]
    assert watch["x-tunnelplane-policy"]["cookieAuth"] is True


async def test_schemas_follow_the_proto3_json_mapping(http: httpx.AsyncClient) -> None:
    spec = await document(http)
    schemas = spec["components"]["schemas"]
    user = schemas["tunnelplane.v1.User"]
    props = user["properties"]
    assert props["displayName"]["description"].startswith("Name shown to people.")
    assert props["email"]["readOnly"] is True
    assert props["createTime"] == {
        "type": "string",
        "format": "date-time",
        "readOnly": True,
        "description": "When the user was created.",
    }
    assert props["role"]["$ref"] == "#/components/schemas/tunnelplane.v1.Role"
    role = schemas["tunnelplane.v1.Role"]
    assert "ROLE_SUPER_ADMIN" in role["enum"]
    assert "`ROLE_USER`" in role["description"]
    tier = schemas["tunnelplane.v1.TierDetails"]["properties"]["maxTunnels"]
    assert tier["type"] == "string"  # int64 travels as a string
    register = schemas["tunnelplane.v1.RegisterRequest"]
    assert register["required"] == ["email", "password"]
    assert register["properties"]["password"]["writeOnly"] is True
    avatar_put = spec["paths"]["/v1/users/{user}/avatar"]["put"]
    assert "*/*" in avatar_put["requestBody"]["content"]
    avatar_get = spec["paths"]["/v1/users/{user}/avatar"]["get"]
    assert avatar_get["responses"]["200"]["content"]["*/*"]["schema"]["format"] == "binary"


async def test_list_parameters_come_from_the_query(http: httpx.AsyncClient) -> None:
    spec = await document(http)
    params = {p["name"]: p for p in spec["paths"]["/v1/users"]["get"]["parameters"]}
    assert set(params) == {"page_size", "page_token", "filter", "order_by", "show_deleted"}
    assert all(p["in"] == "query" for p in params.values())
    assert params["page_size"]["schema"] == {"type": "integer", "format": "int32"}


async def test_policy_of_every_method_is_documented(app: App, http: httpx.AsyncClient) -> None:
    spec = await document(http)
    documented = {
        op["operationId"]: op.get("x-tunnelplane-policy")
        for item in spec["paths"].values()
        for op in item.values()
    }
    for service in SERVICES:
        for method in bound(service):
            policy = method.GetOptions().Extensions[options_pb2.policy]
            described = documented[f"{service.name}_{method.name}"]
            assert described is not None
            public = policy.access == options_pb2.ACCESS_PUBLIC
            assert described["access"] == ("public" if public else "authenticated")


async def test_docs_page_is_served_from_local_files(http: httpx.AsyncClient) -> None:
    page = await http.get("/api/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "default-src 'self'" in csp
    html = page.text
    assert "http://" not in html
    assert "https://" not in html  # no CDN
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources
    for source in sources:
        assert source.startswith("/api/docs/")
        asset = await http.get(source)
        assert asset.status_code == 200, source
        assert len(asset.content) > 0
    initializer = (await http.get("/api/docs/init.js")).text
    assert 'url: "/openapi.json"' in initializer
    bundle = await http.get("/api/docs/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert len(bundle.content) > 500_000
    assert (await http.get("/api/docs/../../etc/passwd")).status_code == 404
    assert (await http.get("/api/docs/nope.js")).status_code == 404


async def test_health_and_readiness_follow_the_grpc_health_service(
    app: App, http: httpx.AsyncClient
) -> None:
    assert (await http.get("/healthz")).json() == {"status": "SERVING"}
    ready = (await http.get("/readyz")).json()
    assert ready["services"] == {
        "tunnelplane.v1.AuthService": "SERVING",
        "tunnelplane.v1.UserService": "SERVING",
        "tunnelplane.v1.AdminService": "SERVING",
        "tunnelplane.v1.AuditService": "SERVING",
        "tunnelplane.v1.TunnelService": "SERVING",
        "tunnelplane.v1.EventService": "SERVING",  # AgentService has no HTTP binding
        "tunnelplane.v1.WebhookService": "SERVING",
        "tunnelplane.v1.OperationService": "SERVING",
        "tunnelplane.v1.ProxyService": "SERVING",
    }
    assert ready["status"] == "SERVING"
    assert ready["dependencies"]["database"] == "SERVING"
    assert set(ready["dependencies"]) <= {"database", "redis"}  # no replica configured


async def test_the_proxies_questions_are_documented(http: httpx.AsyncClient) -> None:
    spec = await document(http)
    check = spec["paths"]["/v1/tunnelAccess:check"]["post"]
    assert check["security"] == []
    assert check["x-tunnelplane-policy"] == {"access": "public", "audited": False}
    assert check["summary"].startswith("Decides whether a web request may use a tunnel")
    link = spec["paths"]["/v1/users/{user}/tunnels/{tunnel}:authorizeAgentLink"]["post"]
    assert link["security"] == [{"bearer": []}]
    assert link["x-tunnelplane-policy"] == {
        "access": "authenticated",
        "audited": False,
        "permission": "agent.connect",
        "credentials": ["api_key"],
    }
    schemas = spec["components"]["schemas"]
    config = schemas["tunnelplane.v1.TunnelConfig"]["properties"]
    assert config["webAccess"]["$ref"] == "#/components/schemas/tunnelplane.v1.WebAccess"
    assert {"WEB_ACCESS_IP_ALLOWLIST", "WEB_ACCESS_BASIC"} <= set(
        schemas["tunnelplane.v1.WebAccess"]["enum"]
    )
    # The basic password is write-only, and whether one is set is read-only.
    assert config["basicPassword"]["writeOnly"] is True
    assert config["basicPasswordSet"]["readOnly"] is True
    request = schemas["tunnelplane.v1.CheckTunnelAccessRequest"]["properties"]
    assert {"basicUsername", "basicPassword"} <= set(request)
    decision = schemas["tunnelplane.v1.TunnelAccessDecision"]["properties"]
    assert set(decision) == {"allowed", "refusal", "tunnel", "cacheFor", "basicAuth"}
