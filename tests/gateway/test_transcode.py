"""Request and response transcoding (TRANSCODING.md "Request message" and "JSON").

Most cases go end to end through the gateway to the echo upstream, which returns the
request it received: the JSON that comes back is the message the gateway built.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from google.protobuf import json_format

from gateway import transcode
from gateway.jsonenc import JsonEncoder
from tests.gateway.conftest import Running
from tests.gateway.echo_proto import echo_pb2
from tests.gateway.upstream import PNG

EVERYTHING = echo_pb2.Everything.DESCRIPTOR
#: What GET /v1/echo returns for an empty request when zero values are emitted.
DEFAULTS = json_format.MessageToDict(
    echo_pb2.Everything(), always_print_fields_with_no_presence=True
)
U64_MAX = str(2**64 - 1)
I64_MIN = str(-(2**63))
BEYOND_2_53 = str(2**53 + 1)


async def echo(gw: Running, query: str) -> dict[str, Any]:
    """GET /v1/echo?<query> (sent exactly as written); the echoed request."""
    response = await gw.http.get(f"/v1/echo?{query}")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def violation(response: Any) -> str:
    """The field a 400's BadRequest detail names."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == 3
    bad = [d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    assert len(bad) == 1
    field: str = bad[0]["fieldViolations"][0].get("field", "")  # "" is omitted in JSON
    return field


# --- Query: every scalar type -----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "key", "value"),
    [
        ("double_value=1.5", "doubleValue", 1.5),
        ("double_value=-2e-3", "doubleValue", -0.002),
        ("double_value=%2B7", "doubleValue", 7.0),
        ("double_value=.5", "doubleValue", 0.5),
        ("double_value=NaN", "doubleValue", "NaN"),
        ("double_value=Infinity", "doubleValue", "Infinity"),
        ("double_value=-Infinity", "doubleValue", "-Infinity"),
        ("double_value=1.7976931348623157e308", "doubleValue", 1.7976931348623157e308),
        ("float_value=0.25", "floatValue", 0.25),
        ("float_value=-Infinity", "floatValue", "-Infinity"),
        ("float_value=3.4e38", "floatValue", 3.4e38),
        ("float_value=3.4028235e%2B38", "floatValue", 3.4028235e38),  # as printed: max float
        ("int32_value=-2147483648", "int32Value", -(2**31)),
        ("int32_value=2147483647", "int32Value", 2**31 - 1),
        ("int32_value=%2B12", "int32Value", 12),
        ("int64_value=" + BEYOND_2_53, "int64Value", BEYOND_2_53),
        ("int64_value=9223372036854775807", "int64Value", str(2**63 - 1)),
        ("int64_value=" + I64_MIN, "int64Value", I64_MIN),
        ("uint32_value=4294967295", "uint32Value", 2**32 - 1),
        ("uint64_value=" + U64_MAX, "uint64Value", U64_MAX),
        ("sint32_value=-5", "sint32Value", -5),
        ("sint64_value=-" + BEYOND_2_53, "sint64Value", "-" + BEYOND_2_53),
        ("fixed32_value=4294967295", "fixed32Value", 2**32 - 1),
        ("fixed64_value=" + U64_MAX, "fixed64Value", U64_MAX),
        ("sfixed32_value=-1", "sfixed32Value", -1),
        ("sfixed64_value=" + I64_MIN, "sfixed64Value", I64_MIN),
        ("string_value=hello", "stringValue", "hello"),
        ("string_value=a+b", "stringValue", "a b"),  # + is a space in a query
        ("string_value=a%2Bb", "stringValue", "a+b"),
        ("string_value=caf%C3%A9%26%3D", "stringValue", "café&="),
        # bytes: standard and URL-safe base64, with and without padding (output: standard).
        ("bytes_value=3q2%2B7w%3D%3D", "bytesValue", "3q2+7w=="),
        ("bytes_value=3q2%2B7w", "bytesValue", "3q2+7w=="),
        ("bytes_value=3q2-7w%3D%3D", "bytesValue", "3q2+7w=="),
        ("bytes_value=3q2-7w", "bytesValue", "3q2+7w=="),
        ("bytes_value=_-8", "bytesValue", "/+8="),
        ("bytes_value=YQ", "bytesValue", "YQ=="),
        # enums by name and number; an unknown number stays (proto3 enums are open).
        ("color=COLOR_RED", "color", "COLOR_RED"),
        ("color=2", "color", "COLOR_GREEN"),
        ("color=7", "color", 7),
        # well-known types
        ("timestamp=2024-01-02T03:04:05Z", "timestamp", "2024-01-02T03:04:05Z"),
        ("timestamp=2024-01-02T03:04:05.5%2B01:00", "timestamp", "2024-01-02T02:04:05.500Z"),
        ("timestamp=2024-01-02T03:04:05-02:30", "timestamp", "2024-01-02T05:34:05Z"),
        ("duration=1.5s", "duration", "1.500s"),
        ("duration=-3s", "duration", "-3s"),
        ("field_mask=nested.name,int32_value", "fieldMask", "nested.name,int32Value"),
        ("field_mask=int32Value,nested.deeper.flag", "fieldMask", "int32Value,nested.deeper.flag"),
        ("fieldMask=repeatedString", "fieldMask", "repeatedString"),
        # wrappers: the plain value, presence kept
        ("wrapped_bool=false", "wrappedBool", False),
        ("wrapped_string=", "wrappedString", ""),
        ("wrapped_int64=" + BEYOND_2_53, "wrappedInt64", BEYOND_2_53),
        ("wrapped_double=0", "wrappedDouble", 0.0),
        ("wrapped_bytes=3q2-7w", "wrappedBytes", "3q2+7w=="),
        ("wrapped_uint64=" + U64_MAX, "wrappedUint64", U64_MAX),
        ("optional_string=", "optionalString", ""),  # presence of an explicit empty string
        # JSON names
        ("stringValue=json", "stringValue", "json"),
        ("int64Value=-1", "int64Value", "-1"),
        ("customJsonName=x", "customJsonName", "x"),
        ("json_named=y", "customJsonName", "y"),
        # oneof
        ("choice_text=t", "choiceText", "t"),
        ("choiceNumber=3", "choiceNumber", 3),
        # repeated scalars by repeating the parameter
        ("repeated_string=a&repeated_string=b+c", "repeatedString", ["a", "b c"]),
        ("repeated_int64=1&repeatedInt64=" + BEYOND_2_53, "repeatedInt64", ["1", BEYOND_2_53]),
        (
            "repeated_color=COLOR_RED&repeated_color=2",
            "repeatedColor",
            ["COLOR_RED", "COLOR_GREEN"],
        ),
        # nested dotted paths, proto and JSON names
        ("nested.name=n", "nested", {"name": "n", "number": 0}),
        ("nested.number=-3&nested.name=n", "nested", {"name": "n", "number": -3}),
        (
            "nested.deeper.flag=true",
            "nested",
            {"name": "", "number": 0, "deeper": {"flag": True, "words": []}},
        ),
        (
            "nested.deeper.words=a&nested.deeper.words=b",
            "nested",
            {"name": "", "number": 0, "deeper": {"flag": False, "words": ["a", "b"]}},
        ),
    ],
)
async def test_query_sets_each_field(gw: Running, query: str, key: str, value: Any) -> None:
    document = await echo(gw, query)
    assert document[key] == value
    assert {k: v for k, v in document.items() if k != key} == {
        k: v for k, v in DEFAULTS.items() if k != key
    }


