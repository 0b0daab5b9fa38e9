"""Path, query and body <-> protobuf messages, driven only by descriptors.

Everything that can be looked up once is: each binding compiles its path setters and the
type converters; each message type gets a name index (proto and JSON names) the first
time a query names one of its fields. Per request there is no reflection beyond a dict
lookup per query segment.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import unquote_plus

import orjson
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from gateway.errors import GatewayError
from gateway.jsoncheck import bad_field, check_document, field_index
from gateway.preconditions import is_etag

HTTP_BODY = "google.api.HttpBody"
WRAPPERS = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
STRING_FORM = frozenset(
    {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
)
_INT_RANGES: Mapping[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def resolve(message: Descriptor, dotted: str) -> list[FieldDescriptor]:
    """The fields along a dotted path (proto or JSON names per segment); KeyError if none."""
    fields: list[FieldDescriptor] = []
    current: Descriptor | None = message
    for part in dotted.split("."):
        if current is None:
            raise KeyError(dotted)
        found = field_index(current)[part]
        fields.append(found)
        current = found.message_type
    return fields


def _parse_int(kind: int) -> Callable[[str], int]:
    low, high = _INT_RANGES[kind]

    def parse(text: str) -> int:
        value = _integer(text)
        if not low <= value <= high:
            raise ValueError("out of range")
        return value

    return parse


def _integer(text: str) -> int:
    # int() alone would also take "1_000", " 5" and non-ASCII digits.
    if not _INTEGER.fullmatch(text):
        raise ValueError("not a decimal integer")
    return int(text, 10)


def _parse_float(text: str) -> float:
    special = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    if text in special:
        return special[text]
    if not _DECIMAL.fullmatch(text):
        raise ValueError("not a decimal number (or NaN, Infinity, -Infinity)")
    value = float(text)
    if math.isinf(value):
        raise ValueError("out of range")
    return value


def _parse_float32(text: str) -> float:
    value = _parse_float(text)
    try:
        # Out of range only if it does not round to a finite float: "3.4028235e+38", the
        # printed maximum, is a little above it as a double.
        struct.pack("<f", value)
    except OverflowError:
        raise ValueError("out of range for a float") from None
    return value


def _parse_bool(text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("not a boolean")


def _parse_bytes(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    altchars = b"-_" if "-" in text or "_" in text else None
    try:
        return base64.b64decode(padded, altchars=altchars, validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None


_TEXT_PARSERS: Mapping[int, Callable[[str], Any]] = {
    FieldDescriptor.TYPE_DOUBLE: _parse_float,
    FieldDescriptor.TYPE_FLOAT: _parse_float32,
    FieldDescriptor.TYPE_BOOL: _parse_bool,
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BYTES: _parse_bytes,
}


def scalar_parser(field: FieldDescriptor) -> Callable[[str], Any]:
    """A str -> value converter for a scalar or enum field."""
    kind = field.type
    if kind in _INT_RANGES:
        return _parse_int(kind)
    if kind == FieldDescriptor.TYPE_ENUM:
        return _enum_parser(field)
    if kind in _TEXT_PARSERS:
        return _TEXT_PARSERS[kind]
    raise TypeError(f"{field.full_name} is not a scalar")


def _enum_parser(field: FieldDescriptor) -> Callable[[str], int]:
    enum = field.enum_type
    assert enum is not None
    by_name = {v.name: v.number for v in enum.values}

    def parse(text: str) -> int:
        if text in by_name:
            return by_name[text]
        number = _integer(text)
        if number not in enum.values_by_number and not enum.is_closed:
            return number
        if number not in enum.values_by_number:
            raise ValueError("unknown enum number")
        return number

    return parse


def _snake(path: str) -> str:
    out = ""
    for char in path:
        out += "_" + char.lower() if char.isupper() else char
    return out


def set_from_text(message: Message, fields: list[FieldDescriptor], text: str, name: str) -> None:
    """Set the field at ``fields`` (from ``message``) from a path or query string value."""
    parent = message
    for field in fields[:-1]:
        if field.is_repeated:
            raise bad_field(name, "cannot be set from the URL (repeated message on the way)")
        parent = getattr(parent, field.name)
    leaf = fields[-1]
    target = leaf.message_type
    try:
        if target is None:
            value = scalar_parser(leaf)(text)
            if leaf.is_repeated:
                getattr(parent, leaf.name).append(value)
            else:
                setattr(parent, leaf.name, value)
        elif leaf.is_repeated:
            raise bad_field(name, "repeated messages and maps cannot come from the URL")
        elif target.full_name in WRAPPERS:
            getattr(parent, leaf.name).value = scalar_parser(target.fields_by_name["value"])(text)
        elif target.full_name == "google.protobuf.FieldMask":
            paths = [p if "_" in p else _snake(p) for p in text.split(",") if p]
            mask = getattr(parent, leaf.name)
            type(mask)(paths=paths).ToJsonString()  # ValueError: a path JSON cannot carry
            mask.paths.extend(paths)
        elif target.full_name in STRING_FORM:
            getattr(parent, leaf.name).FromJsonString(text)
        else:
            raise bad_field(name, f"a {target.full_name} cannot come from the URL")
    except GatewayError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise bad_field(name, f"cannot read {text[:64]!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class PathSetter:
    """A compiled setter for one path variable."""

    name: str
    fields: list[FieldDescriptor]


def compile_path_setters(message: Descriptor, field_paths: Iterable[str]) -> list[PathSetter]:
    """Setters for a binding's path variables; KeyError for an unknown field."""
    return [PathSetter(path, resolve(message, path)) for path in field_paths]


