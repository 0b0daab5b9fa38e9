"""OpenAPI 3.1, built from the same descriptors and rules the gateway serves.

Paths come from the compiled bindings (``{name=users/*}`` is expanded to
``users/{user}`` so every path parameter is a plain segment), schemas from the message
descriptors in their proto3 JSON form, descriptions from the proto comments (the
descriptor set's source info), and errors from the status mapping with the
``google.rpc.Status`` body. An embedding program can add to each operation (security,
policy) through an :class:`OpenApiExtension`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, MethodDescriptor

from gateway.bindings import Binding, Catalog
from gateway.errors import HTTP_STATUS
from gateway.routes import DOUBLE_STAR, LITERAL, Template
from gateway.transcode import WRAPPERS

F = FieldDescriptor
_SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    F.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    F.TYPE_INT64: {"type": "string", "format": "int64"},
    F.TYPE_SINT64: {"type": "string", "format": "int64"},
    F.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    F.TYPE_UINT64: {"type": "string", "format": "uint64"},
    F.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated paths."},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}
_BINARY = {"type": "string", "format": "binary"}
_ERROR_TEXT = {
    400: "Invalid argument, failed precondition or out of range.",
    401: "Missing or invalid credentials.",
    403: "Permission denied.",
    404: "Not found.",
    409: "Already exists or aborted (a concurrent change).",
    413: "Request body too large.",
    429: "Rate limit or quota exhausted.",
    499: "The client cancelled the call.",
    500: "Internal error.",
    501: "Not implemented.",
    503: "Unavailable; retry later.",
    504: "Deadline exceeded.",
}


@dataclass(frozen=True)
class OpenApiExtension:
    """What an embedding program adds: per-operation fields and security schemes."""

    operation: Callable[[MethodDescriptor], dict[str, Any]]
    security_schemes: dict[str, Any] = field(default_factory=dict)


OperationExtension = OpenApiExtension


class _Comments:
    """Leading comments by full symbol name, read from the descriptor set's source info."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self._text: dict[str, str] = {}
        for file in files.file:
            names = _symbol_paths(file)
            for location in file.source_code_info.location:
                name = names.get(tuple(location.path))
                text = location.leading_comments.strip()
                if name and text:
                    self._text[name] = "\n".join(line.strip() for line in text.splitlines())

    def get(self, name: str) -> str:
        return self._text.get(name, "")


def _symbol_paths(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    prefix = f"{file.package}." if file.package else ""
    paths: dict[tuple[int, ...], str] = {}

    def message(proto: descriptor_pb2.DescriptorProto, path: tuple[int, ...], name: str) -> None:
        paths[path] = name
        for i, f in enumerate(proto.field):
            paths[(*path, 2, i)] = f"{name}.{f.name}"
        for i, nested in enumerate(proto.nested_type):
            message(nested, (*path, 3, i), f"{name}.{nested.name}")
        for i, nested_enum in enumerate(proto.enum_type):
            enum(nested_enum, (*path, 4, i), f"{name}.{nested_enum.name}")

    def enum(proto: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], name: str) -> None:
        paths[path] = name
        for i, value in enumerate(proto.value):
            paths[(*path, 2, i)] = f"{name}.{value.name}"

    for i, m in enumerate(file.message_type):
        message(m, (4, i), prefix + m.name)
    for i, e in enumerate(file.enum_type):
        enum(e, (5, i), prefix + e.name)
    for i, s in enumerate(file.service):
        paths[(6, i)] = prefix + s.name
        for j, rpc in enumerate(s.method):
            paths[(6, i, 2, j)] = f"{prefix}{s.name}.{rpc.name}"
    return paths


