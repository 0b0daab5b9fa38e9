"""Operation names."""

from __future__ import annotations

from server.domain.common.errors import InvalidArgument
from server.domain.common.ids import is_id
from server.domain.common.names import user_id_of


def operation_parts(name: str, field_name: str, caller_id: str | None) -> tuple[str, str]:
    """(owner id, operation id) of ``users/{user}/operations/{operation}``."""
    parts = name.split("/")
    if len(parts) != 4 or parts[2] != "operations":
        raise InvalidArgument.single(
            field_name, "must look like users/{user}/operations/{operation}"
        )
    owner = user_id_of("/".join(parts[:2]), field_name, caller_id)
    if not is_id(parts[3], "opr"):
        raise InvalidArgument.single(field_name, "is not a valid operation id")
    return owner, parts[3]