@pytest.mark.parametrize("spelling", ["1", "t", "T", "TRUE", "true", "True"])
async def test_query_bool_true_spellings(gw: Running, spelling: str) -> None:
    assert (await echo(gw, f"bool_value={spelling}"))["boolValue"] is True


@pytest.mark.parametrize("spelling", ["0", "f", "F", "FALSE", "false", "False"])
async def test_query_bool_false_spellings(gw: Running, spelling: str) -> None:
    # Presence shows that "false" was read: a wrapper keeps it, a plain bool is just false.
    document = await echo(gw, f"bool_value={spelling}&wrapped_bool={spelling}")
    assert (document["boolValue"], document["wrappedBool"]) == (False, False)


async def test_query_float_keeps_float_precision(gw: Running) -> None:
    document = await echo(gw, "float_value=0.1&double_value=0.1")
    assert document["doubleValue"] == 0.1
    assert math.isclose(document["floatValue"], 0.1, rel_tol=1e-7)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("int32_value=2147483648", "int32_value"),
        ("int32_value=-2147483649", "int32_value"),
        ("int32_value=1.5", "int32_value"),
        ("int32_value=abc", "int32_value"),
        ("int32_value=", "int32_value"),
        ("int32_value=1_000", "int32_value"),
        ("int32_value=%205", "int32_value"),
        ("int32_value=%D9%A3", "int32_value"),  # an Arabic-Indic digit
        ("int32_value=0x10", "int32_value"),
        ("int64_value=9223372036854775808", "int64_value"),
        ("int64_value=1e3", "int64_value"),
        ("uint32_value=-1", "uint32_value"),
        ("uint32_value=4294967296", "uint32_value"),
        ("uint64_value=-1", "uint64_value"),
        ("uint64_value=18446744073709551616", "uint64_value"),
        ("fixed32_value=-1", "fixed32_value"),
        ("fixed64_value=-1", "fixed64_value"),
        ("sint32_value=2147483648", "sint32_value"),
        ("sfixed64_value=-9223372036854775809", "sfixed64_value"),
        ("double_value=abc", "double_value"),
        ("double_value=nan", "double_value"),
        ("double_value=inf", "double_value"),
        ("double_value=1e999", "double_value"),
        ("double_value=1_0.5", "double_value"),
        ("float_value=1e39", "float_value"),
        ("float_value=-3.5e38", "float_value"),
        ("float_value=3.4028236e38", "float_value"),
        ("bool_value=yes", "bool_value"),
        ("bool_value=TrUe", "bool_value"),
        ("bool_value=", "bool_value"),
        ("bytes_value=%21%21%21%21", "bytes_value"),
        ("bytes_value=ab-c%21%21", "bytes_value"),
        ("bytes_value=Y", "bytes_value"),
        ("color=COLOR_PURPLE", "color"),
        ("color=red", "color"),
        ("color=99999999999", "color"),
        ("repeated_color=COLOR_RED&repeated_color=BLUE", "repeated_color"),
        ("timestamp=2024-01-02", "timestamp"),
        ("timestamp=2024-01-02T03:04:05+01:00", "timestamp"),  # an unencoded + is a space
        ("duration=1.5", "duration"),
        ("duration=forever", "duration"),
        ("field_mask=_", "field_mask"),  # paths the JSON form cannot carry
        ("field_mask=a__b", "field_mask"),
        ("field_mask=a_1", "field_mask"),
        ("wrapped_int64=abc", "wrapped_int64"),
        ("wrapped_bool=maybe", "wrapped_bool"),
        ("wrappedUint64=-1", "wrappedUint64"),
        ("nested.number=x", "nested.number"),
        ("nested.deeper.flag=2", "nested.deeper.flag"),
        ("repeated_int64=1&repeated_int64=x", "repeated_int64"),
        # Repeated messages, maps, Struct/Value/Any and plain messages cannot come from the URL.
        ("repeated_nested.name=x", "repeated_nested.name"),
        ("repeatedNested=x", "repeatedNested"),
        ("labels=x", "labels"),
        ("labels.key=x", "labels.key"),
        ("struct_value=x", "struct_value"),
        ("value=1", "value"),
        ("any=x", "any"),
        ("nested=x", "nested"),
    ],
)
async def test_query_value_that_does_not_parse_is_400(gw: Running, query: str, field: str) -> None:
    assert violation(await gw.http.get(f"/v1/echo?{query}")) == field


