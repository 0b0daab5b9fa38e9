"""A method without a valid policy stops the server from starting."""

from __future__ import annotations

import contextlib

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2
from tunnelplane.v1 import options_pb2

from server.app import SERVICES, method_table
from server.policy import PolicyError, load_policies


def service_with(policy: options_pb2.Policy | None, request: str = ".google.protobuf.Empty"):
    """A one-method service in a private pool, with ``policy`` on its method (or none)."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(empty_pb2.DESCRIPTOR.serialized_pb)
    for dependency in options_pb2.DESCRIPTOR.dependencies:
        for file in [*dependency.dependencies, dependency]:
            with contextlib.suppress(TypeError):  # already added
                pool.AddSerializedFile(file.serialized_pb)
    pool.AddSerializedFile(options_pb2.DESCRIPTOR.serialized_pb)
    proto = descriptor_pb2.FileDescriptorProto(
        name="probe/v1/probe.proto",
        package="probe.v1",
        dependency=["google/protobuf/empty.proto", "tunnelplane/v1/options.proto"],
        syntax="proto3",
    )
    proto.message_type.add(name="Req").field.add(
        name="name",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    method = proto.service.add(name="ProbeService").method.add(
        name="Do", input_type=request, output_type=".google.protobuf.Empty"
    )
    if policy is not None:
        method.options.Extensions[options_pb2.policy].CopyFrom(policy)
    pool.Add(proto)
    return pool.FindServiceByName("probe.v1.ProbeService")


def test_every_contract_method_has_a_valid_policy() -> None:
    methods = method_table(SERVICES)
    assert len(methods) == sum(len(s.methods) for s in SERVICES)


def test_a_method_without_policy_is_refused_at_start_up() -> None:
    with pytest.raises(PolicyError, match="declares no"):
        method_table([service_with(None)])


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (options_pb2.Policy(), "unspecified"),
        (
            options_pb2.Policy(access=options_pb2.ACCESS_AUTHENTICATED, permission="nope"),
            "unknown permission",
        ),
        (
            options_pb2.Policy(access=options_pb2.ACCESS_AUTHENTICATED, admin_permission="x.y"),
            "unknown permission",
        ),
        (
            options_pb2.Policy(access=options_pb2.ACCESS_PUBLIC, permission="profile.read"),
            "public method",
        ),
    ],
)
def test_nonsensical_policies_are_refused(policy: options_pb2.Policy, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load_policies(service_with(policy).methods)


def test_owner_field_must_be_a_string_field_of_the_request() -> None:
    missing = options_pb2.Policy(access=options_pb2.ACCESS_AUTHENTICATED, owner_field="parent")
    with pytest.raises(PolicyError, match="not a field"):
        load_policies(service_with(missing, ".probe.v1.Req").methods)
    present = options_pb2.Policy(access=options_pb2.ACCESS_AUTHENTICATED, owner_field="name")
    (policy,) = load_policies(service_with(present, ".probe.v1.Req").methods).values()
    assert policy.rule.owner_field == "name"
    assert not policy.rule.public
