"""Authentication and authorization, driven by each method's declared policy.

The credential (if any) is verified first (:class:`AuthenticateStage`); rate limits then
count the call; then :func:`server.domain.principal.authorize` decides with the method's
rule and the owner of the resource the request names (:class:`AuthorizeStage`). Every
check happens before the servicer runs, so a refused call has no side effect.
"""

from __future__ import annotations

from typing import Protocol

from google.protobuf.message import Message

from server.domain import audit
from server.domain.authn import Authenticator
from server.domain.names import owner_of
from server.domain.principal import ShareRole, authorize, needs_share_lookup
from server.errors import InvalidArgument, PermissionDenied, Unauthenticated
from server.pipeline import Call, Handler, MethodInfo


def field_value(message: Message, path: list[str]) -> str:
    """The string at a dotted field path (empty when a message on the way is unset)."""
    value: object = message
    for part in path:
        value = getattr(value, part)
    return value if isinstance(value, str) else ""


class AuthenticateStage:
    """Verifies the credential, if any, and sets ``call.principal``.

    A bad credential is kept on the call rather than raised, so that the rate-limit
    stage can count the call against its address before :class:`AuthorizeStage`
    refuses it: floods of bad tokens are limited like any other traffic.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        authenticator = self._authenticator

        async def handle(request: Message, call: Call) -> Message:
            authorization = call.header("authorization")
            if authorization:
                try:
                    principal = await authenticator.authenticate(authorization)
                except Unauthenticated as error:
                    call.auth_error = error
                else:
                    call.principal = principal
                    audit.set_actor(principal.user_id, principal.api_key_id)
            return await handler(request, call)

        return handle


class ShareResolver(Protocol):
    """Finds the caller's share of a resource someone else owns."""

    async def share_role(self, resource: str, user_id: str) -> ShareRole:
        """The unexpired share role of ``user_id`` on ``resource`` (NONE if none)."""
        ...


class AuthorizeStage:
    """Enforces the method's rule with the caller and the owner of the named resource.

    ``require_tls`` methods are refused over plain HTTP when ``tls_required`` (production
    mode): they carry passwords or tokens, or return secrets.
    """

    def __init__(self, *, tls_required: bool = False, shares: ShareResolver | None = None) -> None:
        self._tls_required = tls_required
        self._shares = shares

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        rule = method.policy.rule
        owner_path = rule.owner_field.split(".") if rule.owner_field else []
        needs_tls = self._tls_required and method.policy.require_tls
        shares = self._shares

        async def handle(request: Message, call: Call) -> Message:
            if needs_tls and call.transport == "http" and not call.secure:
                raise PermissionDenied(
                    "this method is only served over HTTPS", reason="TLS_REQUIRED"
                )
            if call.auth_error is not None:
                raise call.auth_error
            principal = call.principal
            owner = None
            share = ShareRole.NONE
            if principal is not None and owner_path:
                resource = field_value(request, owner_path)
                owner = owner_of(resource, principal.user_id)
                if owner is None:
                    raise InvalidArgument.single(rule.owner_field, "must name a user's resource")
                if shares is not None and needs_share_lookup(rule, principal, owner):
                    share = await shares.share_role(resource, principal.user_id)
            authorize(rule, principal, owner, share)
            return await handler(request, call)

        return handle
