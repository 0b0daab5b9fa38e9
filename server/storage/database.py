"""Engines (primary and optional read replica) and the unit of work.

SQLite is the embedded default: WAL, foreign keys on, and write transactions opened
with ``BEGIN IMMEDIATE`` so that two writers queue instead of failing half-way with
"database is locked". Its file holds every credential hash and sealed secret, so it is
created readable by this user only (0600, in a 0700 directory when that is made too);
SQLite gives its ``-wal`` and ``-shm`` files the database file's mode. PostgreSQL runs
through psycopg 3 with a statement timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from server.domain.common.clock import Clock
from server.domain.common.errors import Unavailable
from server.storage import sqlite_inline
from server.storage.audit import SqlAuditRepository
from server.storage.dbmetrics import DatabaseMetrics
from server.storage.events import SqlEventRepository
from server.storage.identity.api_keys import SqlApiKeyRepository
from server.storage.identity.sessions import SqlSessionRepository
from server.storage.identity.users import SqlAvatarRepository, SqlUserRepository
from server.storage.limits.usage import SqlRequestUsageRepository
from server.storage.limits.violations import SqlViolationRepository
from server.storage.operations import SqlOperationRepository
from server.storage.proxies.proxies import SqlProxyRepository
from server.storage.sealing import Sealer
from server.storage.tunnels.agents import SqlAgentRepository
from server.storage.tunnels.sharing import SqlShareRepository
from server.storage.tunnels.tunnels import SqlTunnelRepository
from server.storage.webhooks.webhooks import SqlWebhookRepository

log = logging.getLogger("tunnelplane.db")
CONNECT_TIMEOUT = 5.0


def normalize_url(url: str) -> str:
    """Pick the async driver: ``postgresql://`` -> psycopg, ``sqlite://`` -> aiosqlite."""
    for plain, driver in (
        ("postgresql://", "postgresql+psycopg://"),
        ("postgres://", "postgresql+psycopg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def make_engine(
    url: str, *, pool_size: int, statement_timeout: float, sqlite_inline_driver: bool = True
) -> AsyncEngine:
    """An async engine configured for its backend."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database or ":memory:"
        if path != ":memory:" and not path.startswith("file:"):
            private_file(Path(path))
        driver: dict[str, Any] = (
            {"async_creator": sqlite_inline.creator(path)}
            if sqlite_inline_driver
            # Every unit of work ends its transaction itself: the pool's reset would be a
            # second ROLLBACK, and with aiosqlite a second hop to its thread.
            else {"connect_args": {"cached_statements": 256}, "pool_reset_on_return": None}
        )
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, **driver)
        _configure_sqlite(engine)
        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": int(CONNECT_TIMEOUT),
            "options": f"-c statement_timeout={int(statement_timeout * 1000)}",
            "application_name": "tunnelplane",
        },
    )


def private_file(path: Path) -> None:
    """Make sure the SQLite file ``path`` is this user's alone: create it 0600 (its
    directory 0700 if missing); take world access away from one that has it."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        _no_world_access(path)


def _no_world_access(path: Path) -> None:
    for existing in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            mode = stat.S_IMODE(existing.stat().st_mode)
            if mode & 0o007:
                existing.chmod(mode & ~0o007)
                log.warning("the database file was readable by every user; it no longer is")
        except FileNotFoundError:
            continue
        except PermissionError:
            log.warning("the database file is readable by every user; make it 0600")


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so that BEGIN is ours (see _begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "foreign_keys=ON",
            # Only another process (the CLI) can hold the lock; this process queues its
            # own writers on an asyncio lock, so a wait here is short and rare.
            "busy_timeout=2000",
            "synchronous=NORMAL",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # Writes take the write lock up front. Reads run without an explicit transaction:
        # each statement sees a consistent WAL snapshot, which is all a read path needs,
        # and it saves a statement per unit of work.
        if conn.get_execution_options().get("tp_write", False):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """The engines and the factory of units of work."""

    def __init__(
        self,
        url: str,
        *,
        replica_url: str = "",
        pool_size: int = 10,
        statement_timeout: float = 10.0,
        clock: Clock,
        sealer: Sealer | None = None,
        metrics: DatabaseMetrics | None = None,
    ) -> None:
        #: Seals secrets at rest. Without one (tools, tests) a key of this process alone
        #: seals: what it writes, only it can read.
        self.sealer = sealer or Sealer([os.urandom(32)])
        self.engine = make_engine(url, pool_size=pool_size, statement_timeout=statement_timeout)
        self.replica = (
            make_engine(replica_url, pool_size=pool_size, statement_timeout=statement_timeout)
            if replica_url
            else self.engine
        )
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._clock = clock
        self._waits: dict[bool, Any] = {}
        if metrics is not None:
            metrics.attach(self.engine, "primary")
            self._waits[True] = self._waits[False] = metrics.wait.labels("primary")
            if self.replica is not self.engine:
                metrics.attach(self.replica, "replica")
                self._waits[False] = metrics.wait.labels("replica")
        # SQLite runs on the loop thread and allows one writer: writers queue here.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    def __call__(self, *, readonly: bool = False) -> SqlUnitOfWork:
        """A unit of work; read-only ones go to the replica when there is one."""
        if readonly:
            return SqlUnitOfWork(
                self.replica,
                write=False,
                clock=self._clock,
                sealer=self.sealer,
                wait=self._waits.get(False),
            )
        return SqlUnitOfWork(
            self.engine,
            write=True,
            clock=self._clock,
            write_lock=self._write_lock,
            sealer=self.sealer,
            wait=self._waits.get(True),
        )

    async def ping(self) -> None:
        """Raise unless the primary answers ``SELECT 1`` within the connect timeout."""
        async with asyncio.timeout(CONNECT_TIMEOUT), self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
        if self.replica is not self.engine:
            await self.replica.dispose()


_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, OSError, TimeoutError)