class _Schemas:
    """Component schemas, added as they are referenced."""

    def __init__(self, comments: _Comments) -> None:
        self.components: dict[str, Any] = {}
        self._comments = comments

    def ref(self, name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def message(self, descriptor: Descriptor) -> dict[str, Any]:
        name = descriptor.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name in WRAPPERS:
            inner = _SCALARS[descriptor.fields_by_name["value"].type]
            return {**inner, "type": [inner["type"], "null"]}
        if name not in self.components:
            self.components[name] = {}  # placeholder: breaks recursion
            self.components[name] = self._object(descriptor)
        return self.ref(name)

    def _object(self, descriptor: Descriptor) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object", "properties": {}}
        required: list[str] = []
        for f in descriptor.fields:
            prop = self.field(f)
            behaviors = _behaviors(f)
            if field_behavior_pb2.REQUIRED in behaviors:
                required.append(f.json_name)
            if field_behavior_pb2.OUTPUT_ONLY in behaviors:
                prop = {**prop, "readOnly": True}
            if field_behavior_pb2.INPUT_ONLY in behaviors:
                prop = {**prop, "writeOnly": True}
            if f.GetOptions().deprecated:
                prop = {**prop, "deprecated": True}
            text = self._comments.get(f.full_name)
            if text:
                prop = {**prop, "description": text}
            schema["properties"][f.json_name] = prop
        if required:
            schema["required"] = required
        text = self._comments.get(descriptor.full_name)
        if text:
            schema["description"] = text
        return schema

    def field(self, f: FieldDescriptor) -> dict[str, Any]:
        message = f.message_type
        if message is not None and message.GetOptions().map_entry:
            value = self.field(message.fields_by_name["value"])
            return {"type": "object", "additionalProperties": value}
        base = self.single(f)
        return {"type": "array", "items": base} if f.is_repeated else base

    def single(self, f: FieldDescriptor) -> dict[str, Any]:
        if f.message_type is not None:
            return self.message(f.message_type)
        if f.enum_type is not None:
            return self.enum(f.enum_type)
        return dict(_SCALARS[f.type])

    def enum(self, descriptor: EnumDescriptor) -> dict[str, str]:
        name = descriptor.full_name
        if name not in self.components:
            schema: dict[str, Any] = {"type": "string", "enum": [v.name for v in descriptor.values]}
            lines = [self._comments.get(name)] + [
                f"- `{v.name}`: {self._comments.get(f'{name}.{v.name}')}"
                for v in descriptor.values
                if self._comments.get(f"{name}.{v.name}")
            ]
            text = "\n".join(line for line in lines if line)
            if text:
                schema["description"] = text
            self.components[name] = schema
        return self.ref(name)


def _behaviors(f: FieldDescriptor) -> Sequence[int]:
    return list(f.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def openapi_path(template: Template) -> tuple[str, list[tuple[str, str]]]:
    """The OpenAPI path of a template and its parameters as (name, description)."""
    parts: list[str] = []
    params: list[tuple[str, str]] = []
    by_start = {v.start: v for v in template.variables}
    i = 0
    while i < len(template.segments):
        variable = by_start.get(i)
        if variable is None:
            segment = template.segments[i]
            parts.append(segment.text if segment.kind == LITERAL else "{" + f"_{i}" + "}")
            if segment.kind != LITERAL:
                params.append((f"_{i}", "Any value of one segment."))
            i += 1
            continue
        end = len(template.segments) if variable.end is None else variable.end
        pieces = template.segments[variable.start : end]
        if len(pieces) == 1:
            name = variable.field_path
            note = "May contain `/`." if pieces[0].kind == DOUBLE_STAR else ""
            parts.append("{" + name + "}")
            params.append((name, f"`{variable.field_path}`. {note}".strip()))
        else:
            previous = ""
            for piece in pieces:
                if piece.kind == LITERAL:
                    parts.append(piece.text)
                    previous = piece.text
                    continue
                name = _unique(_singular(previous) or variable.field_path, [p for p, _ in params])
                parts.append("{" + name + "}")
                params.append((name, f"Part of `{variable.field_path}`."))
        i = end
    path = "/" + "/".join(parts)
    return (path + ":" + template.verb if template.verb else path), params


def _singular(word: str) -> str:
    if word.endswith("ies"):
        return word[:-3] + "y"
    return word[:-1] if word.endswith("s") else word


def _unique(name: str, taken: Iterable[str]) -> str:
    taken = set(taken)
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}{n}", n + 1
    return candidate


def _query_parameters(binding: Binding, schemas: _Schemas) -> list[dict[str, Any]]:
    shape = binding.shape
    if shape.body == "*":
        return []
    params: list[dict[str, Any]] = []

    def walk(message: Descriptor, trail: list[FieldDescriptor], seen: tuple[str, ...]) -> None:
        prefix = "".join(f"{t.name}." for t in trail)
        for f in message.fields:
            if shape.binds([*trail, f]):
                continue
            name = prefix + f.name
            sub = f.message_type
            if (
                sub is None
                or sub.full_name in WRAPPERS
                or sub.full_name
                in (
                    "google.protobuf.Timestamp",
                    "google.protobuf.Duration",
                    "google.protobuf.FieldMask",
                )
            ):
                schema = schemas.field(f)
                params.append(
                    {
                        "name": name,
                        "in": "query",
                        "schema": schema,
                        "description": schemas._comments.get(f.full_name),
                        **({"explode": True} if f.is_repeated else {}),
                    }
                )
            elif not f.is_repeated and sub.full_name not in seen and len(seen) < 4:
                walk(sub, [*trail, f], (*seen, sub.full_name))

    walk(shape.message, [], (shape.message.full_name,))
    return params


def _if_match_parameter(binding: Binding) -> list[dict[str, Any]]:
    """``If-Match`` where it stands for the request's etag (gateway.preconditions)."""
    if not binding.etag:
        return []
    field = ".".join(f.json_name for f in binding.etag)
    return [
        {
            "name": "If-Match",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": f"Sets `{field}`: one entity tag as the resource's `etag` reads "
            '(`W/"..."` included), or `*` for none. A different etag in the request is a 400.',
        }
    ]


def _request_body(binding: Binding, schemas: _Schemas) -> dict[str, Any] | None:
    shape = binding.shape
    if not shape.body:
        return None
    if shape.http_body:
        return {"required": True, "content": {"*/*": {"schema": _BINARY}}}
    schema = (
        schemas.message(shape.message)
        if shape.body_field is None
        else schemas.field(shape.body_field)
    )
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _responses(binding: Binding, schemas: _Schemas) -> dict[str, Any]:
    output = binding.method.output_type
    if binding.http_body_response:
        success: dict[str, Any] = {
            "description": "The raw body.",
            "content": {"*/*": {"schema": _BINARY}},
        }
    else:
        schema = (
            schemas.field(binding.response_body)
            if binding.response_body is not None
            else schemas.message(output)
        )
        if binding.server_streaming:
            line = {
                "type": "object",
                "properties": {"result": schema, "error": schemas.ref("google.rpc.Status")},
            }
            content = {
                "application/x-ndjson": {"schema": line},
                "text/event-stream": {"schema": line},
            }
            success = {"description": "A stream of results, one per line.", "content": content}
        else:
            success = {"description": "OK", "content": {"application/json": {"schema": schema}}}
    responses: dict[str, Any] = {"200": success}
    error = {"application/json": {"schema": schemas.ref("google.rpc.Status")}}
    for status in sorted(set(HTTP_STATUS.values()) | {413}):
        if status != 200:
            responses[str(status)] = {"description": _ERROR_TEXT[status], "content": error}
    return responses


def _status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "The error: a google.rpc.Status with its details.",
        "properties": {
            "code": {"type": "integer", "format": "int32", "description": "gRPC status code."},
            "message": {"type": "string"},
            "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
            "requestId": {"type": "string", "description": "Quote this id to support."},
        },
        "required": ["code", "message"],
    }


