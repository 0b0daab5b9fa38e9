"""``If-Match`` as the request's etag (AIP-154), by one generic rule.

A binding's etag field is the request's own singular string field named ``etag`` (delete
and custom methods), or else that of the message its body field carries (an update's
resource: ``book.etag``). An ``If-Match`` header on such a route is that field's value, so
the service checks it exactly as it checks an etag in the body or the query: the same
status and details when it is stale. A route without an etag field leaves the header to
the service (it still arrives as ``grpcgateway-if-match`` metadata).

- One entity tag, copied verbatim (``W/"x"`` keeps its ``W/``): the service compares it
  with the etags it issues, weak ones included. RFC 9110's strong comparison would make a
  weak etag never match.
- ``*`` (any current version) sets nothing: the method already needs the resource to exist.
- A list of several tags is refused (one field holds one etag), as is a malformed value.
- An etag in the body or the query that differs from the header is refused.
"""

from __future__ import annotations

import re

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from gateway.jsoncheck import bad_field

HEADER = "If-Match"
_TAG = r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"'
_ONE = re.compile(_TAG)
_LIST = re.compile(rf"{_TAG}(?:[ \t]*,[ \t]*{_TAG})+")

EtagPath = tuple[FieldDescriptor, ...]


def is_etag(field: FieldDescriptor) -> bool:
    """Whether ``field`` is an AIP-154 etag: a singular string field named ``etag``."""
    return (
        field.name == "etag" and field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated
    )


def etag_path(request: Descriptor, body_field: FieldDescriptor | None) -> EtagPath:
    """The fields leading to a binding's etag; empty when it has none."""
    own = request.fields_by_name.get("etag")
    if own is not None and is_etag(own):
        return (own,)
    carried = body_field.message_type if body_field is not None else None
    if body_field is not None and carried is not None and not body_field.is_repeated:
        inner = carried.fields_by_name.get("etag")
        if inner is not None and is_etag(inner):
            return (body_field, inner)
    return ()


def if_match_tag(header: str) -> str | None:
    """The one entity tag of an ``If-Match`` value; ``None`` for ``*`` or no value."""
    text = header.strip(" \t")
    if text in {"", "*"}:
        return None
    if _ONE.fullmatch(text):
        return text
    if _LIST.fullmatch(text):
        raise bad_field(HEADER, "give one entity tag (or *): the request carries one etag")
    raise bad_field(HEADER, 'must be an entity tag, "abc" or W/"abc" (quotes included), or *')


def apply_if_match(message: Message, path: EtagPath, header: str) -> None:
    """Set the etag field from ``If-Match``; a different etag already set is a 400."""
    if not path:
        return
    tag = if_match_tag(header)
    if tag is None:
        return
    parent = message
    for field in path[:-1]:
        parent = getattr(parent, field.name)
    leaf = path[-1].name
    given = getattr(parent, leaf)
    if given and given != tag:
        name = ".".join(field.name for field in path)
        raise bad_field(name, f"differs from the {HEADER} header; send one etag")
    setattr(parent, leaf, tag)
