"""Property tests of the transcoder through the running gateway.

(a) Round trip: any message the URL can carry, sent as query parameters (proto or JSON
names, any accepted spelling), and any message sent as a JSON body, comes back from the
echo upstream as the same message. (b) Garbage — random bodies, query strings, paths —
never makes the gateway fail with a 5xx. (c) A body whose keys are all fields is accepted
only as json_format reads it exactly; anything else is a 400 naming one of its fields.
"""

from __future__ import annotations

import base64
import math
import string
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, unquote, urlencode

import orjson
from google.protobuf import duration_pb2, json_format, timestamp_pb2
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.gateway.conftest import Running
from tests.gateway.echo_proto import echo_pb2

EVERYTHING = echo_pb2.Everything.DESCRIPTOR
FIELD_NAMES = sorted({n for f in EVERYTHING.fields for n in (f.name, f.json_name)})
SETTINGS = settings(max_examples=150, deadline=None)
FUZZ_SETTINGS = settings(max_examples=400, deadline=None)

int32s = st.integers(-(2**31), 2**31 - 1)
int64s = st.integers(-(2**63), 2**63 - 1)
uint32s = st.integers(0, 2**32 - 1)
uint64s = st.integers(0, 2**64 - 1)
doubles = st.floats(allow_nan=True, allow_infinity=True)
FLOAT32_MAX = 3.4028234663852886e38
#: Not the largest float: proto3 JSON prints it as 3.4028235e+38, which protobuf-python's
#: json_format (the test's own parser, and the gateway's body parser) then calls too large.
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True).filter(
    lambda x: abs(x) != FLOAT32_MAX
)
enums = st.integers(-3, 6)  # named values 0..2, the rest unknown (proto3 enums are open)
words = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
#: Field mask paths that survive the lowerCamelCase round trip (no digits, no "__").
mask_paths = st.from_regex(
    r"[a-z]{1,6}(_[a-z]{1,6}){0,2}(\.[a-z]{1,6}(_[a-z]{1,6})?){0,2}", fullmatch=True
)
SCALARS = {
    "double_value": doubles, "float_value": floats32, "int32_value": int32s,
    "int64_value": int64s, "uint32_value": uint32s, "uint64_value": uint64s,
    "sint32_value": int32s, "sint64_value": int64s, "fixed32_value": uint32s,
    "fixed64_value": uint64s, "sfixed32_value": int32s, "sfixed64_value": int64s,
    "bool_value": st.booleans(), "string_value": words, "bytes_value": st.binary(max_size=16),
    "color": enums, "json_named": words, "optional_string": words,
}  # fmt: skip
WRAPPERS = {
    "wrapped_string": words, "wrapped_int64": int64s, "wrapped_bool": st.booleans(),
    "wrapped_double": doubles, "wrapped_bytes": st.binary(max_size=16),
    "wrapped_uint64": uint64s,
}  # fmt: skip
timestamps = st.builds(
    timestamp_pb2.Timestamp,
    seconds=st.integers(-62135596800, 253402300799),
    nanos=st.integers(0, 999_999_999),
)


def _duration(nanos: int) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(nanos)
    return value


durations = st.integers(-315576000000 * 10**9, 315576000000 * 10**9).map(_duration)