def build_document(
    catalog: Catalog, title: str, version: str, extension: OpenApiExtension | None = None
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for every binding of ``catalog``."""
    comments = _Comments(catalog.files)
    schemas = _Schemas(comments)
    schemas.components["google.rpc.Status"] = _status_schema()
    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, str] = {}
    for binding in catalog.bindings:
        method = binding.method
        service = method.containing_service
        tags[service.name] = comments.get(service.full_name)
        path, path_params = openapi_path(binding.template)
        text = comments.get(method.full_name)
        summary, _, description = text.partition("\n")
        operation: dict[str, Any] = {
            "operationId": f"{service.name}_{method.name}"
            + (f"_{binding.index}" if binding.index else ""),
            "tags": [service.name],
            "summary": summary,
            "parameters": [
                {
                    "name": n,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": d,
                }
                for n, d in path_params
            ]
            + _query_parameters(binding, schemas)
            + _if_match_parameter(binding),
            "responses": _responses(binding, schemas),
        }
        if description.strip():
            operation["description"] = description.strip()
        body = _request_body(binding, schemas)
        if body is not None:
            operation["requestBody"] = body
        if method.GetOptions().deprecated:
            operation["deprecated"] = True
        if extension is not None:
            operation.update(extension.operation(method))
        paths.setdefault(path, {})[binding.http_method.lower()] = operation
    components: dict[str, Any] = {"schemas": schemas.components}
    if extension is not None and extension.security_schemes:
        components["securitySchemes"] = extension.security_schemes
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "tags": [{"name": n, "description": d} for n, d in tags.items()],
        "paths": paths,
        "components": components,
    }