@pytest.mark.parametrize(
    "query", ["unknown=1", "nested.unknown=1", "labels.foo=x", "int32_value.x=1", "=1", "a"]
)
async def test_unknown_query_parameters(gw: Running, strict_gw: Running, query: str) -> None:
    assert await echo(gw, query) == DEFAULTS  # ignored by default
    response = await strict_gw.http.get(f"/v1/echo?{query}")
    assert violation(response) == query.partition("=")[0]


async def test_strict_gateway_still_reads_known_parameters(strict_gw: Running) -> None:
    response = await strict_gw.http.get("/v1/echo?int64_value=5&nested.name=n")
    assert response.status_code == 200
    # Zero values are omitted there.
    assert response.json() == {"int64Value": "5", "nested": {"name": "n"}}


async def test_zero_values_emitted_or_omitted(gw: Running, strict_gw: Running) -> None:
    assert (await gw.http.get("/v1/echo")).json() == DEFAULTS
    assert (await strict_gw.http.get("/v1/echo")).json() == {}
    assert DEFAULTS["int64Value"] == "0"  # 64-bit integers are strings, even zero
    assert DEFAULTS["color"] == "COLOR_UNSPECIFIED"


# --- Path -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # Both variables from the path; the rest of `nested` may still come from the query.
        ("/v1/echo/s/n", {"stringValue": "s", "nested": {"name": "n", "number": 0}}),
        (
            "/v1/echo/s/n?nested.number=4",
            {"stringValue": "s", "nested": {"name": "n", "number": 4}},
        ),
        ("/v1/echo/a%2Fb/c%20d", {"stringValue": "a/b", "nested": {"name": "c d", "number": 0}}),
        # Path values win over the query.
        (
            "/v1/echo/s/n?string_value=q&nested.name=q",
            {"stringValue": "s", "nested": {"name": "n", "number": 0}},
        ),
        ("/v1/echo/s/n?stringValue=q", {"stringValue": "s", "nested": {"name": "n", "number": 0}}),
    ],
)
async def test_path_variables(gw: Running, url: str, expected: dict[str, Any]) -> None:
    response = await gw.http.get(url)
    assert response.status_code == 200
    document = response.json()
    assert {k: document[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("/v1/notes/a%2Fb", "a/b"),  # single segment: fully decoded
        ("/v1/notes/a%3Ab", "a:b"),
        ("/v1/notes/a:b", "a:b"),  # no route declares ":b"
        ("/v1/notes/a:twice", "a:twice"),  # ":twice" is declared, but not for this path
        ("/v1/notes/caf%C3%A9", "café"),
        ("/v1/files/a/b%2Fc/d%20e", "a/b%2Fc/d e"),  # multi-segment: %2F kept
        ("/v1/things/t%2F1", "things/t%2F1"),
        ("/v1/things/t:1", "things/t:1"),
    ],
)
async def test_path_values_decoded_end_to_end(gw: Running, url: str, name: str) -> None:
    response = await gw.http.get(url)
    assert response.status_code == 200
    assert response.json()["name"] == name


