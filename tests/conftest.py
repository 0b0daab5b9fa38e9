"""Shared fixtures: real backends (SQLite, PostgreSQL + Redis), an in-process server on
port 0, and gRPC clients.

Every test that touches storage runs once per backend. The PostgreSQL/Redis leg runs
whenever both are reachable; with ``CI=true`` an unreachable one fails the run instead
of skipping it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
import psycopg
import pytest
import pytest_asyncio
import redis

from server.app import App
from server.domain.common.clock import Clock
from server.domain.identity.tokens import generate_private_key_pem
from server.settings import Settings
from server.storage.database import make_engine
from server.storage.migrate import upgrade
from server.storage.sealing import new_key
from tests.helpers import Client

CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_ADMIN_URL = os.environ.get(
    "TP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
#: Every Redis key this test run writes starts with this; the run deletes them at its end.
REDIS_RUN_PREFIX = f"tptest:{uuid.uuid4().hex[:10]}:"
#: Cheap Argon2 parameters so that registering hundreds of test users stays fast.
FAST_HASHING = {"argon2_time_cost": 1, "argon2_memory_kib": 1024, "argon2_parallelism": 1}


def reachable(url: str, default_port: int) -> bool:
    """Whether a TCP connection to the URL's host and port succeeds."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def require(service: str, available: bool) -> None:
    """Skip without ``service``, or fail when CI demands it."""
    if available:
        return
    if CI:
        pytest.fail(f"{service} is required when CI=true but is not reachable", pytrace=False)
    pytest.skip(f"{service} is not reachable")


def require_postgres() -> None:
    """Skip (or fail on CI) without PostgreSQL."""
    require("PostgreSQL", reachable(POSTGRES_ADMIN_URL, 5432))


def require_redis() -> None:
    """Skip (or fail on CI) without Redis."""
    require("Redis", reachable(REDIS_URL, 6379))


def redis_prefix() -> str:
    """A Redis key prefix of its own, inside this run's (so the run's end removes it)."""
    return f"{REDIS_RUN_PREFIX}{uuid.uuid4().hex[:8]}:"


def delete_run_keys(url: str = REDIS_URL) -> int:
    """Delete every key this run wrote; the number deleted."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{REDIS_RUN_PREFIX}*", count=1000):
            batch.append(key)
            if len(batch) == 500:
                deleted += client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += client.unlink(*batch)
        return deleted
    finally:
        client.close()


@pytest.fixture(scope="session", autouse=True)
def _redis_keys_removed() -> Iterator[None]:
    """Tests clean up what they create: quota counters live for weeks, so a run that left
    its keys would fill a shared Redis run after run."""
    yield
    if reachable(REDIS_URL, 6379):
        delete_run_keys()


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings for an in-process test server."""
    values: dict[str, object] = {
        "grpc_port": 0,
        "http_port": 0,
        "metrics_port": -1,
        "data_dir": data_dir,
        "log_level": "WARNING",
        "login_ip_lock_after": 100_000,
        # Every test client is on loopback: exempt it, so that shared test servers do not
        # refuse each other's calls. Exempt calls are still counted by the limiter, just
        # never refused; the rate-limit tests turn this off.
        "rate_exempt_ips": "127.0.0.0/8,::1",
        "health_interval": 0.2,
        "proxy_port": 0,  # no embedded proxy child: the proxy tests start their own
        "proxy_provisioner": "off",  # no fleet loop: the fleet tests turn it on
        # Keys in this run's namespace, never the default one (the run deletes them).
        "redis_prefix": redis_prefix(),
        **FAST_HASHING,
    }
    values.update(overrides)
    settings = Settings(**values)  # type: ignore[arg-type]
    settings.validate()
    return settings


@dataclass(frozen=True)
class Backend:
    """Where a test server keeps its state."""

    name: str
    database_url: str
    redis_url: str = ""
    redis_prefix: str = "tp:"

    def settings(self, data_dir: Path, **overrides: object) -> Settings:
        """Settings pointing at this backend."""
        values: dict[str, object] = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "redis_prefix": self.redis_prefix,
        }
        values.update(overrides)
        return make_settings(data_dir, **values)


def create_postgres_database() -> str:
    """A fresh, empty database; returns its URL."""
    name = f"tp_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_postgres_database(url: str) -> None:
    """Drop a database made by :func:`create_postgres_database`."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def migrate(url: str) -> None:
    """Bring a database to the latest migration."""
    engine = make_engine(url, pool_size=1, statement_timeout=60)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def own_database(backend: Backend, directory: Path) -> AsyncIterator[Backend]:
    """The same kind of backend with a database of its own (migrated), for a server whose
    background workers must not meet the shared server's (they claim the same rows)."""
    if backend.name == "sqlite":
        isolated = replace(backend, database_url=f"sqlite+aiosqlite:///{directory / 'own.db'}")
        await migrate(isolated.database_url)
        yield isolated
        return
    url = create_postgres_database()
    try:
        await migrate(url)
        yield replace(backend, database_url=url)
    finally:
        drop_postgres_database(url)


@contextlib.asynccontextmanager
async def started(settings: Settings, clock: Clock | None = None) -> AsyncIterator[App]:
    """A server started with ``settings`` (and ``clock``), stopped when the block ends."""
    server = App(settings, clock=clock)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0)


@contextlib.asynccontextmanager
async def own_server(
    backend: Backend, directory: Path, clock: Clock | None = None, **overrides: object
) -> AsyncIterator[App]:
    """A started server with ``overrides`` on a database of its own (see
    :func:`own_database`): a module's server whose workers must not meet the shared one's."""
    async with (
        own_database(backend, directory) as isolated,
        started(isolated.settings(directory, **overrides), clock) as server,
    ):
        yield server


@contextlib.asynccontextmanager
async def sqlite_server(directory: Path, **overrides: object) -> AsyncIterator[App]:
    """A started server with ``overrides`` on a migrated SQLite database in ``directory``."""
    url = f"sqlite+aiosqlite:///{directory / 'db.sqlite'}"
    await migrate(url)
    async with started(make_settings(directory, database_url=url, **overrides)) as server:
        yield server


def production(directory: Path, **overrides: object) -> contextlib.AbstractAsyncContextManager[App]:
    """:func:`sqlite_server` in production mode, with the keys and secrets it demands."""
    return sqlite_server(
        directory,
        mode="production",
        jwt_private_key=generate_private_key_pem().decode(),
        page_token_secret="s" * 40,
        secrets_key=new_key(),
        **overrides,
    )


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """One migrated-later PostgreSQL database for the session."""
    require_postgres()
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest_asyncio.fixture(scope="session", params=["sqlite", "postgres"])
async def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    """SQLite with in-process state, or PostgreSQL with Redis; migrated."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "tunnelplane.db"
        chosen = Backend("sqlite", f"sqlite+aiosqlite:///{path}")
    else:
        require_redis()
        url = request.getfixturevalue("postgres_database")
        chosen = Backend("postgres", url, REDIS_URL, redis_prefix())
    await migrate(chosen.database_url)
    yield chosen


@pytest_asyncio.fixture(scope="session")
async def app(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    """A started server on port 0, shared by the tests of one backend."""
    async with started(backend.settings(tmp_path_factory.mktemp("data"))) as server:
        yield server


@pytest_asyncio.fixture(scope="session")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the shared server."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        yield ch


@pytest.fixture
def client(app: App, channel: grpc.aio.Channel) -> Client:
    """Stubs plus helpers to make users, against the shared server."""
    return Client(app, channel)


@pytest_asyncio.fixture(scope="session")
async def http(app: App) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the shared server's embedded gateway."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
        yield client
