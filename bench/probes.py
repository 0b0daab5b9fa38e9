"""Correctness around the load: the bench user, one real call to every server before it is
loaded, and the servers' own logs afterwards."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from tunnelplane.v1 import auth_pb2, auth_pb2_grpc, users_pb2, users_pb2_grpc

from bench.errors import LoadError
from bench.server import GET_USER, HTTP_GET_ME

CALL_TIMEOUT = 30.0
EMAIL = "bench@example.com"
#: The status of each request in uvicorn's access log.
_UVICORN_ACCESS = re.compile(rf'"GET {re.escape(HTTP_GET_ME)} HTTP/1\.1" (\d{{3}})')


@dataclass(frozen=True, slots=True)
class Caller:
    """The bench user and its access token."""

    user_id: str
    access_token: str

    @property
    def metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The call metadata that authenticates as this user."""
        return (("authorization", f"Bearer {self.access_token}"),)


def sign_up(port: int) -> Caller:
    """Register the bench user and log in, over gRPC, through the full pipeline."""
    password = secrets.token_urlsafe(18)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        registered = auth.Register(
            auth_pb2.RegisterRequest(email=EMAIL, password=password), timeout=CALL_TIMEOUT
        )
        login = auth.Login(
            auth_pb2.LoginRequest(email=EMAIL, password=password), timeout=CALL_TIMEOUT
        )
    user_id = registered.user.name.removeprefix("users/")
    return Caller(user_id, login.tokens.access_token)


def get_me(port: int, caller: Caller) -> users_pb2.User:
    """One real GetUser call; fails unless it returns the caller."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        user = users_pb2_grpc.UserServiceStub(channel).GetUser(
            users_pb2.GetUserRequest(name="users/me"),
            metadata=caller.metadata,
            timeout=CALL_TIMEOUT,
        )
    if user.name != f"users/{caller.user_id}":
        raise LoadError(f"GetUser on port {port} returned {user.name}, not the caller")
    return user


def http_get(port: int, token: str) -> tuple[int, bytes]:
    """``GET /v1/users/me`` with ``token`` over HTTP/1.1: the status and the body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT)
    try:
        connection.request("GET", HTTP_GET_ME, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def http_get_me(name: str, port: int, caller: Caller) -> dict[str, Any]:
    """One real ``GET /v1/users/me``; fails unless it is 200 with the caller as JSON, and
    unless the same request with a forged token is refused with 401."""
    status, body = http_get(port, caller.access_token)
    if status != 200:
        raise LoadError(f"{name}: GET {HTTP_GET_ME} answered {status}: {body[:300]!r}")
    document: dict[str, Any] = json.loads(body)
    wanted = {"name": f"users/{caller.user_id}", "email": EMAIL}
    got = {key: document.get(key) for key in wanted}
    if got != wanted:
        raise LoadError(f"{name}: GET {HTTP_GET_ME} returned {got}, not the caller {wanted}")
    forged, _ = http_get(port, forge(caller.access_token))
    if forged != 401:
        raise LoadError(f"{name}: a token with a forged signature got {forged}, not 401")
    return document


def forge(token: str) -> str:
    """The token with its signature replaced (same length, still base64url)."""
    head, payload, signature = token.split(".")
    return f"{head}.{payload}.{'A' * len(signature)}"


def _comparable(document: Mapping[str, Any]) -> dict[str, Any]:
    """Timestamps as instants: ``.5Z`` and ``.500000Z`` are the same time."""
    return {
        key: datetime.fromisoformat(value) if key.endswith("Time") else value
        for key, value in document.items()
    }


def check_same_user(documents: Mapping[str, dict[str, Any]], grpc_user: users_pb2.User) -> None:
    """Every HTTP server returned the same user, and it is the one gRPC returns."""
    first_name, first = next(iter(documents.items()))
    for name, document in documents.items():
        if _comparable(document) != _comparable(first):
            raise LoadError(f"{name} answers differently from {first_name}:\n{document}\n{first}")
    parsed = json_format.ParseDict(first, users_pb2.User())
    if parsed != grpc_user:
        raise LoadError(f"{first_name}'s JSON is not the User that gRPC returns:\n{first}")


@dataclass(frozen=True, slots=True)
class Expected:
    """How many successful calls a server must have logged.

    ``exact`` calls had a known count (gRPC calls from stubs and h2load). wrk runs for a
    time and counts only the responses it read before it stopped: ``at_least`` calls
    completed, and up to ``in_flight`` more may have been sent and answered after that.
    """

    exact: int = 0
    at_least: int = 0
    in_flight: int = 0

    def __add__(self, other: Expected) -> Expected:
        return Expected(
            self.exact + other.exact,
            self.at_least + other.at_least,
            self.in_flight + other.in_flight,
        )

    def admits(self, count: int) -> bool:
        """Whether ``count`` logged calls can be what was sent."""
        low = self.exact + self.at_least
        return low <= count <= low + self.in_flight


def access_log_codes(log_path: Path) -> dict[str, Counter[str]]:
    """Status codes of the GetUser lines in a full server's access log, by transport."""
    codes: dict[str, Counter[str]] = {"grpc": Counter(), "http": Counter()}
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if entry.get("logger") == "tunnelplane.access" and entry.get("method") == GET_USER:
                codes[entry["transport"]][entry["code"]] += 1
    return codes


def uvicorn_statuses(log_path: Path) -> Counter[str]:
    """Status codes of the ``GET /v1/users/me`` lines in uvicorn's access log."""
    return Counter(_UVICORN_ACCESS.findall(log_path.read_text()))


def check_codes(
    where: str, codes: Counter[str], ok: str, expected: Expected, refused: Mapping[str, int]
) -> None:
    """``codes`` hold ``expected`` successes (``ok``) and exactly the ``refused`` probes."""
    others = Counter({code: n for code, n in codes.items() if code != ok})
    if others != Counter(refused):
        raise LoadError(f"{where}: failed calls {dict(others)}, expected only {dict(refused)}")
    if not expected.admits(codes[ok]):
        raise LoadError(f"{where}: {codes[ok]} {ok} calls logged, expected {expected}")