async def test_custom_verb_route(gw: Running) -> None:
    response = await gw.http.get("/v1/echo:twice?int32_value=2")
    assert response.status_code == 200
    assert response.json()["int32Value"] == 2


async def test_strict_rejects_query_for_path_fields(strict_gw: Running) -> None:
    response = await strict_gw.http.get("/v1/echo/s/n?nested.name=q")
    assert violation(response) == "nested.name"
    ok = await strict_gw.http.get("/v1/echo/s/n?nested.number=4")
    assert ok.json() == {"stringValue": "s", "nested": {"name": "n", "number": 4}}


async def test_path_value_that_does_not_parse_is_400(gw: Running) -> None:
    assert violation(await gw.http.put("/v1/echo/abc", json={})) == "int64_value"


# --- Body -------------------------------------------------------------------------------


async def test_body_star_fills_everything_and_ignores_query(gw: Running) -> None:
    sent = echo_pb2.Everything(
        int64_value=2**53 + 1,
        uint64_value=2**64 - 1,
        nested=echo_pb2.Nested(name="n", deeper=echo_pb2.Deeper(words=["a"])),
        repeated_nested=[echo_pb2.Nested(number=1)],
        labels={"k": "v"},
        color=echo_pb2.COLOR_GREEN,
        json_named="j",
    )
    sent.struct_value.update({"a": [1, "x", None]})
    sent.any.Pack(echo_pb2.Nested(name="packed"))
    response = await gw.http.post("/v1/echo?int32_value=5", content=json_format.MessageToJson(sent))
    assert response.status_code == 200
    got = json_format.ParseDict(response.json(), echo_pb2.Everything())
    assert got == sent  # int32_value from the query was ignored
    assert response.json()["any"] == {
        "@type": "type.googleapis.com/echo.v1.Nested",
        "name": "packed",
        "number": 0,  # zero values are emitted inside an Any too
    }


async def test_body_accepts_proto_names_and_null(gw: Running) -> None:
    body = {"int32_value": 4, "string_value": "s", "nested": None, "wrappedBool": None}
    response = await gw.http.post("/v1/echo", json=body)
    assert response.status_code == 200
    document = response.json()
    assert (document["int32Value"], document["stringValue"]) == (4, "s")
    assert "nested" not in document
    assert "wrappedBool" not in document


async def test_strict_body_star_rejects_query(strict_gw: Running) -> None:
    response = await strict_gw.http.post("/v1/echo?int32_value=5", json={"int32Value": 1})
    assert violation(response) == "int32_value"


async def test_body_field_nested_with_path_and_query(gw: Running) -> None:
    response = await gw.http.put(
        "/v1/echo/" + BEYOND_2_53,
        params={"string_value": "from-query", "nested.name": "ignored"},
        json={"name": "from-body", "number": 3},
    )
    assert response.status_code == 200
    document = response.json()
    assert document["int64Value"] == BEYOND_2_53
    assert document["stringValue"] == "from-query"
    assert document["nested"] == {"name": "from-body", "number": 3}