@st.composite
def url_messages(draw: st.DrawFn) -> echo_pb2.Everything:
    """An Everything holding only what a URL can carry."""
    message = echo_pb2.Everything()
    for name, strategy in SCALARS.items():
        if draw(st.booleans()):
            setattr(message, name, draw(strategy))
    for name, strategy in WRAPPERS.items():
        if draw(st.booleans()):
            getattr(message, name).value = draw(strategy)
    message.repeated_string.extend(draw(st.lists(words, max_size=3)))
    message.repeated_int64.extend(draw(st.lists(int64s, max_size=3)))
    message.repeated_color.extend(draw(st.lists(enums, max_size=3)))
    if draw(st.booleans()):
        message.nested.name = draw(words)
        message.nested.number = draw(int32s)
    if draw(st.booleans()):
        message.nested.deeper.flag = draw(st.booleans())
        message.nested.deeper.words.extend(draw(st.lists(words, min_size=1, max_size=3)))
    if draw(st.booleans()):
        message.timestamp.CopyFrom(draw(timestamps))
    if draw(st.booleans()):
        message.duration.CopyFrom(draw(durations))
    if draw(st.booleans()):
        message.field_mask.paths.extend(draw(st.lists(mask_paths, min_size=1, max_size=3)))
    if message.nested.ByteSize() == 0:
        message.ClearField("nested")  # a URL cannot say "present but empty"
    choice = draw(st.sampled_from(["", "choice_text", "choice_number"]))
    if choice:
        setattr(message, choice, draw(words if choice == "choice_text" else int32s))
    return message


@st.composite
def body_messages(draw: st.DrawFn) -> echo_pb2.Everything:
    """Everything the URL can carry, plus what only a body can: maps, repeated messages,
    Struct, Value and Any."""
    message = draw(url_messages())
    message.labels.update(draw(st.dictionaries(words, words, max_size=3)))
    for name in draw(st.lists(words, max_size=2)):
        message.repeated_nested.add(name=name)
    if draw(st.booleans()):
        message.struct_value.update(
            draw(st.dictionaries(words, st.one_of(st.none(), st.booleans(), words), max_size=3))
        )
    if draw(st.booleans()):
        message.value.string_value = draw(words)
    if draw(st.booleans()):
        message.any.Pack(echo_pb2.Nested(name=draw(words), number=draw(int32s)))
    return message


# --- Encoding a message as query parameters, any accepted spelling ----------------------


def _float_text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if value in {float("inf"), float("-inf")}:
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def _bytes_text(draw: st.DrawFn, value: bytes) -> str:
    text = base64.b64encode(value).decode()
    if draw(st.booleans()):
        text = text.replace("+", "-").replace("/", "_")
    return text.rstrip("=") if draw(st.booleans()) else text


def _enum_text(draw: st.DrawFn, number: int) -> str:
    named = echo_pb2.Color.DESCRIPTOR.values_by_number.get(number)
    return named.name if named is not None and draw(st.booleans()) else str(number)


def _timestamp_text(draw: st.DrawFn, value: timestamp_pb2.Timestamp) -> str:
    offset = draw(st.sampled_from([0, 0, 330, -480, 59]))
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=value.seconds)
    if not offset or not 1 < moment.year < 9999:
        return value.ToJsonString()
    local = moment.astimezone(timezone(timedelta(minutes=offset)))
    sign, minutes = ("+" if offset > 0 else "-"), abs(offset)
    fraction = f".{value.nanos:09d}" if value.nanos else ""
    clock = f"{local.year:04d}-{local:%m-%dT%H:%M:%S}{fraction}"
    return f"{clock}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _mask_text(draw: st.DrawFn, paths: list[str]) -> str:
    camel = json_format.MessageToDict(echo_pb2.Everything(field_mask={"paths": paths}))
    return str(camel["fieldMask"]) if draw(st.booleans()) else ",".join(paths)


def _text(draw: st.DrawFn, field: Any, value: Any) -> str:
    kind = field.type
    if kind in {field.TYPE_DOUBLE, field.TYPE_FLOAT}:
        return _float_text(value)
    if kind == field.TYPE_BOOL:
        return draw(st.sampled_from(["true", "True", "1", "t"] if value else ["false", "0", "F"]))
    if kind == field.TYPE_BYTES:
        return _bytes_text(draw, value)
    if kind == field.TYPE_ENUM:
        return _enum_text(draw, value)
    return str(value)


def _name(draw: st.DrawFn, fields: list[Any]) -> str:
    return ".".join(draw(st.sampled_from([f.name, f.json_name])) for f in fields)