class SqlUnitOfWork:
    """One transaction and its repositories. Commits on a clean exit, else rolls back."""

    users: SqlUserRepository
    avatars: SqlAvatarRepository
    sessions: SqlSessionRepository
    api_keys: SqlApiKeyRepository
    audit: SqlAuditRepository
    violations: SqlViolationRepository
    request_usage: SqlRequestUsageRepository
    tunnels: SqlTunnelRepository
    events: SqlEventRepository
    shares: SqlShareRepository
    agents: SqlAgentRepository
    webhooks: SqlWebhookRepository
    operations: SqlOperationRepository
    proxies: SqlProxyRepository

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        write: bool,
        clock: Clock,
        write_lock: asyncio.Lock | None = None,
        sealer: Sealer,
        wait: Any = None,
    ) -> None:
        self._sealer = sealer
        #: Observes how long the connection took to get (a histogram's child), if set.
        self._wait = wait
        self._engine = engine
        self._write = write
        self._clock = clock
        self._lock = write_lock
        self._conn: AsyncConnection | None = None
        self._callbacks: list[Callable[[], Awaitable[None]]] = []

    async def __aenter__(self) -> Self:
        if self._lock is not None:
            await self._lock.acquire()
        started = time.perf_counter()
        try:
            conn = await self._engine.connect()
        except _UNAVAILABLE as exc:
            self._release()
            raise Unavailable("the database is unavailable", retry_after=1.0) from exc
        except BaseException:
            self._release()
            raise
        if self._wait is not None:
            self._wait.observe(time.perf_counter() - started)
        self._conn = conn
        try:
            if self._write:
                await conn.execution_options(tp_write=True)
            await conn.begin()
        except BaseException as exc:
            await conn.close()
            self._release()
            if isinstance(exc, _UNAVAILABLE):
                raise Unavailable("the database is unavailable", retry_after=1.0) from exc
            raise
        self.users = SqlUserRepository(conn)
        self.avatars = SqlAvatarRepository(conn)
        self.sessions = SqlSessionRepository(conn)
        self.api_keys = SqlApiKeyRepository(conn)
        self.audit = SqlAuditRepository(conn)
        self.violations = SqlViolationRepository(conn)
        self.request_usage = SqlRequestUsageRepository(conn)
        self.tunnels = SqlTunnelRepository(conn)
        self.events = SqlEventRepository(conn)
        self.shares = SqlShareRepository(conn)
        self.agents = SqlAgentRepository(conn)
        self.webhooks = SqlWebhookRepository(conn, self._sealer)
        self.operations = SqlOperationRepository(conn)
        self.proxies = SqlProxyRepository(conn)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        assert conn is not None
        try:
            if exc is None and self._write:
                await conn.commit()
            else:
                await conn.rollback()
        except _UNAVAILABLE as failure:
            raise Unavailable("the database is unavailable", retry_after=1.0) from failure
        finally:
            try:
                await conn.close()
            finally:
                self._release()
        if isinstance(exc, _UNAVAILABLE):
            raise Unavailable("the database is unavailable", retry_after=1.0) from exc
        if exc is None:
            await self._run_callbacks()

    def _release(self) -> None:
        if self._lock is not None and self._lock.locked():
            self._lock.release()
            self._lock = None

    def after_commit(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` after a successful commit."""
        self._callbacks.append(callback)

    async def _run_callbacks(self) -> None:
        for callback in self._callbacks:
            try:
                await callback()
            except Exception:
                # The change is committed; a failed cache invalidation must not turn it into
                # an error. The cached entry expires on its own TTL.
                log.exception("after-commit callback failed")
