"""PostgreSQL servers of a test's own: a primary made with ``initdb`` and a streaming
replica made with ``pg_basebackup -R``, on ports of their own, for the tests of replica
routing and failover (the shared server on 5432 cannot be stopped or promoted).

PostgreSQL refuses to run as root: as root, the servers run as the ``postgres`` user in a
directory it owns."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.conftest import require
from tests.helpers import free_port


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL server's binaries (Debian's layout), if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@dataclass
class Instance:
    """One PostgreSQL server of the test's."""

    data: Path
    port: int
    cluster: Cluster

    @property
    def url(self) -> str:
        """Its ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self.cluster.run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.data / "log"), "-w",
            "-o", f"-p {self.port} -k {self.cluster.root} -c listen_addresses=127.0.0.1",
            "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``mode``: ``fast`` (clean shutdown) or ``immediate`` (as if killed)."""
        self.cluster.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def promote(self) -> None:
        self.cluster.run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def execute(self, sql: str) -> object:
        """Run ``sql`` (autocommit) and return the first column of its first row, if any."""
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(sql)
            row = cursor.fetchone() if cursor.description else None
            return row[0] if row else None


class Cluster:
    """A primary and its streaming replica under one temporary directory."""

    def __init__(self, root: Path, binaries: Path) -> None:
        self.root = root
        self._bin = binaries
        self._user = "postgres" if os.geteuid() == 0 else ""
        self.primary = Instance(root / "primary", free_port(), self)
        self.replica = Instance(root / "replica", free_port(), self)

    def run(self, tool: str, *args: str) -> None:
        command = [str(self._bin / tool), *args]
        if self._user:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60, cwd=self.root)

    def create(self, *, synchronous: bool = False) -> None:
        """``synchronous``: the primary acknowledges a commit once the replica has it too
        (what a failover without losing acknowledged writes needs)."""
        self.run(
            "initdb", "-D", str(self.primary.data), "-U", "postgres", "-A", "trust",
            "--no-sync", "--no-instructions",
        )  # fmt: skip
        with (self.primary.data / "postgresql.conf").open("a") as conf:
            # Speed over durability (a test's throwaway data); replication as in production.
            conf.write("fsync = off\nfull_page_writes = off\n")
            conf.write("wal_level = replica\nmax_wal_senders = 4\nhot_standby = on\n")
            if synchronous:
                conf.write("synchronous_standby_names = '*'\nsynchronous_commit = on\n")
        self.primary.start()
        self.run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
            "-D", str(self.replica.data), "-R", "-X", "stream", "--no-sync",
        )  # fmt: skip
        if synchronous:  # promoted, it has no standby to wait for
            with (self.replica.data / "postgresql.conf").open("a") as conf:
                conf.write("synchronous_standby_names = ''\n")
        self.replica.start()

    def replayed(self) -> bool:
        """Whether the replica has replayed everything the primary has written."""
        written = self.primary.execute("SELECT pg_current_wal_lsn()::text")
        return bool(self.replica.execute(f"SELECT pg_last_wal_replay_lsn() >= '{written}'::pg_lsn"))

    def stop(self) -> None:
        for instance in (self.replica, self.primary):
            if (instance.data / "postmaster.pid").exists():
                with contextlib.suppress(subprocess.CalledProcessError):
                    instance.stop("immediate")


@contextlib.contextmanager
def primary_and_replica(*, synchronous: bool = False) -> Iterator[Cluster]:
    """A running primary and streaming replica, removed afterwards (``synchronous``: see
    :meth:`Cluster.create`)."""
    binaries = bin_dir()
    require("the PostgreSQL server binaries (initdb, pg_basebackup)", binaries is not None)
    assert binaries is not None
    root = Path(tempfile.mkdtemp(prefix="tp-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    root.chmod(0o700)
    cluster = Cluster(root, binaries)
    try:
        cluster.create(synchronous=synchronous)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
