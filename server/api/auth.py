"""AuthService."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import empty_pb2
from tunnelplane.v1 import auth_pb2

from server.api import convert
from server.api.users import caller_id
from server.cookies import REFRESH_COOKIE, access_cookie, read_cookie, refresh_cookie
from server.domain.common.clock import Clock
from server.domain.common.names import api_key_parts, user_id_of
from server.domain.identity.accounts import AccountService
from server.domain.identity.api_keys import ApiKeyService
from server.domain.identity.model import SessionTokens
from server.domain.identity.tokens import TokenService
from server.pipeline import Call


class AuthApi:
    """Serves ``tunnelplane.v1.AuthService``."""

    def __init__(
        self, accounts: AccountService, keys: ApiKeyService, tokens: TokenService, clock: Clock
    ) -> None:
        self._accounts = accounts
        self._keys = keys
        self._tokens = tokens
        self._clock = clock

    async def Register(
        self, request: auth_pb2.RegisterRequest, call: Call
    ) -> auth_pb2.RegisterResponse:
        user = await self._accounts.register(
            request.email, request.password, request.display_name, trail=call.audit
        )
        return auth_pb2.RegisterResponse(user=convert.user(user))

    async def Login(self, request: auth_pb2.LoginRequest, call: Call) -> auth_pb2.LoginResponse:
        cookie = convert.cookie_delivery(request.refresh_token_delivery)
        user, tokens = await self._accounts.login(
            request.email, request.password, call.client, call.audit
        )
        return auth_pb2.LoginResponse(
            tokens=self._tokens_message(tokens, call, cookie=cookie), user=convert.user(user)
        )

    async def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest, call: Call
    ) -> auth_pb2.RefreshTokenResponse:
        secret = request.refresh_token
        from_cookie = not secret
        if from_cookie:
            secret = read_cookie(call, REFRESH_COOKIE)
        tokens = await self._accounts.refresh(secret, call.audit)
        return auth_pb2.RefreshTokenResponse(
            tokens=self._tokens_message(tokens, call, cookie=from_cookie)
        )

    async def Logout(self, request: auth_pb2.LogoutRequest, call: Call) -> empty_pb2.Empty:
        assert call.principal is not None
        await self._accounts.logout(
            call.principal, all_sessions=request.all_sessions, trail=call.audit
        )
        call.set_header("set-cookie", refresh_cookie("", 0))
        call.set_header("set-cookie", access_cookie("", 0))
        return empty_pb2.Empty()

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, call: Call
    ) -> auth_pb2.GetJwksResponse:
        call.set_header("cache-control", "public, max-age=300")
        return auth_pb2.GetJwksResponse(
            keys=[auth_pb2.JsonWebKey(**jwk) for jwk in self._tokens.jwks()]
        )

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, call: Call
    ) -> auth_pb2.CreateApiKeyResponse:
        owner = user_id_of(request.parent, "parent", caller_id(call))
        spec = request.api_key
        expire = (
            convert.from_timestamp(spec.expire_time, "api_key.expire_time")
            if spec.HasField("expire_time")
            else None
        )
        assert call.principal is not None  # the policy admits authenticated callers only
        created = await self._keys.create(
            call.principal,
            owner,
            spec.display_name,
            list(spec.scopes),
            expire,
            tunnel=spec.tunnel,
            trail=call.audit,
        )
        return auth_pb2.CreateApiKeyResponse(
            api_key=convert.api_key(created.key, self._now()), secret=created.secret
        )

    async def ListApiKeys(
        self, request: auth_pb2.ListApiKeysRequest, call: Call
    ) -> auth_pb2.ListApiKeysResponse:
        owner = user_id_of(request.parent, "parent", caller_id(call))
        page = await self._keys.list(
            owner,
            page_size=request.page_size,
            page_token=request.page_token,
            show_inactive=request.show_inactive,
        )
        now = self._now()
        return auth_pb2.ListApiKeysResponse(
            api_keys=[convert.api_key(k, now) for k in page.items],
            next_page_token=page.next_page_token,
        )

    async def GetApiKey(self, request: auth_pb2.GetApiKeyRequest, call: Call) -> auth_pb2.ApiKey:
        owner, key_id = api_key_parts(request.name, "name", caller_id(call))
        return convert.api_key(await self._keys.get(owner, key_id), self._now())

    async def RotateApiKey(
        self, request: auth_pb2.RotateApiKeyRequest, call: Call
    ) -> auth_pb2.RotateApiKeyResponse:
        owner, key_id = api_key_parts(request.name, "name", caller_id(call))
        overlap = (
            convert.from_duration(request.overlap, "overlap")
            if request.HasField("overlap")
            else None
        )
        assert call.principal is not None
        created, previous = await self._keys.rotate(
            call.principal, owner, key_id, overlap, call.audit
        )
        now = self._now()
        return auth_pb2.RotateApiKeyResponse(
            api_key=convert.api_key(created.key, now),
            secret=created.secret,
            previous=convert.api_key(previous, now),
        )

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, call: Call
    ) -> auth_pb2.ApiKey:
        owner, key_id = api_key_parts(request.name, "name", caller_id(call))
        revoked = await self._keys.revoke(owner, key_id, call.audit)
        return convert.api_key(revoked, self._now())

    def _now(self) -> datetime:
        return self._clock.now()

    def _tokens_message(
        self, tokens: SessionTokens, call: Call, *, cookie: bool
    ) -> auth_pb2.Tokens:
        refresh = tokens.refresh_token
        claims = tokens.access.claims
        if cookie:
            max_age = int((tokens.refresh_expire_time - self._now()).total_seconds())
            call.set_header("set-cookie", refresh_cookie(refresh, max_age))
            lifetime = int(claims.expires_at - self._clock.time())
            call.set_header("set-cookie", access_cookie(tokens.access.token, lifetime))
            refresh = ""
        return auth_pb2.Tokens(
            access_token=tokens.access.token,
            token_type="Bearer",  # noqa: S106 - the OAuth token type, not a secret
            expires_in=int(claims.expires_at - claims.issued_at),
            access_token_expire_time=convert.timestamp(
                datetime.fromtimestamp(claims.expires_at, tz=tokens.refresh_expire_time.tzinfo)
            ),
            refresh_token=refresh,
            refresh_token_expire_time=convert.timestamp(tokens.refresh_expire_time),
        )
