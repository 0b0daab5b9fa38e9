"""A method without a valid policy stops the server from starting."""

from __future__ import annotations

import contextlib

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2
from tunnelplane.v1 import options_pb2

from server.app import SERVICES, method_table
from server.policy import PolicyError, load_policies


def service_with(
    policy: options_pb2.Policy | None,
    request: str = ".google.protobuf.Empty",
    *,
    streams: tuple[bool, bool] = (False, False),
    http: http_pb2.HttpRule | None = None,
):
    """A one-method service in a private pool, with ``policy`` on its method (or none);
    ``streams`` says whether the client and the server stream, ``http`` binds it."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(empty_pb2.DESCRIPTOR.serialized_pb)
    for dependency in [*options_pb2.DESCRIPTOR.dependencies, annotations_pb2.DESCRIPTOR]:
        for file in [*dependency.dependencies, dependency]:
            with contextlib.suppress(TypeError):  # already added
                pool.AddSerializedFile(file.serialized_pb)
    pool.AddSerializedFile(options_pb2.DESCRIPTOR.serialized_pb)
    proto = descriptor_pb2.FileDescriptorProto(
        name="probe/v1/probe.proto",
        package="probe.v1",
        dependency=[
            "google/protobuf/empty.proto",
            "tunnelplane/v1/options.proto",
            "google/api/annotations.proto",
        ],
        syntax="proto3",
    )
    proto.message_type.add(name="Req").field.add(
        name="name",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    method = proto.service.add(name="ProbeService").method.add(
        name="Do",
        input_type=request,
        output_type=".google.protobuf.Empty",
        client_streaming=streams[0],
        server_streaming=streams[1],
    )
    if policy is not None:
        method.options.Extensions[options_pb2.policy].CopyFrom(policy)
    if http is not None:
        method.options.Extensions[annotations_pb2.http].CopyFrom(http)
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
        (
            options_pb2.Policy(access=options_pb2.ACCESS_AUTHENTICATED, stream_limit="max_tunnels"),
            "unknown stream_limit",
        ),
        (
            options_pb2.Policy(
                access=options_pb2.ACCESS_AUTHENTICATED, stream_limit="max_watch_streams"
            ),
            "streaming methods only",  # the probe method is unary
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


COOKIE_WATCH = options_pb2.Policy(access=options_pb2.ACCESS_AUTHENTICATED, cookie_auth=True)
GET = http_pb2.HttpRule(get="/v1/things:watch")


@pytest.mark.parametrize(
    ("policy", "streams", "http", "message"),
    [
        (COOKIE_WATCH, (False, False), GET, "server-streaming"),  # unary
        (COOKIE_WATCH, (True, True), GET, "server-streaming"),  # bidirectional
        (COOKIE_WATCH, (True, False), GET, "server-streaming"),  # client streaming
        (COOKIE_WATCH, (False, True), http_pb2.HttpRule(post="/v1/x", body="*"), "GET"),
        (
            COOKIE_WATCH,
            (False, True),
            http_pb2.HttpRule(get="/v1/x", additional_bindings=[http_pb2.HttpRule(put="/v1/y")]),
            "GET",
        ),
        (
            options_pb2.Policy(access=options_pb2.ACCESS_PUBLIC, cookie_auth=True),
            (False, True),
            GET,
            "ACCESS_AUTHENTICATED",
        ),
        (
            options_pb2.Policy(
                access=options_pb2.ACCESS_AUTHENTICATED,
                cookie_auth=True,
                credentials=[options_pb2.CREDENTIAL_KIND_API_KEY],
            ),
            (False, True),
            GET,
            "session credentials",
        ),
    ],
)
def test_cookie_auth_is_refused_on_anything_but_a_read_only_stream(
    policy: options_pb2.Policy,
    streams: tuple[bool, bool],
    http: http_pb2.HttpRule,
    message: str,
) -> None:
    """A browser attaches cookies on its own: a cookie may only authenticate a safe read."""
    with pytest.raises(PolicyError, match=message):
        load_policies(service_with(policy, streams=streams, http=http).methods)


def test_cookie_auth_is_allowed_on_a_server_stream_bound_to_get() -> None:
    (policy,) = load_policies(
        service_with(COOKIE_WATCH, streams=(False, True), http=GET).methods
    ).values()
    assert policy.cookie_auth
    (unbound,) = load_policies(service_with(COOKIE_WATCH, streams=(False, True)).methods).values()
    assert unbound.cookie_auth  # gRPC only: no HTTP binding to be unsafe


def test_only_the_watches_accept_the_access_cookie() -> None:
    cookie_methods = {m.full_name for m in method_table(SERVICES) if m.policy.cookie_auth}
    assert cookie_methods == {
        "/tunnelplane.v1.TunnelService/WatchTunnels",
        "/tunnelplane.v1.ProxyService/WatchProxies",
    }