async def test_body_field_repeated_is_a_json_array(gw: Running) -> None:
    response = await gw.http.post(
        "/v1/echo/repeated", json=[{"name": "a"}, {"number": 2}], params={"int32_value": "9"}
    )
    assert response.status_code == 200
    document = response.json()
    assert document["repeatedNested"] == [{"name": "a", "number": 0}, {"name": "", "number": 2}]
    assert document["int32Value"] == 9
    assert violation(await gw.http.post("/v1/echo/repeated", json={"name": "a"})) == (
        "repeatedNested"
    )


async def test_path_wins_over_body(gw: Running) -> None:
    response = await gw.http.post(
        "/v1/things/x:frobnicate", json={"name": "things/other", "extra": "e"}
    )
    assert response.status_code == 200
    assert response.json() == {
        "name": "things/x",
        "note": "frobnicated extra=e",
        "tags": [],
        "size": "0",
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{", "body"),
        (b"{'a': 1}", "body"),
        (b"\xff\xfe", "body"),
        (b'{"int32Value": 1,}', "body"),
        (b"[1, 2]", "body"),  # body "*" needs an object
        (b'"text"', "body"),
        (b'{"int32Value": "abc"}', "int32Value"),
        (b'{"int32Value": 2147483648}', "int32Value"),
        (b'{"int32_value": 1.5}', "int32_value"),
        (b'{"uint64Value": -1}', "uint64Value"),
        (b'{"boolValue": "yes"}', "boolValue"),
        (b'{"timestamp": "yesterday"}', "timestamp"),
        (b'{"nested": {"number": "x"}}', "nested.number"),
        (b'{"nested": {"deeper": {"flag": 1}}}', "nested.deeper.flag"),
        (b'{"repeatedString": "a"}', "repeatedString"),
        (b'{"labels": {"a": 1}}', "labels"),
        (b'{"any": {"@type": 5}}', "any"),
        (b'{"any": {"@type": "type.googleapis.com/no.Such"}}', "any"),
        (b'{"structValue": [1]}', "structValue"),
    ],
)
async def test_body_that_does_not_parse_is_400(gw: Running, body: bytes, field: str) -> None:
    response = await gw.http.post(
        "/v1/echo", content=body, headers={"content-type": "application/json"}
    )
    assert violation(response) == field


@pytest.mark.parametrize("body", [b"", b"  \n\t ", b"{}"])
async def test_empty_body_is_an_empty_message(gw: Running, body: bytes) -> None:
    response = await gw.http.post("/v1/echo", content=body)
    assert response.status_code == 200
    assert response.json() == DEFAULTS


