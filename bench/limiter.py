"""The rate-limiter servers: their settings, the checks that the limiter really ran, and
the Redis keys they leave behind.

Three more full servers (``python -m bench.server --mode full``) on the same database and
keys as the others, with the same settings plus these:

- ``limiter_off``: ``TP_REDIS_URL`` set, ``TP_RATE_LIMIT_ENABLED=false``;
- ``limiter_redis``: the same, with the limiter on: every call is one limiter decision in
  Redis (one ``EVALSHA``, pipelined per event-loop turn);
- ``limiter_memory``: the limiter on, no Redis (the in-process limiter), for information.

The two Redis servers differ only in ``TP_RATE_LIMIT_ENABLED`` and in their key prefix.
The limits are so high that nothing is refused, but real: no exempt address or role
(``TP_RATE_EXEMPT_IPS`` empty, so the loopback caller is counted, not dry-run), and a
finite monthly request quota, so every call takes the same path as a free-tier user's call
(``-1``, unlimited, would skip the quota step, and with it the counter checked below).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import redis
from tunnelplane.v1 import users_pb2, users_pb2_grpc

from bench.errors import LoadError
from bench.probes import CALL_TIMEOUT, Caller

#: The servers this module sets up, in no particular order.
SERVERS = ("limiter_off", "limiter_redis", "limiter_memory")
#: Calls per minute and burst, per subject and per address: far above what one process serves.
HUGE = 1_000_000_000
#: The monthly request quota: finite, so that every call is counted, and out of reach.
MONTHLY = 1_000_000_000_000
#: ``--redis-url`` default: a redis-server the bench starts (:func:`private_redis`).
DEFAULT_REDIS_URL = "private"
LIMIT_TRAILER = "ratelimit-policy"
TIERS = ("free", "premium", "enterprise")


def limits() -> dict[str, str]:
    """Limits that refuse nothing, with nothing exempt."""
    settings = {
        "TP_IP_RATE_PER_MINUTE": str(HUGE),
        "TP_IP_BURST": str(HUGE),
        "TP_RATE_EXEMPT_IPS": "",
        "TP_RATE_EXEMPT_ROLES": "",
    }
    for tier in TIERS:
        name = f"TP_TIER_{tier.upper()}"
        settings |= {
            f"{name}_REQUESTS_PER_MINUTE": str(HUGE),
            f"{name}_BURST": str(HUGE),
            f"{name}_REQUESTS_PER_MONTH": str(MONTHLY),
        }
    return settings


@dataclass(frozen=True, slots=True)
class Setup:
    """Where the limiter servers keep their Redis state: one database, a prefix per run."""

    redis_url: str
    #: Unique to this run; each server adds its own name (``<run prefix><server>:``).
    run_prefix: str

    @classmethod
    def new(cls, redis_url: str) -> Setup:
        """A setup with a fresh prefix."""
        return cls(redis_url, f"tpbench-{secrets.token_hex(4)}:")

    def prefix(self, server: str) -> str:
        """The key prefix of one server."""
        return f"{self.run_prefix}{server}:"

    def settings(self, server: str) -> dict[str, str]:
        """The settings of ``server`` on top of the bench's."""
        enabled = server != "limiter_off"
        redis_settings = (
            {"TP_REDIS_URL": self.redis_url, "TP_REDIS_PREFIX": self.prefix(server)}
            if server != "limiter_memory"
            else {"TP_REDIS_URL": ""}
        )
        return limits() | redis_settings | {"TP_RATE_LIMIT_ENABLED": str(enabled).lower()}

    def all_settings(self) -> dict[str, dict[str, str]]:
        """Every limiter server's settings, for the report."""
        return {server: self.settings(server) for server in SERVERS}

    def client(self) -> redis.Redis:
        """A (synchronous) client of the bench's Redis database."""
        return redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=5)

    def require_redis(self) -> None:
        """Fail early, with a clear message, when Redis does not answer."""
        try:
            with self.client() as client:
                client.ping()
                taken = next(iter(client.scan_iter(match=f"{self.run_prefix}*", count=1000)), None)
        except (redis.RedisError, OSError) as exc:
            raise LoadError(
                f"Redis at {self.redis_url} does not answer ({exc}); the limiter_redis runs "
                "need it: start Redis or pass --redis-url"
            ) from exc
        if taken is not None:
            raise LoadError(f"Redis already holds {taken!r}; the prefix must be new")

    def keys(self, server: str | None = None) -> list[str]:
        """This run's keys (of one server, or all)."""
        prefix = self.run_prefix if server is None else self.prefix(server)
        with self.client() as client:
            return sorted(k.decode() for k in client.scan_iter(match=f"{prefix}*", count=1000))

    def quota_requests(self, server: str, user_id: str) -> int:
        """The user's monthly request counters of ``server`` (every month the run spanned)."""
        pattern = f"{self.prefix(server)}quota:requests:{user_id}:*"
        with self.client() as client:
            keys = list(client.scan_iter(match=pattern, count=1000))
            return sum(int(client.get(key) or 0) for key in keys)

    def clean_up(self) -> int:
        """Delete every key of this run; how many there were."""
        keys = self.keys()
        with self.client() as client:
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
        return len(keys)


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A ``redis-server`` of the bench's own on a spare port, in memory only; its URL.

    It is started by this process, so it runs on the load tools' CPU (pinned in
    ``run.main``), as Redis runs on a machine of its own in production: on a shared CPU its
    script runs would be counted against the server under test.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise LoadError("redis-server is not installed; pass --redis-url") from exc
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with redis.Redis.from_url(url, socket_timeout=1) as client:
                    client.ping()
                break
            except (redis.RedisError, OSError):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise LoadError(f"the bench's redis-server did not start on {port}") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def get_me_trailers(port: int, caller: Caller) -> tuple[users_pb2.User, dict[str, str]]:
    """One real GetUser call without a request id (as the limiter runs make them): the
    user and the trailing metadata."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        user, call = users_pb2_grpc.UserServiceStub(channel).GetUser.with_call(
            users_pb2.GetUserRequest(name="users/me"),
            metadata=caller.metadata,
            timeout=CALL_TIMEOUT,
        )
    trailers = {key: str(value) for key, value in call.trailing_metadata() or ()}
    return user, trailers


def check_trailers(server: str, trailers: Mapping[str, str]) -> None:
    """The limiter answered (with the bench's limit), or, when off, said nothing."""
    limit = trailers.get(LIMIT_TRAILER)
    if server == "limiter_off":
        if limit is not None:
            raise LoadError(f"{server} sent {LIMIT_TRAILER}: {limit}; its limiter is on")
    elif limit is None or f";q={HUGE};" not in limit:
        raise LoadError(f"{server}: {LIMIT_TRAILER} is {limit!r}, not {HUGE}: {dict(trailers)}")


def monthly_requests_used(port: int, caller: Caller) -> int:
    """The bench user's requests this month, as GetUsage reports them."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        usage = users_pb2_grpc.UserServiceStub(channel).GetUsage(
            users_pb2.GetUsageRequest(name="users/me/usage"),
            metadata=caller.metadata,
            timeout=CALL_TIMEOUT,
        )
    for quota in usage.quotas:
        if quota.metric == "requests":
            return int(quota.used)
    raise LoadError(f"GetUsage returned no requests quota: {usage}")


#: How long the leased counts of ``limiter_redis`` may take to reach Redis (a lease interval
#: and a margin).
COUNT_WITHIN = 5.0


def check_counts(
    setup: Setup, caller: Caller, calls: Mapping[str, int], memory_port: int
) -> dict[str, Any]:
    """After the load: every GetUser call to ``limiter_redis`` was counted in Redis (not
    dry-run, not decided in process), ``limiter_off`` decided nothing, and
    ``limiter_memory`` counted every call in process. ``calls`` are the GetUser calls sent
    to each server. Calls admitted from a leased slice reach Redis's counter within one
    lease interval (``TP_RATE_LEASE_TTL``, 1 s): the counter is read until it holds them
    all, for at most :data:`COUNT_WITHIN` seconds."""
    found: dict[str, Any] = {}
    deadline = time.monotonic() + COUNT_WITHIN
    while (counted := setup.quota_requests("limiter_redis", caller.user_id)) < calls[
        "limiter_redis"
    ] and time.monotonic() < deadline:
        time.sleep(0.1)
    if counted != calls["limiter_redis"]:
        raise LoadError(
            f"limiter_redis: the monthly request counter in Redis is {counted}, but "
            f"{calls['limiter_redis']} GetUser calls were sent: not every call was decided "
            "(and counted) in Redis"
        )
    # The GCRA keys themselves (rl:users/..., rl:ip:...) expire a few seconds after the last
    # call, which on a slow machine is before this check: the counter above is the proof.
    redis_keys = [
        k.removeprefix(setup.prefix("limiter_redis")) for k in setup.keys("limiter_redis")
    ]
    off_keys = [k.removeprefix(setup.prefix("limiter_off")) for k in setup.keys("limiter_off")]
    decided = [k for k in off_keys if k.startswith(("rl:", "quota:"))]
    if decided:
        raise LoadError(f"limiter_off left limiter keys in Redis: {decided}")
    # GetUsage may count itself (before it reads the counter) or be quota-free: a second
    # read tells which.
    used = monthly_requests_used(memory_port, caller)
    itself = monthly_requests_used(memory_port, caller) - used
    if itself not in {0, 1} or used - itself != calls["limiter_memory"]:
        raise LoadError(
            f"limiter_memory: GetUsage says {used} requests (counting itself: {itself}), "
            f"but {calls['limiter_memory']} GetUser calls were sent"
        )
    found["limiter_redis_quota_counter"] = counted
    found["limiter_redis_getuser_calls"] = calls["limiter_redis"]
    found["limiter_redis_keys"] = redis_keys
    found["limiter_off_keys"] = off_keys
    found["limiter_memory_getusage_requests"] = used
    found["limiter_memory_getusage_counts_itself"] = bool(itself)
    found["limiter_memory_getuser_calls"] = calls["limiter_memory"]
    return found
