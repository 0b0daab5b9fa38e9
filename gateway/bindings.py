"""The catalog: every ``google.api.http`` rule of a descriptor set, compiled once.

A rule and each of its ``additional_bindings`` become one :class:`Binding`: HTTP method,
compiled path template, how the request is filled (path, query, body) and what of the
response is sent. Bad rules (a variable naming a repeated or message field, an unknown
body field) stop the gateway at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from gateway.jsoncheck import field_index
from gateway.preconditions import EtagPath, etag_path
from gateway.routes import Router, Template, TemplateError, parse_template
from gateway.transcode import HTTP_BODY, RequestShape, compile_path_setters

FIELD_MASK = "google.protobuf.FieldMask"


class BindingError(ValueError):
    """An http rule that cannot be served."""


@dataclass(frozen=True, slots=True)
class Binding:
    """One HTTP route of one RPC."""

    method: MethodDescriptor
    full_method: str
    http_method: str
    template: Template
    shape: RequestShape
    request_class: type[Message]
    response_class: type[Message]
    response_body: FieldDescriptor | None
    http_body_response: bool
    server_streaming: bool
    mask_field: FieldDescriptor | None
    index: int
    #: Where ``If-Match`` goes (see gateway.preconditions); empty: nowhere.
    etag: EtagPath = ()

    @property
    def route(self) -> str:
        """The template, for metric labels and logs (never the raw path)."""
        return self.template.source


@dataclass
class Catalog:
    """Every binding, the router over them, and where their types come from."""

    files: descriptor_pb2.FileDescriptorSet
    pool: descriptor_pool.DescriptorPool
    bindings: list[Binding]
    router: Router[Binding]

    @classmethod
    def build(
        cls,
        files: descriptor_pb2.FileDescriptorSet,
        pool: descriptor_pool.DescriptorPool | None = None,
        services: Iterable[str] | None = None,
    ) -> Catalog:
        """Compile the rules of ``services`` (default: every service with a rule)."""
        if pool is None:
            pool = pool_from(files)
        wanted = set(services) if services is not None else None
        bindings: list[Binding] = []
        router: Router[Binding] = Router()
        for file in files.file:
            for service in file.service:
                full = f"{file.package}.{service.name}" if file.package else service.name
                if wanted is not None and full not in wanted:
                    continue
                for method in service.method:
                    for binding in _compile(pool, full, method):
                        bindings.append(binding)
                        router.add(binding.http_method, binding.template, binding)
        return cls(files, pool, bindings, router)


def load_descriptor_set(path: str | Path) -> descriptor_pb2.FileDescriptorSet:
    """Read a ``--descriptor_set_out`` file (built ``--include_imports``)."""
    return descriptor_pb2.FileDescriptorSet.FromString(Path(path).read_bytes())


def pool_from(files: descriptor_pb2.FileDescriptorSet) -> descriptor_pool.DescriptorPool:
    """A private pool holding every file of the set, dependencies first."""
    pool = descriptor_pool.DescriptorPool()
    by_name = {f.name: f for f in files.file}
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        added.add(name)
        file = by_name.get(name)
        if file is None:
            raise BindingError(f"{name} is missing from the descriptor set (use --include_imports)")
        for dependency in file.dependency:
            add(dependency)
        pool.Add(file)

    for name in by_name:
        add(name)
    return pool


def _rules(rule: http_pb2.HttpRule) -> Iterator[http_pb2.HttpRule]:
    yield rule
    yield from rule.additional_bindings


def _compile(
    pool: descriptor_pool.DescriptorPool,
    service: str,
    method_proto: descriptor_pb2.MethodDescriptorProto,
) -> list[Binding]:
    if not method_proto.options.HasExtension(annotations_pb2.http):
        return []
    method = pool.FindMethodByName(f"{service}.{method_proto.name}")
    if method.client_streaming:
        return []  # client and bidirectional streams have no HTTP/JSON mapping here
    rule = method_proto.options.Extensions[annotations_pb2.http]
    return [_binding(method, r, i) for i, r in enumerate(_rules(rule))]


def _binding(method: MethodDescriptor, rule: http_pb2.HttpRule, index: int) -> Binding:
    name = method.full_name
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise BindingError(f"{name}: http rule without a pattern")
    if kind == "custom":
        http_method, path = rule.custom.kind.upper(), rule.custom.path
    else:
        http_method, path = kind.upper(), getattr(rule, kind)
    try:
        template = parse_template(path)
    except TemplateError as exc:
        raise BindingError(f"{name}: {exc}") from None
    request = method.input_type
    field_paths = [v.field_path for v in template.variables]
    try:
        setters = compile_path_setters(request, field_paths)
    except KeyError as exc:
        raise BindingError(f"{name}: path binds unknown field {exc}") from None
    for setter in setters:
        leaf = setter.fields[-1]
        if leaf.is_repeated or leaf.message_type is not None:
            raise BindingError(f"{name}: {setter.name} must be a non-repeated scalar")
    body_field = _body_field(name, request, rule.body)
    http_body = (rule.body == "*" and request.full_name == HTTP_BODY) or (
        body_field is not None
        and body_field.message_type is not None
        and body_field.message_type.full_name == HTTP_BODY
    )
    shape = RequestShape(request, setters, rule.body, body_field, http_body)
    response_body = _response_field(name, method.output_type, rule.response_body)
    output = response_body.message_type if response_body is not None else method.output_type
    return Binding(
        method=method,
        full_method=f"/{method.containing_service.full_name}/{method.name}",
        http_method=http_method,
        template=template,
        shape=shape,
        request_class=message_factory.GetMessageClass(request),
        response_class=message_factory.GetMessageClass(method.output_type),
        response_body=response_body,
        http_body_response=output is not None and output.full_name == HTTP_BODY,
        server_streaming=method.server_streaming,
        mask_field=_mask_field(http_method, rule.body, request),
        index=index,
        etag=etag_path(request, body_field),
    )


def _body_field(name: str, request: Descriptor, body: str) -> FieldDescriptor | None:
    if body in {"", "*"}:
        return None
    field = field_index(request).get(body)
    if field is None or "." in body:
        raise BindingError(f"{name}: body {body!r} is not a top-level request field")
    return field


def _response_field(name: str, response: Descriptor, path: str) -> FieldDescriptor | None:
    if not path:
        return None
    field = field_index(response).get(path)
    if field is None:
        raise BindingError(f"{name}: response_body {path!r} is not a response field")
    return field


def _mask_field(http_method: str, body: str, request: Descriptor) -> FieldDescriptor | None:
    """The FieldMask to infer from the body keys (PATCH, body not ``*``, one mask field)."""
    if http_method != "PATCH" or body in {"", "*"}:
        return None
    masks = [
        f
        for f in request.fields
        if f.message_type is not None
        and f.message_type.full_name == FIELD_MASK
        and not f.is_repeated
    ]
    return masks[0] if len(masks) == 1 else None
