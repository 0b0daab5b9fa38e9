"""Errors, headers and what surrounds every response (TRANSCODING.md "Errors", "Headers and
metadata", "Around the transcoder"): status mapping and the JSON error body, header <->
metadata rules, Grpc-Timeout, security headers, CORS, gzip and the body limit."""

from __future__ import annotations

import base64
import gzip
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given
from hypothesis import strategies as st

from gateway import errors, headers
from gateway.app import GatewayOptions
from tests.gateway.conftest import Running, running
from tests.gateway.upstream import rich_status

ORIGIN = "https://app.example"
SECURITY = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "x-permitted-cross-domain-policies": "none",
    "x-dns-prefetch-control": "off",
}
#: What the echo upstream's Fail method attaches to every status it returns.
FAIL_DETAILS = [
    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "TEST_REASON",
     "domain": "echo.test"},
    {"@type": "type.googleapis.com/google.rpc.BadRequest",
     "fieldViolations": [{"field": "code"}]},
]  # fmt: skip
SPEC_STATUS = {
    0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400,
    10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
}  # fmt: skip


# --- Status mapping and the error body --------------------------------------------------


@pytest.mark.parametrize(("code", "status"), sorted(SPEC_STATUS.items()))
def test_http_status_table(code: int, status: int) -> None:
    assert errors.http_status(code) == status


def test_unknown_code_is_500() -> None:
    assert errors.http_status(17) == errors.http_status(-1) == 500


@pytest.mark.parametrize("code", range(1, 17))
async def test_upstream_status_becomes_http_status_and_json_body(gw: Running, code: int) -> None:
    response = await gw.http.get(f"/v1/fail/{code}", params={"message": f"failure {code}"})
    assert response.status_code == SPEC_STATUS[code]
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "code": code,
        "message": f"failure {code}",
        "details": FAIL_DETAILS,
        "requestId": response.headers["x-request-id"],
    }
    assert ("www-authenticate" in response.headers) == (code == 16)


async def test_unauthenticated_challenges(gw: Running) -> None:
    response = await gw.http.get("/v1/fail/16")
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_ok_is_200(gw: Running) -> None:
    # Fail(code=0) cannot return OK through grpc.aio's abort; a plain call stands for code 0.
    assert (await gw.http.get("/v1/echo")).status_code == 200


async def test_request_id_is_quoted_in_the_error(gw: Running) -> None:
    response = await gw.http.get("/v1/fail/5", headers={"x-request-id": "req-42"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "req-42"
    assert response.json()["requestId"] == "req-42"


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "reason", "allow"),
    [
        ("GET", "/nope", 404, 5, "NOT_FOUND", None),
        ("GET", "/v1/things/a/b/c", 404, 5, "NOT_FOUND", None),
        ("GET", "/v1/things/", 404, 5, "NOT_FOUND", None),
        ("DELETE", "/v1/echo", 405, 12, "METHOD_NOT_ALLOWED", "GET, POST"),
        ("POST", "/v1/things/t1", 405, 12, "METHOD_NOT_ALLOWED", "GET, PATCH"),
        ("GET", "/v1/things/t1/blob", 200, None, None, None),
        ("DELETE", "/v1/things/t1/blob", 405, 12, "METHOD_NOT_ALLOWED", "GET, PUT"),
        ("GET", "/v1/things/t1:frobnicate", 200, None, None, None),  # colon as data: GetThing
        # The verb route (POST) and, with the colon as data, GetThing and UpdateThing.
        ("PUT", "/v1/things/t1:frobnicate", 405, 12, "METHOD_NOT_ALLOWED", "GET, PATCH, POST"),
    ],
)
async def test_unknown_path_and_wrong_method(
    gw: Running,
    method: str,
    path: str,
    status: int,
    code: int | None,
    reason: str | None,
    allow: str | None,
) -> None:
    response = await gw.http.request(method, path)
    assert response.status_code == status
    assert response.headers.get("allow") == allow
    if code is None:
        return
    body = response.json()
    assert (body["code"], body["requestId"]) == (code, response.headers["x-request-id"])
    assert body["details"] == [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
         "domain": "gateway"}
    ]  # fmt: skip


