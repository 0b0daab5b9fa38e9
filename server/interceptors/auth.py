"""Authentication and authorization, driven by each method's declared policy.

The credential (if any) is verified first (:class:`AuthenticateStage`); rate limits then
count the call; then :func:`server.domain.identity.rules.authorize` decides with the method's
rule and the owner of the resource the request names (:class:`AuthorizeStage`). Every
check happens before the servicer runs, so a refused call has no side effect.

The credential is the ``authorization`` header when one is sent (a bad one is never
replaced by a cookie). Without it, and only on a method whose policy sets ``cookie_auth``
(a read-only stream), the access token may come from the ``tp_access`` cookie: a browser's
``EventSource`` cannot send headers. No other method reads that cookie, so a cookie the
browser attaches on its own can never drive a call that changes state (CSRF).
"""

from __future__ import annotations

from typing import Protocol

from google.protobuf.message import Message

from server.consistency import reader_var
from server.cookies import ACCESS_COOKIE, read_cookie
from server.domain.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from server.domain.common.names import owner_of
from server.domain.identity.authentication import Authenticator
from server.domain.identity.model import Principal, ShareRole
from server.domain.identity.rules import authorize, needs_share_lookup
from server.pipeline import Call, Handler, MethodInfo


def field_value(message: Message, path: list[str]) -> str:
    """The string at a dotted field path (empty when a message on the way is unset)."""
    value: object = message
    for part in path:
        value = getattr(value, part)
    return value if isinstance(value, str) else ""


class CallCredentials:
    """Verifies the credential a call presents, when it starts and while a stream runs."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def authenticate(self, call: Call, *, established: bool = False) -> Principal | None:
        """The caller (``None`` if the call presents no credential); :class:`Unauthenticated`
        if the credential does not verify. ``established``: see :meth:`recheck`."""
        authorization = call.header("authorization")
        if authorization:
            return await self._authenticator.authenticate(authorization, established=established)
        if call.method.policy.cookie_auth:
            token = read_cookie(call, ACCESS_COOKIE)
            if token:
                return await self._authenticator.authenticate_access_token(
                    token, established=established
                )
        return None

    async def recheck(self, call: Call) -> Principal:
        """Verify again the credential that opened a running stream: revocation, sign-out,
        the user's state and an API key's expiry end it; an access token's own expiry does
        not while its session lives (the stream is bound to the session)."""
        principal = await self.authenticate(call, established=True)
        if principal is None:
            raise Unauthenticated("this method needs credentials", reason="CREDENTIALS_MISSING")
        return principal


class AuthenticateStage:
    """Verifies the credential, if any, and sets ``call.principal``.

    A bad credential is kept on the call rather than raised, so that the rate-limit
    stage can count the call against its address before :class:`AuthorizeStage`
    refuses it: floods of bad tokens are limited like any other traffic.
    """

    def __init__(self, credentials: CallCredentials) -> None:
        self._credentials = credentials

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        credentials = self._credentials

        async def handle(request: Message, call: Call) -> Message:
            try:
                principal = await credentials.authenticate(call)
            except Unauthenticated as error:
                call.auth_error = error
            else:
                if principal is not None:
                    call.principal = principal
            # Whose reads these are (read-your-writes on a read replica), for this call
            # only: an embedded gateway serves several calls in one task.
            token = reader_var.set(call.principal.user_id if call.principal else "")
            try:
                return await handler(request, call)
            finally:
                reader_var.reset(token)

        return handle


class ShareResolver(Protocol):
    """Finds the caller's share of a resource someone else owns."""

    async def share_role(self, resource: str, user_id: str) -> ShareRole:
        """The unexpired share role of ``user_id`` on ``resource`` (NONE if none)."""
        ...


class AuthorizeStage:
    """Enforces the method's rule with the caller and the owner of the named resource.

    ``require_tls`` methods are refused when ``tls_required`` (production mode) and the
    call did not arrive over TLS, on either transport: they carry passwords or tokens, or
    return secrets. ``call.secure`` says how it arrived (HTTPS or a trusted
    ``X-Forwarded-Proto`` through the gateway; TLS on the gRPC port or a declared
    TLS-terminating proxy, ``TP_GRPC_TLS_PROXIES``).
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
            if needs_tls and not call.secure:
                raise PermissionDenied("this method is only served over TLS", reason="TLS_REQUIRED")
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