ANY_NESTED = "type.googleapis.com/echo.v1.Nested"
ANY_EVERYTHING = "type.googleapis.com/echo.v1.Everything"


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        # Enum values: a name the schema does not have is never dropped silently.
        ("/v1/echo", {"color": "COLOR_PURPLE"}, "color"),
        ("/v1/echo", {"color": "color_red"}, "color"),
        ("/v1/echo", {"color": ""}, "color"),
        ("/v1/echo", {"color": True}, "color"),  # json_format: COLOR_RED
        ("/v1/echo", {"color": 1.5}, "color"),  # json_format: COLOR_RED
        ("/v1/echo", {"color": 2**40}, "color"),  # json_format: dropped
        ("/v1/echo", {"color": "99999999999"}, "color"),
        ("/v1/echo", {"color": {"name": "COLOR_RED"}}, "color"),
        ("/v1/echo", {"color": ["COLOR_RED"]}, "color"),
        ("/v1/echo", {"repeatedColor": ["COLOR_RED", "BLUE"]}, "repeatedColor[1]"),
        ("/v1/echo", {"repeated_color": "COLOR_RED"}, "repeated_color"),
        ("/v1/echo", {"nested": {"deeper": {}}, "color": "NOPE"}, "color"),
        # Message fields take an object (or null), nothing else.
        ("/v1/echo", {"nested": "text"}, "nested"),
        ("/v1/echo", {"nested": 5}, "nested"),
        ("/v1/echo", {"nested": [1]}, "nested"),
        ("/v1/echo", {"nested": True}, "nested"),
        ("/v1/echo", {"nested": {"deeper": "x"}}, "nested.deeper"),
        ("/v1/echo", {"nested": {"deeper": []}}, "nested.deeper"),
        ("/v1/echo", {"repeatedNested": ["a"]}, "repeatedNested[0]"),
        ("/v1/echo", {"repeated_nested": [{"name": "ok"}, 3]}, "repeated_nested[1]"),
        ("/v1/echo", {"repeatedNested": {"name": "x"}}, "repeatedNested"),
        ("/v1/echo", {"labels": "x"}, "labels"),
        # A field given twice: json_format names only the message.
        ("/v1/echo", {"int32Value": 1, "int32_value": 2}, "int32_value"),
        ("/v1/echo", {"choiceText": "a", "choiceNumber": 1}, "choiceNumber"),
        ("/v1/echo", {"choiceText": None, "choiceNumber": True}, "choiceNumber"),
        # Any: the packed message is checked like any other.
        ("/v1/echo", {"any": "x"}, "any"),
        ("/v1/echo", {"any": {"@type": ["x"]}}, "any"),
        ("/v1/echo", {"any": {"@type": ANY_NESTED, "deeper": "x"}}, "any.deeper"),
        ("/v1/echo", {"any": {"@type": ANY_EVERYTHING, "color": "NOPE"}}, "any.color"),
        # A body field, a repeated body field, and maps of messages and enums.
        ("/v1/echo/7", "text", "nested"),
        ("/v1/echo/7", {"deeper": 1}, "nested.deeper"),
        ("/v1/echo/repeated", [{"name": "x"}, "y"], "repeatedNested[1]"),
        ("/v1/records/r", {"status": "x"}, "record.status"),
        ("/v1/records/r", {"parts": {"a": {"label": "ok"}, "b": "x"}}, "record.parts.b"),
        ("/v1/records/r", {"colors": {"a": "COLOR_RED", "b": "COLOR_PURPLE"}}, "record.colors.b"),
        ("/v1/records/r", {"history": [{"label": "x"}, []]}, "record.history[1]"),
    ],
)
async def test_body_values_json_format_would_misread_are_400_in_both_modes(
    gw: Running, strict_gw: Running, url: str, body: Any, field: str
) -> None:
    # json_format with ignore_unknown_fields drops an unknown enum name like an unknown
    # field, and reads "text" for a message field as an object of its characters.
    method = "PATCH" if url.startswith("/v1/records") else "PUT" if url == "/v1/echo/7" else "POST"
    for running in (gw, strict_gw):
        response = await running.http.request(method, url, json=body)
        assert violation(response) == field, running.gateway.options.strict


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"color": "COLOR_GREEN"}, {"color": "COLOR_GREEN"}),
        ({"color": 1}, {"color": "COLOR_RED"}),
        ({"color": 2.0}, {"color": "COLOR_GREEN"}),
        ({"color": "2"}, {"color": "COLOR_GREEN"}),
        ({"color": 7}, {"color": 7}),  # proto3 enums are open: a number from a newer schema
        ({"color": None}, {"color": "COLOR_UNSPECIFIED"}),
        ({"nested": None}, {"nested": None}),  # unset: not in the reply
        ({"repeatedColor": ["COLOR_RED", 2]}, {"repeatedColor": ["COLOR_RED", "COLOR_GREEN"]}),
        ({"repeatedNested": [{"name": "x"}]}, {"repeatedNested": [{"name": "x", "number": 0}]}),
        (
            {"any": {"@type": ANY_NESTED, "name": "n"}},
            {"any": {"@type": ANY_NESTED, "name": "n", "number": 0}},
        ),
        ({"value": "text", "structValue": {"a": "COLOR_PURPLE"}}, {"value": "text"}),
    ],
)
async def test_body_values_that_are_fine(gw: Running, body: Any, expected: dict[str, Any]) -> None:
    response = await gw.http.post("/v1/echo", json=body)
    assert response.status_code == 200, response.text
    document = response.json()
    assert {key: document.get(key) for key in expected} == expected


async def test_unknown_body_fields_are_still_ignored_beside_checked_values(gw: Running) -> None:
    body = {"nope": "text", "nested": {"alsoNope": "x", "name": "n"}, "color": "COLOR_RED"}
    response = await gw.http.post("/v1/echo", json=body)
    assert response.status_code == 200, response.text
    assert (response.json()["nested"]["name"], response.json()["color"]) == ("n", "COLOR_RED")


