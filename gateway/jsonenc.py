"""Proto3 JSON encoding compiled per message type.

``json_format.MessageToDict`` re-reads each field's descriptor and type on every call; a
response path runs it for every reply. This encoder looks each message type up once,
keeps a converter per field, and produces the same dictionaries (a property test holds
it to ``MessageToDict`` with ``always_print_fields_with_no_presence``). Types with their
own JSON forms that are rare in replies (``Any``, ``Struct``, ``Value``, ``ListValue``)
are handed to ``json_format``.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message

F = FieldDescriptor
Convert = Callable[[Any], Any]
_STRING_FORM = frozenset(
    {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
)
_WRAPPERS = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
_DELEGATED = frozenset(
    {
        "google.protobuf.Any",
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
    }
)


def _double(value: float) -> Any:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _float(value: float) -> Any:
    special = _double(value)
    return special if isinstance(special, str) else type_checkers.ToShortestFloat(value)


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _map_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


class JsonEncoder:
    """Encodes messages to proto3 JSON dictionaries, one compiled plan per type."""

    def __init__(
        self, *, emit_defaults: bool, pool: descriptor_pool.DescriptorPool | None = None
    ) -> None:
        self._emit_defaults = emit_defaults
        self._pool = pool
        self._plans: dict[str, tuple[dict[FieldDescriptor, tuple[str, Convert]], list[Any]]] = {}

    def encode(self, message: Message) -> Any:
        """The JSON value of ``message`` (a dict, or a string/value for well-known types)."""
        descriptor: Descriptor = message.DESCRIPTOR  # type: ignore[assignment]  # upb stub twin
        name = descriptor.full_name
        if name in _STRING_FORM:
            return message.ToJsonString()  # type: ignore[attr-defined]
        if name in _WRAPPERS:
            value: Any = message
            return self._single(descriptor.fields_by_name["value"])(value.value)
        if name in _DELEGATED:
            return json_format.MessageToDict(
                message,
                always_print_fields_with_no_presence=self._emit_defaults,
                descriptor_pool=self._pool,
            )
        plan = self._plans.get(name)
        if plan is None:
            plan = self._plans[name] = self._compile(descriptor)
        converters, defaults = plan
        out: dict[str, Any] = {}
        for field, value in message.ListFields():
            entry = converters.get(field)
            if entry is None:  # an extension: rare, let json_format speak for it
                return json_format.MessageToDict(
                    message,
                    always_print_fields_with_no_presence=self._emit_defaults,
                    descriptor_pool=self._pool,
                )
            key, convert = entry
            out[key] = convert(value)
        for key, make in defaults:
            if key not in out:
                out[key] = make()
        return out

    def _compile(
        self, descriptor: Descriptor
    ) -> tuple[dict[FieldDescriptor, tuple[str, Convert]], list[Any]]:
        converters = {f: (f.json_name, self._field(f)) for f in descriptor.fields}
        defaults: list[Any] = []
        if self._emit_defaults:
            # An input-only field is never part of a reply (AIP-203): printing its empty
            # default would read back as a change (a PATCH of the whole resource would clear
            # a write-only field, such as a map of secrets).
            defaults = [
                (f.json_name, self._default(f))
                for f in descriptor.fields
                if not f.has_presence and not _input_only(f)
            ]
        return converters, defaults

    def _field(self, f: FieldDescriptor) -> Convert:
        message = f.message_type
        if message is not None and message.GetOptions().map_entry:
            value_convert = self._single(message.fields_by_name["value"])
            return lambda m: {_map_key(k): value_convert(v) for k, v in m.items()}
        single = self._single(f)
        if f.is_repeated:
            return lambda values: [single(v) for v in values]
        return single

    def _single(self, f: FieldDescriptor) -> Convert:
        kind = f.cpp_type
        if kind == F.CPPTYPE_MESSAGE:
            assert f.message_type is not None
            if f.message_type.full_name in _WRAPPERS:
                inner = self._single(f.message_type.fields_by_name["value"])
                return lambda m: inner(m.value)
            return self.encode
        if kind == F.CPPTYPE_ENUM:
            assert f.enum_type is not None
            if f.enum_type.full_name == "google.protobuf.NullValue":
                return lambda _v: None
            names = {v.number: v.name for v in f.enum_type.values}
            return lambda v: names.get(v, v)
        if f.type == F.TYPE_BYTES:
            return _bytes
        return _SCALARS.get(kind, _same)

    def _default(self, f: FieldDescriptor) -> Callable[[], Any]:
        message = f.message_type
        if message is not None and message.GetOptions().map_entry:
            return dict
        if f.is_repeated:
            return list
        value = self._single(f)(f.default_value)
        return lambda: value


def _same(value: Any) -> Any:
    return value


def _input_only(field: FieldDescriptor) -> bool:
    behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    return field_behavior_pb2.INPUT_ONLY in behaviors


#: Scalar kinds whose JSON differs from the Python value (64-bit ints are strings).
_SCALARS: dict[int, Convert] = {
    F.CPPTYPE_INT64: str,
    F.CPPTYPE_UINT64: str,
    F.CPPTYPE_DOUBLE: _double,
    F.CPPTYPE_FLOAT: _float,
}