def test_status_from_trailers() -> None:
    rich = rich_status(5, "rich")
    trailers = [("other", "x"), ("grpc-status-details-bin", rich.SerializeToString())]
    assert errors.status_from_trailers(5, "plain", trailers) == rich
    # A detail whose code disagrees with the real status, or that is garbage: plain status.
    plain = status_pb2.Status(code=13, message="plain")
    assert errors.status_from_trailers(13, "plain", trailers) == plain
    assert errors.status_from_trailers(13, "plain", [("grpc-status-details-bin", b"\xff")]) == (
        plain
    )
    assert errors.status_from_trailers(13, "plain", []) == plain


def test_error_body_renders_details_and_keeps_unknown_ones_opaque() -> None:
    status = status_pb2.Status(code=8, message="slow down")
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay={"seconds": 3}))
    unknown = any_pb2.Any(type_url="type.googleapis.com/no.such.Type", value=b"\x08\x01")
    status.details.extend([retry, unknown])
    document = orjson.loads(errors.error_body(status, "rid", None))
    assert document == {
        "code": 8,
        "message": "slow down",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"},
            {"@type": "type.googleapis.com/no.such.Type", "value": "CAE="},
        ],
        "requestId": "rid",
    }


def test_invalid_argument_names_every_field() -> None:
    error = errors.GatewayError.invalid_argument([("a.b", "bad"), ("c", "worse")])
    assert (error.http, error.status.code, error.status.message) == (400, 3, "a.b: bad; c: worse")
    bad = error_details_pb2.BadRequest()
    assert error.status.details[1].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("a.b", "bad"),
        ("c", "worse"),
    ]


# --- Request headers -> metadata --------------------------------------------------------


async def received(gw: Running, sent: dict[str, str]) -> dict[str, str]:
    """The metadata the upstream received for a request with ``sent`` headers."""
    response = await gw.http.post("/v1/headers", json={}, headers=sent)
    assert response.status_code == 200, response.text
    metadata: dict[str, str] = response.json()["received"]
    return metadata


@pytest.mark.parametrize(
    ("header", "value", "key", "expected"),
    [
        ("Authorization", "Bearer t0ken", "authorization", "Bearer t0ken"),
        ("Grpc-Metadata-Foo", "bar", "foo", "bar"),
        ("grpc-metadata-tenant.id", "t_1", "tenant.id", "t_1"),
        ("Grpc-Metadata-X-Bin", base64.b64encode(b"\x00\x01\xfe").decode(), "x-bin", "0001fe"),
        ("Cookie", "session=abc; theme=dark", "grpcgateway-cookie", "session=abc; theme=dark"),
        ("User-Agent", "tests/1.0", "grpcgateway-user-agent", "tests/1.0"),
        ("Accept-Language", "fr-CH, fr;q=0.9", "grpcgateway-accept-language", "fr-CH, fr;q=0.9"),
        ("Referer", "https://app.example/x", "grpcgateway-referer", "https://app.example/x"),
        ("If-None-Match", '"v1"', "grpcgateway-if-none-match", '"v1"'),
    ],
)
async def test_header_becomes_metadata(
    gw: Running, header: str, value: str, key: str, expected: str
) -> None:
    assert (await received(gw, {header: value}))[key] == expected


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Connection", "keep-alive, x-drop"),
        ("Upgrade", "h2c"),
        ("TE", "trailers"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Custom", "not forwarded"),
        ("X-Api-Version", "v2-not-forwarded"),
    ],
)
async def test_header_that_never_becomes_metadata(gw: Running, header: str, value: str) -> None:
    metadata = await received(gw, {header: value})
    name = header.lower()
    assert name not in metadata
    assert f"grpcgateway-{name}" not in metadata
    assert value not in metadata.values()