async def test_unknown_body_fields(gw: Running, strict_gw: Running) -> None:
    body = {"int32Value": 1, "nope": 2, "nested": {"alsoNope": 3}}
    response = await gw.http.post("/v1/echo", json=body)
    assert response.status_code == 200
    assert response.json()["int32Value"] == 1
    assert violation(await strict_gw.http.post("/v1/echo", json={"nope": 2})) == "nope"
    nested = await strict_gw.http.post("/v1/echo", json={"nested": {"alsoNope": 3}})
    assert violation(nested) == "nested.alsoNope"


# --- Response ---------------------------------------------------------------------------


async def test_response_body_selects_one_field(gw: Running, strict_gw: Running) -> None:
    for running in (gw, strict_gw):
        response = await running.http.get("/v1/things/t/tags")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == ["red", "blue"]


async def test_http_body_request_gets_raw_bytes_and_content_type(gw: Running) -> None:
    raw = bytes(range(256)) * 3
    response = await gw.http.put(
        "/v1/things/avatar/blob", content=raw, headers={"content-type": "image/webp"}
    )
    assert response.status_code == 200
    assert response.json() == {
        "name": "things/avatar",
        "note": "image/webp",
        "tags": [],
        "size": str(len(raw)),
    }


async def test_http_body_response_is_sent_raw(gw: Running) -> None:
    response = await gw.http.get("/v1/things/t/blob")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == PNG


# --- PATCH: field mask inference --------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "body", "mask"),
    [
        ("", {"note": "n", "tags": ["a"]}, "note,tags"),
        ("", {"size": "3"}, "size"),
        ("", {"name": "things/ignored", "note": "n"}, "name,note"),
        ("", {"note": "n", "unknownKey": 1}, "note"),
        ("?update_mask=note", {"note": "n", "tags": ["a"]}, "note"),  # explicit mask wins
        ("?updateMask=tags,size", {"note": "n"}, "tags,size"),
    ],
)
async def test_patch_infers_the_mask_from_body_keys(
    gw: Running, query: str, body: dict[str, Any], mask: str
) -> None:
    response = await gw.http.patch(f"/v1/things/t1{query}", json=body)
    assert response.status_code == 200
    document = response.json()
    assert document["updateMask"] == mask
    assert document["thing"]["name"] == "things/t1"  # the path wins


RECORD_READ = {
    "name": "records/r1",
    "title": "new title",
    "color": "COLOR_GREEN",
    "status": {"label": "l", "computed": "by the server"},
    "createTime": "2024-01-01T00:00:00Z",
    "revision": 4,
    "etag": 'W/"4"',
    "observed": {"label": "x", "computed": "y"},
    "origin": "import",
    "history": [{"label": "h", "computed": "c"}],
    "parts": {},
    "colors": {},
}


async def test_patch_of_a_whole_resource_infers_only_what_may_change(gw: Running) -> None:
    # Read-modify-write (AIP-203): output-only fields, the identifier and the etag a GET
    # returned are sent back untouched, and never become mask paths.
    response = await gw.http.patch("/v1/records/r1", json=RECORD_READ)
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["updateMask"] == "title,color,status.label,origin,history,parts,colors"
    assert document["record"]["etag"] == 'W/"4"'  # still reaches the service, as a selector
    assert document["record"]["title"] == "new title"


@pytest.mark.parametrize(
    ("body", "mask"),
    [
        ({"status": {"computed": "x"}, "title": "t"}, "title"),
        ({"observed": {"label": "x"}, "revision": 3, "etag": '"1"', "name": "records/x"}, None),
        ({"status": {}}, "status"),
        ({"status": {"label": "x"}}, "status.label"),
        ({"createTime": None, "title": "t"}, "title"),
        ({"updateMask": "ignored", "title": "t"}, "title"),  # not a Record field
    ],
)
async def test_patch_leaves_fields_that_never_change_out_of_the_mask(
    gw: Running, body: dict[str, Any], mask: str | None
) -> None:
    response = await gw.http.patch("/v1/records/r1", json=body)
    assert response.status_code == 200, response.text
    assert response.json().get("updateMask") == mask


async def test_explicit_mask_naming_an_output_only_field_is_passed_on(gw: Running) -> None:
    # An explicit mask is the caller's: the service decides what it accepts.
    response = await gw.http.patch("/v1/records/r1?updateMask=revision", json=RECORD_READ)
    assert response.status_code == 200
    assert response.json()["updateMask"] == "revision"


async def test_patch_without_body_keys_has_no_mask(gw: Running) -> None:
    response = await gw.http.patch("/v1/things/t1", json={})
    assert response.status_code == 200
    assert "updateMask" not in response.json()