def query_of(draw: st.DrawFn, message: Any, prefix: list[Any]) -> list[tuple[str, str]]:
    """Query parameters that set every field set in ``message``."""
    params: list[tuple[str, str]] = []
    for field, value in message.ListFields():
        path = [*prefix, field]
        target = field.message_type
        if target is None:
            values = list(value) if field.is_repeated else [value]
            params += [(_name(draw, path), _text(draw, field, v)) for v in values]
        elif target.full_name.endswith("Value"):
            inner = target.fields_by_name["value"]
            params.append((_name(draw, path), _text(draw, inner, value.value)))
        elif target.full_name == "google.protobuf.Timestamp":
            params.append((_name(draw, path), _timestamp_text(draw, value)))
        elif target.full_name == "google.protobuf.Duration":
            params.append((_name(draw, path), value.ToJsonString()))
        elif target.full_name == "google.protobuf.FieldMask":
            params.append((_name(draw, path), _mask_text(draw, list(value.paths))))
        else:
            params += query_of(draw, value, path)
    return params


def same(got: Any, expected: Any) -> bool:
    """Equal as proto3 JSON (NaN equals NaN there)."""
    return bool(json_format.MessageToDict(got) == json_format.MessageToDict(expected))


@SETTINGS
@given(message=url_messages(), data=st.data())
async def test_query_round_trip(gw: Running, message: Any, data: st.DataObject) -> None:
    params = query_of(data.draw, message, [])
    # Encoded here: httpx's params would group repeated keys and reorder mixed spellings.
    response = await gw.http.get("/v1/echo?" + urlencode(params, quote_via=quote))
    assert response.status_code == 200, (params, response.text)
    got = json_format.Parse(response.text, echo_pb2.Everything())
    assert same(got, message), params


@SETTINGS
@given(message=body_messages(), proto_names=st.booleans())
async def test_body_round_trip(gw: Running, message: Any, proto_names: bool) -> None:
    body = json_format.MessageToJson(message, preserving_proto_field_name=proto_names)
    response = await gw.http.post("/v1/echo", content=body)
    assert response.status_code == 200, (body, response.text)
    got = json_format.Parse(response.text, echo_pb2.Everything())
    assert same(got, message)
    assert got.any == message.any


@SETTINGS
@given(nested=st.lists(st.builds(echo_pb2.Nested, name=words, number=int32s), max_size=4))
async def test_repeated_body_field_round_trip(gw: Running, nested: list[Any]) -> None:
    body = [json_format.MessageToDict(n) for n in nested]
    response = await gw.http.post("/v1/echo/repeated", json=body)
    assert response.status_code == 200
    got = json_format.Parse(response.text, echo_pb2.Everything())
    assert list(got.repeated_nested) == nested


# --- Garbage never makes a 5xx ----------------------------------------------------------

BODY_ROUTES = [
    ("POST", "/v1/echo"),
    ("PUT", "/v1/echo/1"),
    ("POST", "/v1/echo/repeated"),
    ("POST", "/v1/things/x:frobnicate"),
    ("PATCH", "/v1/things/t1"),
    ("PUT", "/v1/things/t1/blob"),
    ("POST", "/v1/headers"),
]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    words,
    st.sampled_from(
        ["NaN", "Infinity", "1s", "2024-01-01T00:00:00Z", "COLOR_RED", "a,b", "AP8=", "-0"]
        + [
            f"type.googleapis.com/{t}"
            for t in (
                "echo.v1.Nested",
                "google.protobuf.Struct",
                "google.protobuf.Duration",
                "google.protobuf.Any",
                "no.Such",
            )
        ]
    ),
)
KEYS = st.sampled_from(
    [*FIELD_NAMES, "@type", "name", "number", "deeper", "flag", "words", "value", "paths"]
)
json_documents = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)


