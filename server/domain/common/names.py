"""Resource names (AIP-122): parsing ``users/{user}`` and friends, with the ``me`` alias."""

from __future__ import annotations

from server.domain.common.errors import InvalidArgument
from server.domain.common.ids import is_id

ME = "me"


def user_id_of(name: str, field: str, caller_id: str | None, *, suffix: str = "") -> str:
    """The user id in ``users/{user}{suffix}``; ``me`` is ``caller_id``."""
    parts = name.split("/")
    expected = 2 + (len(suffix.strip("/").split("/")) if suffix else 0)
    if len(parts) != expected or parts[0] != "users" or "/".join(parts[2:]) != suffix.strip("/"):
        raise InvalidArgument.single(field, f"must look like users/{{user}}{suffix}")
    user = parts[1]
    if user == ME:
        if caller_id is None:
            raise InvalidArgument.single(field, "users/me needs credentials")
        return caller_id
    if not is_id(user, "usr"):
        raise InvalidArgument.single(field, "is not a valid user id")
    return user


def api_key_parts(name: str, field: str, caller_id: str | None) -> tuple[str, str]:
    """(user id, key id) of ``users/{user}/apiKeys/{key}``."""
    parts = name.split("/")
    if len(parts) != 4 or parts[2] != "apiKeys" or not parts[3]:
        raise InvalidArgument.single(field, "must look like users/{user}/apiKeys/{api_key}")
    user_id = user_id_of("/".join(parts[:2]), field, caller_id)
    if not is_id(parts[3], "key"):
        raise InvalidArgument.single(field, "is not a valid API key id")
    return user_id, parts[3]


def owner_of(name: str, caller_id: str | None) -> str | None:
    """The user who owns the resource ``name`` names, or ``None`` if it names no user's.

    Every resource of this API lives under ``users/{user}``; later collections register
    here (for example a tunnel's owner comes from storage).
    """
    parts = name.split("/")
    if len(parts) < 2 or parts[0] != "users" or not parts[1]:
        return None
    if parts[1] == ME:
        return caller_id
    return parts[1]


def api_key_name(user_id: str, key_id: str) -> str:
    """``users/{user}/apiKeys/{key}``."""
    return f"users/{user_id}/apiKeys/{key_id}"