@pytest.mark.parametrize(
    ("document", "paths"),
    [
        ({"int32Value": 1, "string_value": "s"}, ["int32_value", "string_value"]),
        (
            {"nested": {"deeper": {"flag": True}, "name": "x"}},
            ["nested.deeper.flag", "nested.name"],
        ),
        ({"nested": {}}, ["nested"]),
        ({"nested": None}, ["nested"]),
        ({"labels": {"a": "b"}, "repeatedNested": [{"name": "x"}]}, ["labels", "repeated_nested"]),
        (
            {"timestamp": "2024-01-01T00:00:00Z", "structValue": {"a": 1}},
            ["timestamp", "struct_value"],
        ),
        ({"customJsonName": "x", "unknown": 1}, ["json_named"]),
        ({"nested": {"unknown": 1}}, []),  # not "nested": that would clear it
        ({}, []),
        ([1, 2], []),
    ],
)
def test_infer_mask(document: Any, paths: list[str]) -> None:
    assert transcode.infer_mask(document, EVERYTHING) == paths


@pytest.mark.parametrize(
    ("document", "paths"),
    [
        (RECORD_READ, ["title", "color", "status.label", "origin", "history", "parts", "colors"]),
        ({"name": "records/x", "etag": '"1"', "revision": 1}, []),
        ({"observed": {"label": "x"}, "status": {"computed": "c"}}, []),
        ({"status": {"computed": "c", "label": "l"}}, ["status.label"]),
    ],
)
def test_infer_mask_skips_output_only_identifier_and_etag(document: Any, paths: list[str]) -> None:
    assert transcode.infer_mask(document, echo_pb2.Record.DESCRIPTOR) == paths


# --- Unit: query splitting and text parsers ---------------------------------------------


@pytest.mark.parametrize(
    ("raw", "items"),
    [
        (b"", []),
        (b"a=1&b=x+y", [("a", "1"), ("b", "x y")]),
        (b"a=1&&a=2&", [("a", "1"), ("a", "2")]),
        (b"flag", [("flag", "")]),
        (b"k=a=b", [("k", "a=b")]),
        (b"%26=%3D%2B", [("&", "=+")]),
        (b"n%2Ename=caf%C3%A9", [("n.name", "café")]),
        ("s=%E2%9C%93", [("s", "✓")]),
    ],
)
def test_query_items(raw: bytes | str, items: list[tuple[str, str]]) -> None:
    assert transcode.query_items(raw) == items


def _parser(name: str) -> Any:
    return transcode.scalar_parser(EVERYTHING.fields_by_name[name])


@pytest.mark.parametrize(
    ("field", "text", "value"),
    [
        ("int64_value", "-9223372036854775808", -(2**63)),
        ("uint64_value", "18446744073709551615", 2**64 - 1),
        ("int32_value", "-0", 0),
        ("double_value", "1e-320", 1e-320),
        ("float_value", "-0.0", -0.0),
        ("bool_value", "T", True),
        ("string_value", " as is ", " as is "),
        ("bytes_value", "AP8", b"\x00\xff"),
        ("bytes_value", "AP-_", b"\x00\xff\xbf"),
        ("bytes_value", "", b""),
        ("color", "COLOR_GREEN", 2),
        ("color", "-4", -4),
    ],
)
def test_scalar_parser_accepts(field: str, text: str, value: Any) -> None:
    assert _parser(field)(text) == value


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("int64_value", "9223372036854775808"),
        ("int64_value", "1.0"),
        ("uint64_value", "-0x1"),
        ("int32_value", "١٢"),
        ("double_value", "Infinity "),
        ("double_value", "--1"),
        ("float_value", "3.5e38"),
        ("bool_value", "on"),
        ("bytes_value", "a=bc"),
        ("color", "COLOR_red"),
    ],
)
def test_scalar_parser_rejects(field: str, text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each parser's only failure
        _parser(field)(text)


def test_scalar_parser_nan() -> None:
    assert math.isnan(_parser("double_value")("NaN"))
    assert _parser("float_value")("Infinity") == math.inf


def test_json_encoder_emits_defaults_only_when_asked() -> None:
    message = echo_pb2.Everything(int64_value=-1, bytes_value=b"\x00")
    pool = message.DESCRIPTOR.file.pool
    lean = JsonEncoder(emit_defaults=False, pool=pool).encode(message)
    assert lean == {"int64Value": "-1", "bytesValue": "AA=="}
    full = JsonEncoder(emit_defaults=True, pool=pool).encode(message)
    assert full == {**DEFAULTS, **lean}