async def assert_not_5xx(gw: Running, method: str, url: str, **kwargs: Any) -> None:
    response = await gw.http.request(method, url, **kwargs)
    assert response.status_code < 500, (method, url, kwargs, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert body["code"] in range(1, 17)
        assert body["requestId"] == response.headers["x-request-id"]


@FUZZ_SETTINGS
@given(route=st.sampled_from(BODY_ROUTES), body=st.binary(max_size=64), strict=st.booleans())
async def test_random_bytes_as_body(
    gw: Running, strict_gw: Running, route: tuple[str, str], body: bytes, strict: bool
) -> None:
    method, url = route
    running = strict_gw if strict else gw
    await assert_not_5xx(
        running, method, url, content=body, headers={"content-type": "application/json"}
    )


@FUZZ_SETTINGS
@given(route=st.sampled_from(BODY_ROUTES), document=json_documents, strict=st.booleans())
async def test_random_json_as_body(
    gw: Running, strict_gw: Running, route: tuple[str, str], document: Any, strict: bool
) -> None:
    method, url = route
    running = strict_gw if strict else gw
    await assert_not_5xx(running, method, url, content=orjson.dumps(document))


# --- A body is accepted only as json_format reads it exactly -----------------------------

#: Not an object: for a message field, an object would bring keys it may not have.
NOT_OBJECTS = st.one_of(
    json_scalars.filter(lambda v: not isinstance(v, float) or math.isfinite(v)),
    st.lists(st.one_of(st.none(), st.booleans(), words, st.integers(-5, 5)), max_size=2),
)
JSON_GARBAGE = st.one_of(NOT_OBJECTS, st.sampled_from([{}, {"a": 1}, {"@type": 5}]))
ENUM_VALUES = st.one_of(
    st.sampled_from(
        [
            *("COLOR_PURPLE", "COLOR_RED", "color_red", "", "1", "99999999999", "NULL_VALUE"),
            *(2**40, -1, 7, 1.0, 1.5, True, None, "COLOR_GREEN", "COLOR_UNSPECIFIED"),
        ]
    ),
    st.integers(-(2**40), 2**40),
)
ANY_VALUES = st.sampled_from(
    [
        {"@type": "type.googleapis.com/echo.v1.Nested", "name": "n"},
        {"@type": "type.googleapis.com/echo.v1.Nested", "deeper": "x"},
        {"@type": "type.googleapis.com/echo.v1.Nested", "deeper": {"flag": True}},
        {"@type": "type.googleapis.com/echo.v1.Everything", "color": "COLOR_PURPLE"},
        {"@type": "type.googleapis.com/echo.v1.Everything", "color": "COLOR_RED"},
        {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "1s"},
        {"@type": "type.googleapis.com/no.Such", "a": 1},
        {},
    ]
)


def _element(field: Any) -> st.SearchStrategy[Any]:
    """A value for one element of ``field``: often well-formed, sometimes not."""
    if field.enum_type is not None:
        return ENUM_VALUES
    target = field.message_type
    if target is None:
        return JSON_GARBAGE
    if target.full_name == "google.protobuf.Any":
        return st.one_of(ANY_VALUES, NOT_OBJECTS)
    if target.full_name.startswith("google.protobuf."):
        return JSON_GARBAGE
    return st.one_of(schema_documents(target), NOT_OBJECTS)


def _value(field: Any) -> st.SearchStrategy[Any]:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        items = st.dictionaries(words, _element(entry.fields_by_name["value"]), max_size=2)
        return st.one_of(items, JSON_GARBAGE)
    if field.is_repeated:
        return st.one_of(st.lists(_element(field), max_size=3), JSON_GARBAGE)
    return _element(field)


def _interesting_first(message: Any) -> list[Any]:
    # Enum and message fields are where json_format is lenient: draw them more often.
    fields = list(message.fields)
    return [f for f in fields if f.enum_type or f.message_type] * 3 + fields


@st.composite
def schema_documents(draw: st.DrawFn, message: Any) -> dict[str, Any]:
    """An object of a few fields of ``message`` (each once, under either of its names)."""
    chosen = draw(st.lists(st.sampled_from(_interesting_first(message)), max_size=4))
    fields = list({f.name: f for f in chosen}.values())
    return {draw(st.sampled_from([f.name, f.json_name])): draw(_value(f)) for f in fields}


def _json_format_reads(document: dict[str, Any]) -> Any:
    try:
        return json_format.ParseDict(document, echo_pb2.Everything())
    except Exception:  # noqa: BLE001 - any failure means "does not read it"
        return None


@SETTINGS
@given(document=schema_documents(EVERYTHING), strict=st.booleans())
async def test_a_body_is_accepted_only_as_json_format_reads_it(
    gw: Running, strict_gw: Running, document: dict[str, Any], strict: bool
) -> None:
    """Every key is known, so nothing may be dropped: whatever json_format (strict) cannot
    read is a 400 naming a field the body has, and what the gateway accepts is exactly what
    json_format reads (never a dropped enum name, never a string read as a message)."""
    running = strict_gw if strict else gw
    response = await running.http.post("/v1/echo", content=orjson.dumps(document))
    assert response.status_code in {200, 400}, response.text
    expected = _json_format_reads(document)
    if response.status_code == 200:
        assert expected is not None, (document, response.text)
        assert same(json_format.Parse(response.text, echo_pb2.Everything()), expected)
        return
    details = response.json()["details"]
    field = next(d for d in details if d["@type"].endswith("BadRequest"))["fieldViolations"][0]
    assert field["field"].split(".")[0].split("[")[0] in document, (document, field)


QUERY_ALPHABET = string.ascii_letters + string.digits + "%&=+._-,:;/!~*'()[]{}é\u2603 "
query_keys = st.one_of(
    st.sampled_from(
        [
            *FIELD_NAMES,
            "nested.name",
            "nested.deeper.flag",
            "nested.deeper.words",
            "repeated_nested.name",
            "labels.x",
            "nested.number",
        ]
    ),
    st.text(QUERY_ALPHABET, max_size=8),
)
query_values = st.one_of(
    st.text(QUERY_ALPHABET, max_size=12),
    st.sampled_from(["NaN", "-1", "18446744073709551616", "%2B", "%", "%zz", "true", "1.5s"]),
)


@FUZZ_SETTINGS
@given(
    pairs=st.lists(st.tuples(query_keys, query_values), max_size=5),
    path=st.sampled_from(["/v1/echo", "/v1/echo/a/b", "/v1/things/t", "/v1/notes/n"]),
    strict=st.booleans(),
)
async def test_random_query_string(
    gw: Running, strict_gw: Running, pairs: list[tuple[str, str]], path: str, strict: bool
) -> None:
    raw = "&".join(f"{quote(k, safe='%&=+')}={quote(v, safe='%+=')}" for k, v in pairs)
    await assert_not_5xx(strict_gw if strict else gw, "GET", f"{path}?{raw}")


SEGMENTS = st.one_of(
    st.sampled_from(
        [
            "v1",
            "things",
            "echo",
            "files",
            "notes",
            "tags",
            "blob",
            "headers",
            "",
            "%2F",
            "%2f",
            "%25",
            "%zz",
            "a:b",
            ":stream",
            "x:frobnicate",
            "..",
        ]
    ),
    st.text(string.ascii_letters + string.digits + "%:._-~!$&'()*+,;=@é", max_size=8),
)


@FUZZ_SETTINGS
@given(
    segments=st.lists(SEGMENTS, max_size=6),
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]),
)
async def test_random_path(gw: Running, segments: list[str], method: str) -> None:
    path = "/" + "/".join(segments)
    decoded = unquote(path)
    # Routes that answer 5xx or stall on purpose (Fail, Slow), and the health pages that ask
    # an upstream without a health service.
    assume(not any(word in decoded for word in ("fail", "slow", "healthz", "readyz")))
    url = f"{gw.http.base_url}{path}"  # absolute: a relative "//x" would be a host
    response = await gw.http.request(method, url, content=b"{}" if method != "GET" else None)
    assert response.status_code < 500, (method, path, response.text)