async def test_transfer_encoding_is_not_forwarded(gw: Running) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"{"
        yield b"}"

    response = await gw.http.post("/v1/headers", content=chunks())
    assert response.status_code == 200
    metadata = response.json()["received"]
    assert not any("transfer-encoding" in key for key in metadata)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Grpc-Metadata-Grpc-Status", "0"),  # reserved for gRPC itself
        ("Grpc-Metadata-K!y", "x"),
        ("Grpc-Metadata-", "x"),
        ("Grpc-Metadata-X-Bin", "%%%"),
        ("Grpc-Metadata-X-Bin", "AAH-"),  # -Bin values are standard base64
    ],
)
async def test_bad_metadata_header_is_400(gw: Running, header: str, value: str) -> None:
    response = await gw.http.post("/v1/headers", json={}, headers={header: value})
    assert response.status_code == 400
    assert response.json()["code"] == 3


async def test_forwarded_for_and_host(gw: Running) -> None:
    metadata = await received(gw, {})
    assert metadata["x-forwarded-for"] == "127.0.0.1"
    assert metadata["x-forwarded-host"] == gw.http.base_url.netloc.decode()
    chained = await received(gw, {"X-Forwarded-For": "203.0.113.9, 10.0.0.1"})
    assert chained["x-forwarded-for"] == "203.0.113.9, 10.0.0.1, 127.0.0.1"


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("req-1", True),
        ("0f1e2d3c-aaaa-bbbb-cccc-000000000000", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("has space", False),
        ("semi;colon", False),
        ("", False),
    ],
)
async def test_request_id_passed_through_or_created(gw: Running, given: str, kept: bool) -> None:
    sent = {"X-Request-Id": given} if given else {}
    response = await gw.http.post("/v1/headers", json={}, headers=sent)
    request_id = response.headers["x-request-id"]
    received = response.json()["received"]
    assert received["x-request-id"] == request_id
    # The upstream can tell a caller's id (an idempotency key) from one made up here.
    assert received.get("x-request-id-generated") == (None if kept else "1")
    if kept:
        assert request_id == given
    else:
        assert request_id != given
        assert len(request_id) == 32
        int(request_id, 16)


# --- Reply metadata -> response headers -------------------------------------------------


async def test_reply_metadata_and_trailers(gw: Running) -> None:
    body = {
        "replyHeaders": {"x-a": "1", "set-cookie": "s=1; HttpOnly", "location": "/v1/x"},
        "replyTrailers": {"x-t": "2", "etag": 'W/"7"', "sunset": "Sat, 1 Jan 2028 00:00:00 GMT"},
    }
    plain = await gw.http.post("/v1/headers", json=body)
    with_te = await gw.http.post("/v1/headers", json=body, headers={"TE": "trailers"})
    for response in (plain, with_te):
        assert response.status_code == 200
        assert response.headers["grpc-metadata-x-a"] == "1"
        # The allowlist also goes out as plain headers, trailers included.
        assert response.headers.get_list("set-cookie") == ["s=1; HttpOnly"]
        assert response.headers["location"] == "/v1/x"
        assert response.headers["etag"] == 'W/"7"'
        assert response.headers["sunset"] == "Sat, 1 Jan 2028 00:00:00 GMT"
        assert "x-a" not in response.headers
        assert "x-t" not in response.headers
    assert not any(key.startswith("grpc-trailer-") for key in plain.headers)
    assert with_te.headers["grpc-trailer-x-t"] == "2"
    assert with_te.headers["grpc-trailer-etag"] == 'W/"7"'


@pytest.mark.parametrize("te", ["", "trailers"])
@pytest.mark.parametrize("where", ["replyHeaders", "replyTrailers"])
async def test_set_cookie_is_never_mirrored_as_a_readable_header(
    gw: Running, where: str, te: str
) -> None:
    # A browser hides Set-Cookie from scripts; a Grpc-Metadata-/Grpc-Trailer- copy of an
    # HttpOnly cookie (a refresh token) would hand it to any script on the page.
    cookie = "tp_refresh=secret-value; HttpOnly; Secure"
    body = {where: {"set-cookie": cookie, "x-other": "1"}}
    response = await gw.http.post("/v1/headers", json=body, headers={"TE": te} if te else {})
    assert response.status_code == 200
    assert response.headers.get_list("set-cookie") == [cookie]
    readable = [k for k, v in response.headers.multi_items() if "secret-value" in v]
    assert readable == ["set-cookie"]
    if where == "replyHeaders" or te:
        prefix = "grpc-metadata-" if where == "replyHeaders" else "grpc-trailer-"
        assert response.headers[prefix + "x-other"] == "1"  # other metadata still mirrored


