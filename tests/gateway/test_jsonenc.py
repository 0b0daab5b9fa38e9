"""The compiled JSON encoder gives exactly what ``json_format.MessageToDict`` gives."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tunnelplane.v1 import users_pb2

from gateway.jsonenc import JsonEncoder
from tests.gateway.echo_proto import echo_pb2
from tests.gateway.test_fuzz import body_messages, url_messages


def comparable(value: Any) -> Any:
    """NaN is not equal to itself; compare it as a marker."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def check(message: Any, emit_defaults: bool) -> None:
    expected = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=emit_defaults
    )
    got = JsonEncoder(emit_defaults=emit_defaults).encode(message)
    assert comparable(got) == comparable(expected)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=st.one_of(url_messages(), body_messages()), emit_defaults=st.booleans())
def test_same_as_json_format_for_every_field_kind(
    message: echo_pb2.Everything, emit_defaults: bool
) -> None:
    check(message, emit_defaults)


def test_same_as_json_format_for_the_special_forms() -> None:
    message = echo_pb2.Everything(
        labels={"a": "b"},
        repeated_color=[1, 2, 7],  # 7 is unknown: kept as a number
        float_value=1.1,
        double_value=float("inf"),
        choice_number=3,
        optional_string="",
    )
    message.wrapped_bool.value = False
    message.wrapped_bytes.value = b"\x00\xff"
    message.struct_value.update({"k": [1, "x", None, {"n": True}]})
    message.value.string_value = "v"
    message.any.Pack(echo_pb2.Thing(name="t", size=3))
    message.nested.deeper.words.append("w")
    message.timestamp.FromJsonString("2024-02-29T12:00:00.123Z")
    message.duration.FromJsonString("-1.5s")
    message.field_mask.paths.extend(["a_b", "c"])
    for emit in (True, False):
        check(message, emit)
    check(users_pb2.User(name="users/x", tier=2), emit_defaults=True)
    check(users_pb2.ListUsersResponse(users=[users_pb2.User(name="users/y")]), emit_defaults=True)
