"""A browser's ``EventSource`` can watch for an hour.

It cannot send an ``Authorization`` header, so a cookie-delivery sign-in also sets the
access token in the ``tp_access`` cookie, which authenticates read-only streams and
nothing else. A stream lives as long as its session, not as long as the access token
that opened it: the timed re-check lets the token's ``exp`` pass but still ends the stream
on sign-out, on a revoked or ended session, on a deleted user, or at an API key's expiry.

The server's clock is a fake one moved by the tests, so an hour (four access-token
lifetimes) passes in a moment; the re-check timer is real and fast. The browser is an
httpx client with a real cookie jar over HTTPS (``Secure`` cookies go over TLS only).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import jwt
import pytest
import pytest_asyncio
import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from tunnelplane.v1 import auth_pb2, tunnels_pb2

from server.app import App
from server.domain.common.errors import Unauthenticated
from tests import devtools
from tests.certs import self_signed
from tests.conftest import Backend, own_server
from tests.helpers import (
    PASSWORD,
    Client,
    FakeClock,
    bearer,
    cookie_login,
    eventually,
    fails,
    reason,
    unique_email,
    watch_synced,
)

P = tunnels_pb2
Kind = P.WatchTunnelsResponse
RECHECK = 0.2
ACCESS_TTL = 900.0
HOUR = 3600.0
SESSION_TTL = 3 * HOUR
WATCH = "/v1/users/me/tunnels:watch"
SSE = {"accept": "text/event-stream"}
T = TypeVar("T")


@dataclass
class Server:
    """A TLS server on a fake clock, its certificate, and a gRPC client of it."""

    app: App
    clock: FakeClock
    cert: Path
    client: Client

    def browser(self) -> httpx.AsyncClient:
        """A fresh browser: an HTTPS client with an empty cookie jar."""
        trust = ssl.create_default_context(cafile=str(self.cert))
        return httpx.AsyncClient(
            base_url=f"https://localhost:{self.app.http_port}", verify=trust, timeout=10
        )

    def checks(self, outcome: str) -> float:
        """Timed stream credential checks so far with ``outcome``."""
        value = self.app.registry.get_sample_value(
            "tunnelplane_stream_credential_checks_total", {"outcome": outcome}
        )
        return value or 0.0


@pytest_asyncio.fixture(scope="module")
async def server(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    directory = tmp_path_factory.mktemp("cookie-watch")
    cert, key = self_signed(directory)
    clock = FakeClock()
    async with own_server(
        backend,
        directory,
        clock,
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        stream_recheck_interval=RECHECK,
        http_sse_keepalive=1.0,  # an idle SSE stream is never silent for long
        access_token_ttl=ACCESS_TTL,
        refresh_token_ttl=SESSION_TTL,
        refresh_token_idle_ttl=SESSION_TTL,
    ) as app:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{app.grpc_port}", credentials) as channel:
            yield Server(app, clock, cert, Client(app, channel))


async def sign_in(browser: httpx.AsyncClient) -> str:
    """Register and sign in with cookie delivery, as a web page does; the access token the
    page keeps in memory (the jar holds it too, out of the page's reach)."""
    login = await cookie_login(browser, "browser")
    access: str = login.json()["tokens"]["accessToken"]
    assert browser.cookies.get("tp_access") == access
    assert browser.cookies.get("tp_refresh")
    return access


async def refresh(browser: httpx.AsyncClient) -> str:
    """What a page does before its access token runs out: refresh by cookie."""
    refreshed = await browser.post("/v1/auth:refresh", json={})
    assert refreshed.status_code == 200, refreshed.text
    access: str = refreshed.json()["tokens"]["accessToken"]
    assert browser.cookies.get("tp_access") == access  # reconnections use the new one
    return access


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


class Events:
    """The Server-Sent Events of a response: ``(event type, data document)``."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next(self) -> tuple[str, dict[str, Any]]:
        event, data = "message", []
        async with asyncio.timeout(10):
            async for line in self._lines:
                if line.startswith(":"):
                    continue  # a keep-alive comment
                if not line:
                    if data:
                        return event, json.loads("\n".join(data))
                    continue
                field, _, value = line.partition(":")
                if field == "event":
                    event = value.strip()
                elif field == "data":
                    data.append(value.removeprefix(" "))
        raise EOFError("the stream ended")

    async def until(self, kind: str, display_name: str = "") -> dict[str, Any]:
        """The next result of ``kind`` (naming ``display_name``, if given)."""

        async def matching() -> dict[str, Any] | None:
            event, document = await self.next()
            assert event == "message", document
            result: dict[str, Any] = document["result"]
            tunnel = result.get("tunnel", {})
            wanted = result["kind"] == kind and display_name in {"", tunnel.get("displayName")}
            return result if wanted else None

        return await eventually(matching, within=10, every=0)  # each message within 10 s too

    async def error(self) -> dict[str, Any]:
        """The error that ends the stream (results before it are skipped)."""
        while True:
            event, document = await self.next()
            if event == "error":
                return document["error"]  # type: ignore[no-any-return]


async def some_checks_pass(server: Server, ticks: int = 2) -> None:
    """Wait until the stream re-check has run ``ticks`` more times, each accepting."""
    before = server.checks("valid")
    await eventually(lambda: server.checks("valid") >= before + ticks, within=10)


async def grpc_change(stream: Any, display_name: str) -> None:
    while True:
        message = await asyncio.wait_for(stream.read(), 10)
        assert message is not grpc.aio.EOF
        if message.kind == Kind.KIND_CHANGED and message.tunnel.display_name == display_name:
            return


async def ends_within(since: float, ending: Awaitable[T]) -> tuple[T, float]:
    """What ``ending`` gives, and the seconds from ``since`` (loop time) until it did."""
    async with asyncio.timeout(RECHECK + 5):
        result = await ending
    return result, asyncio.get_running_loop().time() - since


# --- an hour ------------------------------------------------------------------------------


async def test_a_cookie_watch_lives_for_an_hour_across_token_lifetimes_then_ends_at_logout(
    server: Server,
) -> None:
    async with server.browser() as browser:
        access = await sign_in(browser)
        made = await browser.post(
            "/v1/users/me/tunnels", json={"displayName": "start"}, headers=auth(access)
        )
        assert made.status_code == 200, made.text
        tunnel = made.json()["name"]
        # The same session's token over gRPC, in an authorization header, lives as long.
        over_grpc = server.client.tunnels.WatchTunnels(
            P.WatchTunnelsRequest(name="users/me"), metadata=bearer(access)
        )
        await watch_synced(over_grpc)
        async with browser.stream("GET", WATCH, headers=SSE) as response:  # the jar only
            assert response.status_code == 200, await response.aread()
            events = Events(response)
            assert (await events.until("KIND_CURRENT"))["tunnel"]["name"] == tunnel
            await events.until("KIND_SYNCED")

            for step in range(8):  # 8 x 7.5 minutes: four access-token lifetimes
                server.clock.advance(HOUR / 8)
                await some_checks_pass(server)
                access = await refresh(browser)
                name = f"step-{step}"
                patched = await browser.patch(
                    f"/v1/{tunnel}", json={"displayName": name}, headers=auth(access)
                )
                assert patched.status_code == 200, patched.text
                await events.until("KIND_CHANGED", name)
                await grpc_change(over_grpc, name)
            assert server.checks("refused") == 0

            loop = asyncio.get_running_loop()
            out = await browser.post("/v1/auth:logout", json={}, headers=auth(access))
            assert out.status_code == 200, out.text
            signed_out = loop.time()
            assert "tp_access" not in browser.cookies  # the page cannot reconnect
            error, ended_grpc = await ends_within(
                signed_out, fails(over_grpc.read(), grpc.StatusCode.UNAUTHENTICATED)
            )
            document, ended_http = await ends_within(signed_out, events.error())
    assert reason(error) == document["details"][0]["reason"] == "TOKEN_REVOKED"
    assert max(ended_http, ended_grpc) < RECHECK + 3.0


# --- the session bounds the stream ------------------------------------------------------


async def test_a_cookie_watch_ends_when_its_session_reaches_its_end(server: Server) -> None:
    async with server.browser() as browser:
        await sign_in(browser)
        async with browser.stream("GET", WATCH, headers=SSE) as response:
            events = Events(response)
            await events.until("KIND_SYNCED")
            server.clock.advance(SESSION_TTL - 60)
            await some_checks_pass(server)
            server.clock.advance(61)
            error = await events.error()
    assert error["code"] == 16
    assert error["details"][0]["reason"] == "SESSION_ENDED"


async def test_a_stream_past_its_tokens_expiry_ends_when_the_session_table_says_revoked(
    server: Server,
) -> None:
    """Revocation markers last only as long as the tokens they refuse; past a token's exp
    the session table decides, so a revocation whose marker is gone still ends the stream."""
    async with server.browser() as browser:
        access = await sign_in(browser)
        session_id = jwt.decode(access, options={"verify_signature": False})["sid"]
        async with browser.stream("GET", WATCH, headers=SSE) as response:
            events = Events(response)
            await events.until("KIND_SYNCED")
            server.clock.advance(ACCESS_TTL + 60)
            await some_checks_pass(server)
            async with server.app.db() as uow:  # revoked in the database only, no marker
                assert await uow.sessions.revoke_session(session_id, server.clock.now(), "test")
            error = await events.error()
    assert error["details"][0]["reason"] == "SESSION_ENDED"


async def test_a_watch_ends_when_its_user_is_deleted_after_the_token_expired(
    server: Server,
) -> None:
    async with server.browser() as browser:
        await sign_in(browser)
        async with browser.stream("GET", WATCH, headers=SSE) as response:
            events = Events(response)
            await events.until("KIND_SYNCED")
            server.clock.advance(ACCESS_TTL + 60)
            await some_checks_pass(server)
            access = await refresh(browser)
            deleted = await browser.delete("/v1/users/me", headers=auth(access))
            assert deleted.status_code == 200, deleted.text
            error = await events.error()
    assert error["code"] == 16


async def test_past_its_tokens_expiry_a_stream_reads_its_session_once_per_interval(
    server: Server,
) -> None:
    """A watch re-checks its credential at every event, and past the token's exp each check
    asks the session table: a session the table showed live is believed for the re-check
    interval, so a burst of events reads it about once. A sign-out still ends the stream at
    the next check (its marker is read every time)."""
    async with server.browser() as browser:
        access = await sign_in(browser)
        session_id = jwt.decode(access, options={"verify_signature": False})["sid"]
        server.clock.advance(ACCESS_TTL + 60)
        header = f"Bearer {access}"
        recheck = server.app.identity.authenticator.authenticate
        loop = asyncio.get_running_loop()
        with session_reads(server.app, session_id) as reads:
            started = loop.time()
            for _ in range(20):
                assert (await recheck(header, established=True)).session_id == session_id
            elapsed = loop.time() - started
        assert 1 <= len(reads) <= 1 + elapsed / RECHECK, (len(reads), elapsed)

        out = await browser.post("/v1/auth:logout", json={}, headers=auth(await refresh(browser)))
        assert out.status_code == 200, out.text
        with pytest.raises(Unauthenticated) as ended:
            await recheck(header, established=True)
    assert ended.value.reason == "TOKEN_REVOKED"


@contextlib.contextmanager
def session_reads(app: App, session_id: str) -> Iterator[list[str]]:
    """The statements that read the session ``session_id`` from its table while open."""
    engine = app.db.replica.sync_engine
    reads: list[str] = []

    def seen(*args: Any) -> None:
        statement, parameters = args[2], args[3]
        if "FROM sessions" in statement and session_id in str(parameters):
            reads.append(statement)

    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        yield reads
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)


async def test_an_api_key_stream_still_ends_at_the_keys_expiry(server: Server) -> None:
    owner = await server.client.new_user()
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(server.clock.now() + timedelta(minutes=30))
    created = await server.client.auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            parent=owner.name,
            api_key=auth_pb2.ApiKey(display_name="k", scopes=["tunnels.read"], expire_time=expire),
        ),
        metadata=owner.metadata,
    )
    stream = server.client.tunnels.WatchTunnels(
        P.WatchTunnelsRequest(name="users/me"), metadata=bearer(created.secret)
    )
    await watch_synced(stream)
    server.clock.advance(29 * 60)
    await some_checks_pass(server)
    server.clock.advance(2 * 60)
    async with asyncio.timeout(RECHECK + 5):
        error = await fails(stream.read(), grpc.StatusCode.UNAUTHENTICATED)
    assert reason(error) == "API_KEY_INVALID"


# --- the cookie authenticates watches and nothing else -----------------------------------


async def test_the_access_cookie_never_authenticates_another_call(server: Server) -> None:
    async with server.browser() as browser:
        access = await sign_in(browser)
        tries = [
            ("POST", "/v1/users/me/tunnels", {"displayName": "csrf"}),
            ("GET", "/v1/users/me", None),
            ("GET", "/v1/users/me/tunnels", None),
            ("POST", "/v1/auth:logout", {}),
        ]
        for method, path, body in tries:
            refused = await browser.request(method, path, json=body)
            assert refused.status_code == 401, refused.text
            assert refused.json()["details"][0]["reason"] == "CREDENTIALS_MISSING"
    cookie = (("cookie", f"tp_access={access}"),)
    error = await fails(
        server.client.tunnels.CreateTunnel(
            P.CreateTunnelRequest(parent="users/me", tunnel=P.Tunnel(display_name="csrf")),
            metadata=cookie,
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert reason(error) == "CREDENTIALS_MISSING"
    key = await server.client.api_key(await server.client.new_user(), ["tunnels.read"])
    in_cookie = await fails(
        watch_synced(
            server.client.tunnels.WatchTunnels(
                P.WatchTunnelsRequest(name="users/me"), metadata=(("cookie", f"tp_access={key}"),)
            )
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert reason(in_cookie) == "TOKEN_INVALID"  # the cookie holds access tokens only
    # A gRPC client may send the cookie too, and it counts the same: for the watch only.
    await watch_synced(
        server.client.tunnels.WatchTunnels(P.WatchTunnelsRequest(name="users/me"), metadata=cookie)
    )


async def test_an_authorization_header_wins_over_the_cookie(server: Server) -> None:
    async with server.browser() as browser:
        await sign_in(browser)
        refused = await browser.get(WATCH, headers={**SSE, "authorization": "Bearer not-a-jwt"})
        assert refused.status_code == 401
        assert refused.json()["details"][0]["reason"] == "TOKEN_INVALID"


async def test_a_new_watch_needs_a_cookie_that_has_not_expired(server: Server) -> None:
    """Only an established stream outlives its token: an EventSource reconnects with a
    fresh cookie, which the page keeps fresh by refreshing."""
    async with server.browser() as browser:
        await sign_in(browser)
        server.clock.advance(ACCESS_TTL + 60)  # the jar keeps it (real time): the server decides
        refused = await browser.get(WATCH, headers=SSE)
        assert refused.status_code == 401
        assert refused.json()["details"][0]["reason"] == "TOKEN_EXPIRED"
        await refresh(browser)
        async with browser.stream("GET", WATCH, headers=SSE) as response:
            assert response.status_code == 200
            await Events(response).until("KIND_SYNCED")


async def test_the_cookie_is_found_among_cookies_split_over_several_headers(
    server: Server,
) -> None:
    """HTTP/2 may send each cookie in a header of its own (RFC 9113 8.2.3)."""
    async with server.browser() as browser:
        access = await sign_in(browser)
    headers = [
        ("accept", SSE["accept"]),
        ("cookie", "theme=dark"),
        ("cookie", f"tp_access={access}"),
    ]
    async with (
        server.browser() as empty_jar,
        empty_jar.stream("GET", WATCH, headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        await Events(response).until("KIND_SYNCED")


# --- a real browser -----------------------------------------------------------------------

SIGN_IN = """(async () => {
  const call = (method, path, body, token) => fetch(path, {
    method,
    headers: {"content-type": "application/json",
              ...(token ? {authorization: `Bearer ${token}`} : {})},
    body: JSON.stringify(body),
  }).then(async r => ({status: r.status, body: await r.json()}));
  const post = (path, body, token) => call("POST", path, body, token);
  window.call = call;
  const account = {email: %s, password: %s};
  await post("/v1/auth:register", account);
  const login = await post(
    "/v1/auth:login", {...account, refreshTokenDelivery: "REFRESH_TOKEN_DELIVERY_COOKIE"});
  window.access = login.body.tokens.accessToken;
  const made = await post("/v1/users/me/tunnels", {displayName: "start"}, window.access);
  window.tunnel = made.body.name;
  window.received = [];
  window.failures = [];
  window.source = new EventSource("/v1/users/me/tunnels:watch");
  window.source.onmessage = e => window.received.push(JSON.parse(e.data).result);
  window.source.addEventListener("error", e => window.failures.push(
    {data: e.data ? JSON.parse(e.data).error : null, state: window.source.readyState}));
  return {login: login.status, made: made.status, scriptSees: document.cookie};
})()"""
REFRESH_AND_RENAME = """(async () => {
  const refreshed = await window.call("POST", "/v1/auth:refresh", {});
  window.access = refreshed.body.tokens.accessToken;
  const renamed = await window.call(
    "PATCH", `/v1/${window.tunnel}`, {displayName: %s}, window.access);
  return [refreshed.status, renamed.status];
})()"""
WAIT_FOR = """new Promise((resolve, reject) => {
  const until = Date.now() + 10000;
  const look = () => {
    const found = (%s);
    if (found) resolve(found);
    else if (Date.now() > until) reject(new Error("timed out: " + JSON.stringify(
      {received: window.received, failures: window.failures})));
    else setTimeout(look, 20);
  };
  look();
})"""


def changed_to(name: str) -> str:
    return WAIT_FOR % (
        "window.received.find(r => r.kind === 'KIND_CHANGED' && "
        f"r.tunnel.displayName === {json.dumps(name)})"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not devtools.available(),
    reason=f"needs Debian's Chromium at {devtools.CHROMIUM} (apt-get install chromium); "
    "CI images may not have it",
)
async def test_a_real_browsers_event_source_watches_for_an_hour(
    server: Server, tmp_path: Path
) -> None:
    """Headless Chromium: a page of the API's own origin signs in with cookie delivery and
    opens an ``EventSource`` (no headers: the cookie authenticates it). It keeps receiving
    changes for an hour of server time while the page refreshes its token, and after
    sign-out it ends and, its cookie gone, stays closed."""
    origin = f"https://localhost:{server.app.http_port}"
    trust = f"--ignore-certificate-errors-spki-list={devtools.spki_hash(server.cert)}"
    async with devtools.chromium(tmp_path / "profile", trust) as browser:
        page = await browser.open(f"{origin}/healthz")
        account = json.dumps(unique_email("chromium")), json.dumps(PASSWORD)
        started = await page.run(SIGN_IN % account)
        assert started == {"login": 200, "made": 200, "scriptSees": ""}  # HttpOnly cookies
        await page.run(WAIT_FOR % "window.received.find(r => r.kind === 'KIND_SYNCED')")

        for step in range(4):  # 4 x 15 minutes, each past the last token's lifetime
            server.clock.advance(ACCESS_TTL + 1)
            await some_checks_pass(server)
            name = f"browser-{step}"
            assert await page.run(REFRESH_AND_RENAME % json.dumps(name)) == [200, 200]
            await page.run(changed_to(name))
        assert await page.run("window.failures") == []  # never dropped, never reconnected

        out = await page.run('window.call("POST", "/v1/auth:logout", {}, window.access)')
        assert out["status"] == 200
        failures = await page.run(
            WAIT_FOR % "window.source.readyState === EventSource.CLOSED && window.failures"
        )
    assert failures[0]["data"]["code"] == 16  # the server ended the stream
    assert failures[-1] == {"data": None, "state": 2}  # reconnecting without a cookie: 401