async def test_request_id_from_the_upstream_is_not_duplicated(gw: Running) -> None:
    body = {"replyHeaders": {"x-request-id": "upstream-1"}}
    response = await gw.http.post("/v1/headers", json=body, headers={"X-Request-Id": "gw-1"})
    assert response.headers.get_list("x-request-id") == ["upstream-1"]
    assert response.json()["received"]["x-request-id"] == "gw-1"


async def test_error_trailers_and_allowlisted_retry_after(gw: Running) -> None:
    plain = await gw.http.get("/v1/fail/14")
    assert plain.status_code == 503
    assert plain.headers["retry-after"] == "7"
    assert plain.headers["grpc-metadata-x-custom"] == "initial"
    assert "grpc-trailer-retry-after" not in plain.headers
    assert "grpc-trailer-grpc-status-details-bin" not in plain.headers
    with_te = await gw.http.get("/v1/fail/8", headers={"TE": "trailers"})
    assert with_te.status_code == 429
    assert with_te.headers["grpc-trailer-retry-after"] == "7"
    assert with_te.headers["retry-after"] == "7"
    assert "grpc-trailer-grpc-status-details-bin" not in with_te.headers


def test_outbound_encodes_binary_and_skips_unsafe_values() -> None:
    out = headers.outbound(
        [("x-bin", b"\x00\xff"), ("x-split", "a\r\nInjected: 1"), ("etag", "1"), ("etag", "2")],
        [("set-cookie", "a=1"), ("set-cookie", "b=2")],
        trailers_wanted=False,
    )
    assert out == [
        (b"Grpc-Metadata-x-bin", b"AP8="),
        (b"Grpc-Metadata-etag", b"1"),
        (b"etag", b"1"),
        (b"Grpc-Metadata-etag", b"2"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    mirrored = headers.outbound(
        [("set-cookie", "c=3")], [("set-cookie", "d=4")], trailers_wanted=True
    )
    assert mirrored == [(b"set-cookie", b"c=3"), (b"set-cookie", b"d=4")]


# --- Grpc-Timeout -----------------------------------------------------------------------


async def test_timeout_sets_the_deadline(gw: Running) -> None:
    response = await gw.http.get("/v1/slow", headers={"Grpc-Timeout": "200m"})
    assert response.status_code == 504
    assert response.json()["code"] == 4


@pytest.mark.parametrize("value", ["5S", "1H", "2M", "250000u", "99999999n", "00000009S"])
async def test_valid_timeouts_are_accepted(gw: Running, value: str) -> None:
    response = await gw.http.get("/v1/echo", headers={"Grpc-Timeout": value})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "value", ["5x", "-1S", "99999999999S", "123456789S", "1.5S", "S", "", "5 S", "5s", "0x5S"]
)
async def test_malformed_timeout_is_400(gw: Running, value: str) -> None:
    response = await gw.http.get(
        "/v1/echo", headers={"Grpc-Timeout": value, "X-Request-Id": "timeout-1"}
    )
    assert response.status_code == 400
    body = response.json()
    assert body["details"][1]["fieldViolations"][0]["field"] == "Grpc-Timeout"
    assert body["requestId"] == response.headers["x-request-id"] == "timeout-1"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5S", 5.0), ("200m", 0.2), ("1H", 3600.0), ("3M", 180.0), ("7u", 7e-6), ("9n", 9e-9)],
)
def test_parse_timeout(value: str, seconds: float) -> None:
    assert headers.parse_timeout(value) == pytest.approx(seconds)