@dataclass(frozen=True, slots=True)
class RequestShape:
    """How one binding fills its request message."""

    message: Descriptor
    path: list[PathSetter]
    body: str
    body_field: FieldDescriptor | None
    http_body: bool

    def binds(self, fields: list[FieldDescriptor]) -> bool:
        """Whether the path or the body sets the field (or a message it is in):
        ``nested.name`` bound by the path leaves ``nested.number`` to the query."""
        if self.body_field is not None and fields[0] is self.body_field:
            return True
        return any(fields[: len(setter.fields)] == setter.fields for setter in self.path)


def query_items(raw_query: bytes | str) -> list[tuple[str, str]]:
    """``a=1&b=x+y`` -> [("a", "1"), ("b", "x y")] (``+`` is a space)."""
    text = raw_query.decode("latin-1") if isinstance(raw_query, bytes) else raw_query
    items = []
    for part in text.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        items.append((unquote_plus(key), unquote_plus(value)))
    return items


def apply_query(
    message: Message, shape: RequestShape, items: list[tuple[str, str]], *, strict: bool
) -> None:
    """Set every query parameter that names a field not bound by path or body."""
    if shape.body == "*":
        if strict and items:
            raise bad_field(items[0][0], "the body carries every field; the query cannot")
        return
    for name, value in items:
        try:
            fields = resolve(shape.message, name)
        except KeyError:
            if strict:
                raise bad_field(name, "unknown query parameter") from None
            continue
        if shape.binds(fields):
            if strict:
                raise bad_field(name, "is set by the path or the body, not the query")
            continue
        set_from_text(message, fields, value, name)


def apply_body(
    message: Message,
    shape: RequestShape,
    body: bytes,
    content_type: str,
    *,
    strict: bool,
    pool: descriptor_pool.DescriptorPool,
) -> None:
    """Fill the body part of the request from the raw body."""
    if shape.http_body:
        target: Any = getattr(message, shape.body_field.name) if shape.body_field else message
        target.content_type = content_type
        target.data = body
        return
    if not body.strip():
        return
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise GatewayError.invalid_argument([("body", "is not valid JSON")]) from None
    if shape.body_field is not None:
        document = {shape.body_field.json_name: document}
    elif not isinstance(document, dict):
        raise GatewayError.invalid_argument([("body", "must be a JSON object")])
    try:
        check_document(document, shape.message, pool)
        json_format.ParseDict(
            document, message, ignore_unknown_fields=not strict, descriptor_pool=pool
        )
    except json_format.ParseError as exc:
        raise GatewayError.invalid_argument([(_error_field(str(exc)), _clip(str(exc)))]) from None
    except (RecursionError, ValueError, TypeError, OverflowError, AttributeError) as exc:
        # AttributeError: json_format on an Any whose "@type" is not a string.
        raise GatewayError.invalid_argument([("body", _clip(str(exc)))]) from None


_FAILED_FIELD = re.compile(r"Failed to parse (\S+) field: ")
#: "... at Everything.choice_number": where json_format says it was (first line only).
_AT_PATH = re.compile(r' at "?\w+((?:\.[^\s".\[\]]+|\[\d+\])+)"?\.?$')


def _error_field(message: str) -> str:
    # json_format says "Failed to parse <field> field: Failed to parse <sub> field: ...",
    # "Message type ... has no field named <x>", or (a oneof member) just "... at
    # <Message>.<path>"; fall back to the body as a whole.
    path = []
    while found := _FAILED_FIELD.match(message):
        path.append(found.group(1))
        message = message[found.end() :]
    if "has no field named" in message:
        path.append(message.rsplit("named", 1)[1].split(maxsplit=1)[0].strip('"'))
    elif not path and (at := _AT_PATH.search(message.split("\n", 1)[0])):
        path.append(at.group(1)[1:])
    return ".".join(path) or "body"


def _clip(text: str) -> str:
    return text if len(text) <= 300 else text[:297] + "..."


def apply_path(message: Message, shape: RequestShape, values: Mapping[str, str]) -> None:
    """Set the path variables; applied last, so they win over body and query."""
    for setter in shape.path:
        set_from_text(message, setter.fields, values[setter.name], setter.name)


#: google.api.field_behavior values of fields that a resource read back carries but that
#: never say what to change (AIP-203): the server reports them, or they name the resource.
_NOT_CHANGES = frozenset({field_behavior_pb2.OUTPUT_ONLY, field_behavior_pb2.IDENTIFIER})


@cache
def never_a_change(field: FieldDescriptor) -> bool:
    """Whether a body key for ``field`` never names a change: an output-only or identifier
    field (``google.api.field_behavior``), or the etag (the version the change is for)."""
    if is_etag(field):
        return True
    behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    return any(behavior in _NOT_CHANGES for behavior in behaviors)


def infer_mask(document: Any, message: Descriptor | None, prefix: str = "") -> list[str]:
    """Dotted proto paths of the keys present in a JSON body (PATCH without a mask).

    Keys that never name a change are left out, so a resource read, edited and sent back
    whole updates only what may be updated. An empty object names its field (set it
    empty); an object whose keys were all left out names nothing.
    """
    if not isinstance(document, dict) or message is None:
        return []
    index = field_index(message)
    paths: list[str] = []
    for key, value in document.items():
        field = index.get(key)
        if field is None or never_a_change(field):
            continue
        path = prefix + field.name
        sub = field.message_type
        plain_message = (
            sub is not None
            and not field.is_repeated
            and not sub.GetOptions().map_entry
            and not sub.full_name.startswith("google.protobuf.")
        )
        if plain_message and isinstance(value, dict) and value:
            paths.extend(infer_mask(value, sub, path + "."))
        else:
            paths.append(path)
    return paths
