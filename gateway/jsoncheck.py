"""What ``json_format`` lets through, checked before a JSON body is parsed.

With ``ignore_unknown_fields`` (the gateway's default, non-strict mode) protobuf's
``json_format`` drops an enum name it does not know as if it were an unknown field, and in
either mode it reads a string given for a message field as an object of its characters
(``{"sub": "text"}`` becomes an empty ``sub``), takes ``true`` or ``1.5`` for enum number 1
and silently drops an enum number beyond 32 bits. Each of those is a 400 here, naming the
field as the caller wrote it (``a.b``, ``list[0]``, ``map.key``), in either mode, as is a
field given twice (``json_format`` would name only the message). Unknown keys are left to
``json_format``: ignored, or refused in strict mode.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from gateway.errors import GatewayError

ANY = "google.protobuf.Any"
#: Message types whose JSON form is not an object of their fields: json_format checks them.
OWN_JSON_FORM = frozenset(
    f"google.protobuf.{name}"
    for name in (
        "Timestamp", "Duration", "FieldMask", "Struct", "Value", "ListValue", "DoubleValue",
        "FloatValue", "Int64Value", "UInt64Value", "Int32Value", "UInt32Value", "BoolValue",
        "StringValue", "BytesValue",
    )
)  # fmt: skip
_INT32 = range(-(2**31), 2**31)
_DECIMAL = re.compile(r"-?[0-9]+")


def bad_field(field: str, description: str) -> GatewayError:
    """A 400 naming ``field``."""
    return GatewayError.invalid_argument([(field, description)])


@cache
def field_index(message: Descriptor) -> dict[str, FieldDescriptor]:
    """A message's fields by proto name and by JSON name."""
    index = {f.name: f for f in message.fields}
    index.update({f.json_name: f for f in message.fields})
    return index


def check_document(
    document: dict[str, Any],
    message: Descriptor,
    pool: descriptor_pool.DescriptorPool,
    prefix: str = "",
) -> None:
    """Raise a 400 naming the first field whose value ``json_format`` would misread, or
    that is set twice (by both its names, or with another member of its oneof)."""
    index = field_index(message)
    seen: dict[str, str] = {}
    for key, value in document.items():
        field = index.get(key)
        if field is None:
            continue  # unknown: json_format's (strict) call
        name = f"{prefix}.{key}" if prefix else key
        if field.name in seen:
            raise bad_field(name, f"is also given as {seen[field.name]!r}")
        seen[field.name] = key
        if value is None:
            continue  # null: unset
        oneof = field.containing_oneof
        if oneof is not None:
            if oneof.name in seen:
                raise bad_field(
                    name, f"{seen[oneof.name]!r} is set too: they are one of {oneof.name}"
                )
            seen[oneof.name] = key
        _check_field(field, value, name, pool)


def _check_field(
    field: FieldDescriptor, value: Any, name: str, pool: descriptor_pool.DescriptorPool
) -> None:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        if not isinstance(value, dict):
            raise bad_field(name, "must be a JSON object (a map)")
        value_field = entry.fields_by_name["value"]
        for key, item in value.items():
            if item is not None:
                _check_value(value_field, item, f"{name}.{key}", pool)
    elif field.is_repeated:
        if not isinstance(value, list):
            raise bad_field(name, "must be a JSON array")
        for position, item in enumerate(value):
            if item is not None:  # json_format names a null element itself
                _check_value(field, item, f"{name}[{position}]", pool)
    else:
        _check_value(field, value, name, pool)


def _check_value(
    field: FieldDescriptor, value: Any, name: str, pool: descriptor_pool.DescriptorPool
) -> None:
    if field.enum_type is not None:
        _check_enum(field.enum_type, value, name)
        return
    target = field.message_type
    if target is None or target.full_name in OWN_JSON_FORM:
        return  # scalars and special forms: json_format checks them and names the field
    if target.full_name == ANY:
        _check_any(value, name, pool)
        return
    if not isinstance(value, dict):
        raise bad_field(name, f"must be a JSON object (a {target.full_name})")
    check_document(value, target, pool, name)


def _check_enum(enum: EnumDescriptor, value: Any, name: str) -> None:
    if enum.full_name == "google.protobuf.NullValue":
        return
    if isinstance(value, str):
        if value in enum.values_by_name:
            return
        if _DECIMAL.fullmatch(value):
            _check_enum_number(enum, int(value), name)
            return
        raise bad_field(name, f"{value[:64]!r} is not a value of {enum.full_name}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        _check_enum_number(enum, value, name)
        return
    raise bad_field(name, f"must be a value name (or number) of {enum.full_name}")


def _check_enum_number(enum: EnumDescriptor, number: int, name: str) -> None:
    if number not in _INT32:
        raise bad_field(name, "enum numbers are 32-bit")
    if enum.is_closed and number not in enum.values_by_number:
        raise bad_field(name, f"{number} is not a value of {enum.full_name}")


def _check_any(value: Any, name: str, pool: descriptor_pool.DescriptorPool) -> None:
    if not isinstance(value, dict):
        raise bad_field(name, 'must be a JSON object with "@type"')
    type_url = value.get("@type")
    if type_url is None:
        return  # json_format: {} is an empty Any, fields without a type are refused
    if not isinstance(type_url, str):
        raise bad_field(name, '"@type" must be a type URL')
    try:
        packed = pool.FindMessageTypeByName(type_url.rpartition("/")[2])
    except KeyError:
        return  # json_format names the field with "Can not find message descriptor"
    if packed.full_name == ANY and value.get("value") is not None:
        _check_any(value["value"], f"{name}.value", pool)
    if packed.full_name in OWN_JSON_FORM or packed.full_name == ANY:
        return  # {"@type": ..., "value": <its JSON form>}
    rest = {key: item for key, item in value.items() if key != "@type"}
    check_document(rest, packed, pool, name)
