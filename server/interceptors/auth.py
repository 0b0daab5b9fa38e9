"""Authentication and authorization, driven by each method's declared policy.

The credential (if any) is verified first; then :func:`server.domain.principal.authorize`
decides with the method's rule and the owner of the resource the request names. Every
check happens before the servicer runs, so a refused call has no side effect.
"""

from __future__ import annotations

from google.protobuf.message import Message

from server.domain import audit
from server.domain.authn import Authenticator
from server.domain.names import owner_of
from server.domain.principal import authorize
from server.errors import InvalidArgument
from server.pipeline import Call, Handler, MethodInfo


def field_value(message: Message, path: list[str]) -> str:
    """The string at a dotted field path (empty when a message on the way is unset)."""
    value: object = message
    for part in path:
        value = getattr(value, part)
    return value if isinstance(value, str) else ""


class AuthStage:
    """Sets ``call.principal`` and enforces the policy's rule."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        authenticator = self._authenticator
        rule = method.policy.rule
        owner_path = rule.owner_field.split(".") if rule.owner_field else []

        async def handle(request: Message, call: Call) -> Message:
            authorization = call.header("authorization")
            principal = await authenticator.authenticate(authorization) if authorization else None
            call.principal = principal
            owner = None
            if principal is not None:
                audit.set_actor(principal.user_id, principal.api_key_id)
                if owner_path:
                    owner = owner_of(field_value(request, owner_path), principal.user_id)
                    if owner is None:
                        raise InvalidArgument.single(
                            rule.owner_field, "must name a user's resource"
                        )
            authorize(rule, principal, owner)
            return await handler(request, call)

        return handle