# --- Security headers, CORS -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("GET", "/v1/echo", {}, 200),
        ("GET", "/nope", {}, 404),
        ("DELETE", "/v1/echo", {}, 405),
        ("GET", "/v1/fail/14", {}, 503),
        ("GET", "/v1/things/t/blob", {}, 200),
        ("GET", "/v1/things:stream?count=2", {}, 200),
        ("GET", "/v1/echo?int32_value=x", {}, 400),
        ("GET", "/openapi.json", {}, 200),
        ("GET", "/v1/echo", {"headers": {"Grpc-Timeout": "bad"}}, 400),
        (
            "OPTIONS",
            "/v1/echo",
            {"headers": {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}},
            204,
        ),
    ],
)
async def test_security_headers_on_every_response(
    gw: Running, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    response = await gw.http.request(method, path, **kwargs)
    assert response.status_code == status
    assert {k: response.headers.get(k) for k in SECURITY} == SECURITY
    assert response.headers["x-request-id"]
    assert "strict-transport-security" not in response.headers  # plain HTTP: no HSTS


async def test_preflight_from_allowed_origin(gw: Running) -> None:
    response = await gw.http.options(
        "/v1/echo",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 204
    assert response.content == b""
    assert response.headers["access-control-allow-methods"] == "GET, POST"
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    assert int(response.headers["access-control-max-age"]) > 0


@pytest.mark.parametrize("origin", ["https://evil.example", "http://app.example", "null"])
async def test_preflight_from_other_origin_is_403(gw: Running, origin: str) -> None:
    response = await gw.http.options(
        "/v1/echo", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
    )
    assert response.status_code == 403
    assert response.json()["code"] == 7
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-methods" not in response.headers


@pytest.mark.parametrize(
    ("origin", "path", "allowed"),
    [
        (ORIGIN, "/v1/echo", True),
        (ORIGIN, "/v1/fail/5", True),
        (ORIGIN, "/nope", True),
        ("https://evil.example", "/v1/echo", False),
        ("https://evil.example", "/v1/fail/5", False),
        (None, "/v1/echo", False),
    ],
)
async def test_cors_headers_on_actual_requests(
    gw: Running, origin: str | None, path: str, allowed: bool
) -> None:
    response = await gw.http.get(path, headers={"Origin": origin} if origin else {})
    cors = {k: v for k, v in response.headers.items() if k.startswith("access-control-")}
    if not allowed:
        assert cors == {}
        return
    assert cors["access-control-allow-origin"] == ORIGIN
    assert cors["access-control-allow-credentials"] == "true"
    exposed = {h.strip() for h in cors["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "retry-after", "etag", "location"} <= exposed
    assert "Origin" in response.headers.get_list("vary")


async def test_a_wildcard_lets_any_origin_read_but_never_with_credentials(
    echo_upstream: int,
) -> None:
    """``*`` is for public reads: reflecting every origin with
    ``Access-Control-Allow-Credentials`` would let any page of the same site read what the
    browser's cookies authenticate (the access-token cookie of a watch)."""
    options = GatewayOptions(cors_origins=frozenset({"*", ORIGIN}))
    anyone: list[httpx.Response] = []
    async for gw in running(echo_upstream, options):
        for origin in ("https://any.example", "http://127.0.0.1:9"):
            anyone.append(
                await gw.http.options(
                    "/v1/echo", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
                )
            )
            anyone.append(await gw.http.get("/v1/echo", headers={"Origin": origin}))
        named = await gw.http.get("/v1/echo", headers={"Origin": ORIGIN})
    for response in anyone:
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers
    assert named.headers["access-control-allow-origin"] == ORIGIN
    assert named.headers["access-control-allow-credentials"] == "true"


async def test_cors_off_by_default(strict_gw: Running) -> None:
    response = await strict_gw.http.options(
        "/v1/echo", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    )
    assert response.status_code == 403


# --- gzip -------------------------------------------------------------------------------


async def raw_response(
    gw: Running, path: str, accept_encoding: str
) -> tuple[httpx.Response, bytes]:
    """The response and its body exactly as sent (not decoded)."""
    async with gw.http.stream("GET", path, headers={"Accept-Encoding": accept_encoding}) as r:
        return r, b"".join([chunk async for chunk in r.aiter_raw()])


@pytest.mark.parametrize(
    ("length", "accept_encoding", "compressed"),
    [
        (2000, "gzip", True),
        (2000, "br, gzip;q=0.8", True),
        (2000, "identity", False),
        (10, "gzip", False),
    ],
)
async def test_gzip_of_large_responses(
    gw: Running, length: int, accept_encoding: str, compressed: bool
) -> None:
    path = f"/v1/echo?string_value={'x' * length}"
    expected = (await gw.http.get(path, headers={"Accept-Encoding": "identity"})).json()
    response, raw = await raw_response(gw, path, accept_encoding)
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(raw)
    if compressed:
        assert response.headers["content-encoding"] == "gzip"
        assert "Accept-Encoding" in response.headers.get_list("vary")
        assert len(raw) < len(orjson.dumps(expected))
        assert orjson.loads(gzip.decompress(raw)) == expected
    else:
        assert "content-encoding" not in response.headers
        assert orjson.loads(raw) == expected


async def test_gzip_threshold_is_one_kib(gw: Running) -> None:
    sizes = {}
    for length in range(600, 1200, 4):
        response, raw = await raw_response(gw, f"/v1/echo?string_value={'y' * length}", "gzip")
        plain_size = (
            len(gzip.decompress(raw)) if "content-encoding" in response.headers else len(raw)
        )
        sizes[plain_size] = "content-encoding" in response.headers
    assert all(gzipped == (size >= 1024) for size, gzipped in sizes.items())
    assert any(sizes.values())
    assert not all(sizes.values())


# --- Body limit -------------------------------------------------------------------------


async def test_body_limit_with_content_length(strict_gw: Running) -> None:
    small = await strict_gw.http.post("/v1/echo", json={"stringValue": "x" * 900})
    assert small.status_code == 200
    big = await strict_gw.http.post("/v1/echo", json={"stringValue": "x" * 1100})
    assert big.status_code == 413
    assert big.json()["details"][0]["reason"] == "BODY_TOO_LARGE"


async def test_body_limit_with_chunked_body(strict_gw: Running) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"stringValue": "'
        for _ in range(12):
            yield b"x" * 100
        yield b'"}'

    response = await strict_gw.http.post("/v1/echo", content=chunks())
    assert response.status_code == 413
    assert response.json()["code"] == 3


async def test_body_at_the_limit_is_accepted(strict_gw: Running) -> None:
    prefix, suffix = b'{"stringValue": "', b'"}'
    body = prefix + b"z" * (1024 - len(prefix) - len(suffix)) + suffix
    assert len(body) == 1024
    response = await strict_gw.http.post("/v1/echo", content=body)
    assert response.status_code == 200
    assert response.json()["stringValue"] == "z" * (1024 - len(prefix) - len(suffix))


# --- rate-limit headers -----------------------------------------------------------------


@given(
    limit=st.integers(0, 10**12), remaining=st.integers(0, 10**12), reset=st.integers(0, 10**9),
    refused=st.booleans(),
)  # fmt: skip
def test_http_gets_the_x_ratelimit_trio_from_the_ietf_pair(
    limit: int, remaining: int, reset: int, refused: bool
) -> None:
    """gRPC carries only RateLimit-Policy/RateLimit; HTTP clients get the same numbers as
    X-RateLimit-*, whether the metadata came as headers or as the trailers of an error."""
    pair = [
        ("ratelimit-policy", f'"default";q={limit};w=60;burst=3'),
        ("ratelimit", f'"default";r={remaining};t={reset}'),
    ]
    sent = (
        headers.outbound([], pair, trailers_wanted=False)
        if refused
        else (headers.outbound(pair, [], trailers_wanted=False))
    )
    plain = {k.decode(): v.decode() for k, v in sent if not k.startswith(b"Grpc-")}
    assert plain == {
        "ratelimit-policy": pair[0][1], "ratelimit": pair[1][1],
        "x-ratelimit-limit": str(limit), "x-ratelimit-remaining": str(remaining),
        "x-ratelimit-reset": str(reset),
    }  # fmt: skip


@given(value=st.text(max_size=60))
def test_a_malformed_ratelimit_field_derives_nothing_it_cannot_read(value: str) -> None:
    sent = headers.outbound([("ratelimit", value)], [], trailers_wanted=False)
    for key, header in sent:
        if key.startswith(b"x-ratelimit-"):
            assert header.isdigit()
            assert f"={header.decode()}" in value
