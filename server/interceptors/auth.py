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
from server.errors import InvalidArgument, PermissionDenied
from server.pipeline import Call, Handler, MethodInfo


def field_value(message: Message, path: list[str]) -> str:
    """The string at a dotted field path (empty when a message on the way is unset)."""
    value: object = message
    for part in path:
        value = getattr(value, part)
    return value if isinstance(value, str) else ""


class AuthStage:
    """Sets ``call.principal`` and enforces the policy's rule.

    ``require_tls`` methods are refused over plain HTTP when ``tls_required`` (production
    mode): they carry passwords or tokens, or return secrets.
    """

    def __init__(self, authenticator: Authenticator, *, tls_required: bool = False) -> None:
        self._authenticator = authenticator
        self._tls_required = tls_required

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        authenticator = self._authenticator
        rule = method.policy.rule
        owner_path = rule.owner_field.split(".") if rule.owner_field else []
        needs_tls = self._tls_required and method.policy.require_tls

        async def handle(request: Message, call: Call) -> Message:
            if needs_tls and call.transport == "http" and not call.secure:
                raise PermissionDenied(
                    "this method is only served over HTTPS", reason="TLS_REQUIRED"
                )
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
