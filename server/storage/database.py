"""Engines (primary and optional read replica, routed by ``server.storage.replica``) and
the unit of work.

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
import re
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
from server.domain.common.errors import DatabaseUnavailable
from server.storage import sqlite_inline
from server.storage.analytics import SqlOutcomeRepository
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
from server.storage.replica import ReplicaMetrics, ReplicaRouter
from server.storage.sealing import Sealer
from server.storage.tunnels.agents import SqlAgentRepository
from server.storage.tunnels.sharing import SqlShareRepository
from server.storage.tunnels.tunnels import SqlTunnelRepository
from server.storage.webhooks.webhooks import SqlWebhookRepository

log = logging.getLogger("tunnelplane.db")
CONNECT_TIMEOUT = 5.0


def normalize_url(url: str) -> str:
    """Pick the async driver: ``postgresql://`` -> psycopg, ``sqlite://`` -> aiosqlite.

    A libpq multi-host URL (``postgresql://user@h1:5432,h2:5432/db?target_session_attrs=
    read-write``) becomes SQLAlchemy's spelling of it (``...@/db?host=h1:5432&host=h2:5432
    &...``): libpq then tries the hosts in order and keeps the first that matches
    ``target_session_attrs``, which is how a failover reaches the promoted replica."""
    for plain, driver in (
        ("postgresql://", "postgresql+psycopg://"),
        ("postgres://", "postgresql+psycopg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            url = driver + url[len(plain) :]
            break
    match = _MULTI_HOST.match(url)
    if match is None:
        return url
    scheme, user, hosts, path, query = match.groups()
    listed = "&".join(f"host={host}" for host in hosts.split(",") if host)
    rest = f"&{query[1:]}" if query else ""
    return f"{scheme}{user or ''}{path or '/'}?{listed}{rest}"


_MULTI_HOST = re.compile(r"^(postgresql\+psycopg://)([^@/?]*@)?([^/?@]*,[^/?@]*)(/[^?]*)?(\?.*)?$")


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
        replica_max_lag: float = 5.0,
        probe_interval: float = 5.0,
        pool_size: int = 10,
        statement_timeout: float = 10.0,
        clock: Clock,
        sealer: Sealer | None = None,
        metrics: DatabaseMetrics | None = None,
        replica_metrics: ReplicaMetrics | None = None,
    ) -> None:
        #: Seals secrets at rest. Without one (tools, tests) a key of this process alone
        #: seals: what it writes, only it can read.
        self.sealer = sealer or Sealer([os.urandom(32)])
        self.engine = make_engine(url, pool_size=pool_size, statement_timeout=statement_timeout)
        #: Where lag-tolerant reads go (``None``: no replica, every unit on the primary).
        self.router = (
            ReplicaRouter(
                self.engine,
                make_engine(replica_url, pool_size=pool_size, statement_timeout=statement_timeout),
                max_lag=replica_max_lag,
                probe_interval=probe_interval,
                metrics=replica_metrics,
            )
            if replica_url
            else None
        )
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._clock = clock
        self._waits: dict[bool, Any] = {}
        if metrics is not None:
            metrics.attach(self.engine, "primary")
            self._waits[True] = self._waits[False] = metrics.wait.labels("primary")
            if self.router is not None:
                metrics.attach(self.router.replica, "replica")
                self._waits[False] = metrics.wait.labels("replica")
        # SQLite runs on the loop thread and allows one writer: writers queue here.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @property
    def replica(self) -> AsyncEngine:
        """The read replica's engine (the primary's when there is none)."""
        return self.router.replica if self.router is not None else self.engine

    def __call__(self, *, readonly: bool = False, lag_tolerant: bool = False) -> SqlUnitOfWork:
        """A unit of work. Read-only ones run on the primary, in a transaction that writes
        nothing; ``lag_tolerant`` ones on the replica while the router allows it."""
        router = self.router
        if lag_tolerant and router is not None:
            engine, on_replica = router.engine_for_read()
            return SqlUnitOfWork(
                engine,
                write=False,
                clock=self._clock,
                sealer=self.sealer,
                wait=self._waits.get(not on_replica),
                fallback=(self.engine, router.connect_failed) if on_replica else None,
            )
        if readonly or lag_tolerant:
            return SqlUnitOfWork(
                self.engine,
                write=False,
                clock=self._clock,
                sealer=self.sealer,
                wait=self._waits.get(True),
            )
        return SqlUnitOfWork(
            self.engine,
            write=True,
            clock=self._clock,
            write_lock=self._write_lock,
            sealer=self.sealer,
            wait=self._waits.get(True),
            committed=router.wrote if router is not None else None,
        )

    async def ping(self) -> None:
        """Raise unless the primary answers ``SELECT 1`` within the connect timeout."""
        async with asyncio.timeout(CONNECT_TIMEOUT), self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
        if self.router is not None:
            await self.router.replica.dispose()


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
    call_outcomes: SqlOutcomeRepository

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        write: bool,
        clock: Clock,
        write_lock: asyncio.Lock | None = None,
        sealer: Sealer,
        wait: Any = None,
        fallback: tuple[AsyncEngine, Callable[[], None]] | None = None,
        committed: Callable[[], None] | None = None,
    ) -> None:
        self._sealer = sealer
        #: Where to go, and whom to tell, when ``engine`` (a replica) cannot be reached.
        self._fallback = fallback
        #: Told after a write unit committed (read-your-writes on a replica).
        self._committed = committed
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
        try:
            conn = await self._open(self._engine)
        except _UNAVAILABLE as exc:
            if self._fallback is None:
                self._release()
                raise DatabaseUnavailable("the database is unavailable", retry_after=1.0) from exc
            primary, tell = self._fallback
            tell()  # the replica went away: this read, and the next ones, go to the primary
            try:
                conn = await self._open(primary)
            except _UNAVAILABLE as again:
                raise DatabaseUnavailable("the database is unavailable", retry_after=1.0) from again
        except BaseException:
            self._release()
            raise
        self._conn = conn
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
        self.call_outcomes = SqlOutcomeRepository(conn)
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
            raise DatabaseUnavailable("the database is unavailable", retry_after=1.0) from failure
        finally:
            try:
                await conn.close()
            finally:
                self._release()
        if isinstance(exc, _UNAVAILABLE):
            raise DatabaseUnavailable("the database is unavailable", retry_after=1.0) from exc
        if exc is None:
            if self._write and self._committed is not None:
                self._committed()
            await self._run_callbacks()

    async def _open(self, engine: AsyncEngine) -> AsyncConnection:
        """A connection of ``engine`` in a begun transaction."""
        started = time.perf_counter()
        conn = await engine.connect()
        if self._wait is not None:
            self._wait.observe(time.perf_counter() - started)
        try:
            if self._write:
                await conn.execution_options(tp_write=True)
            await conn.begin()
        except BaseException:
            await conn.close()
            raise
        return conn

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
