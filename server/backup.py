"""Backups: ``python -m server backup | restore | verify``.

``backup`` copies the database while the server runs: on SQLite with SQLite's online
backup API (a consistent copy, page by page), on PostgreSQL with ``pg_dump`` in its custom
format inside one exported snapshot, so that the row counts written beside it are those of
the dump. Each backup is a file and a manifest beside it (``<name>.json``): when, which
backend, size, SHA-256, the schema (Alembic) revision and every table's row count. The
newest ``--keep`` backups are kept (``TP_BACKUP_KEEP``), older ones deleted.

``restore`` checks the file against its manifest's checksum and refuses a backup whose
schema revision is not the code's (restore with the code of that revision, then migrate);
on SQLite it replaces the database file (stop the server first), on PostgreSQL it runs
``pg_restore --clean`` into the configured database.

``verify`` restores into a scratch database (a temporary file; a database created for the
purpose and dropped after) and compares every table's row count with the manifest.

The server reports the newest backup's time as ``tunnelplane_backup_last_success_timestamp_seconds``
(read from ``TP_BACKUP_DIR`` at scrape time), which the ``TunnelplaneBackupTooOld`` alert
watches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.script import ScriptDirectory
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.storage.database import normalize_url, private_file
from server.storage.migrate import alembic_config
from server.storage.tables import metadata

#: Table names counted in a manifest (Alembic's own is the revision).
TABLES = tuple(table.name for table in metadata.sorted_tables)
PG_TIMEOUT = 600


class BackupError(Exception):
    """A backup, restore or verification that cannot go on; the message says why."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What is known of one backup file, written beside it as JSON."""

    file: str
    created_at: str
    backend: str
    size: int
    sha256: str
    schema_revision: str
    rows: dict[str, int]

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """The manifest of backup ``path`` (the file, or its ``.json``)."""
        manifest = path if path.suffix == ".json" else path.with_name(path.name + ".json")
        if not manifest.exists():
            raise BackupError(f"{manifest}: no such manifest (a backup is a file and its .json)")
        try:
            data = json.loads(manifest.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise BackupError(f"{manifest}: not a backup manifest ({exc})") from None

    def write(self, directory: Path) -> Path:
        """Write the manifest beside its file; its path."""
        path = directory / f"{self.file}.json"
        private_file(path)  # created 0600 before anything is in it
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path


def head_revision() -> str:
    """The schema revision this code migrates to."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    return head or ""


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for another backend."""
    parsed = sa.engine.make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite":
        return None
    return Path(parsed.database or "")


def libpq_url(url: str) -> str:
    """A PostgreSQL URL as libpq and its tools take it (no SQLAlchemy driver part)."""
    parsed = sa.engine.make_url(normalize_url(url))
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- backup ---------------------------------------------------------------------------------


def backup(url: str, directory: Path, keep: int) -> Manifest:
    """Back the database at ``url`` up into ``directory``; then keep the newest ``keep``."""
    if keep < 1:
        raise BackupError("keep at least one backup")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    source = sqlite_path(url)
    name = f"tunnelplane-{stamp}.{'sqlite' if source is not None else 'pgdump'}"
    private_file(directory / name)  # created 0600 before anything is in it
    if source is not None:
        rows, revision = _backup_sqlite(source, directory / name)
        backend = "sqlite"
    else:
        rows, revision = _backup_postgres(url, directory / name)
        backend = "postgresql"
    target = directory / name
    manifest = Manifest(
        file=name,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        backend=backend,
        size=target.stat().st_size,
        sha256=sha256_of(target),
        schema_revision=revision,
        rows=rows,
    )
    manifest.write(directory)
    prune(directory, keep)
    return manifest


def _backup_sqlite(source: Path, target: Path) -> tuple[dict[str, int], str]:
    if not source.exists():
        raise BackupError(f"{source}: no such database file")
    with contextlib.closing(sqlite3.connect(source)) as live:
        with contextlib.closing(sqlite3.connect(target)) as copy:
            live.backup(copy)
        with contextlib.closing(sqlite3.connect(target)) as copy:
            return _sqlite_counts(copy), _sqlite_revision(copy)


def _sqlite_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in TABLES}  # noqa: S608 - our table names


def _sqlite_revision(conn: sqlite3.Connection) -> str:
    try:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error as exc:
        raise BackupError(f"not a migrated Tunnelplane database ({exc})") from None
    return str(row[0]) if row else ""


def _backup_postgres(url: str, target: Path) -> tuple[dict[str, int], str]:
    import psycopg

    dsn = libpq_url(url)
    with psycopg.connect(dsn) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert snapshot is not None
        rows = _pg_counts(conn)
        revision = _pg_revision(conn)
        # The dump reads the same snapshot while this transaction holds it open.
        _run(["pg_dump", "--format=custom", f"--snapshot={snapshot[0]}", f"--file={target}", dsn])
        conn.execute("COMMIT")
    return rows, revision


def _pg_counts(conn: Any) -> dict[str, int]:
    return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in TABLES}  # noqa: S608 - our table names


def _pg_revision(conn: Any) -> str:
    try:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except Exception as exc:  # noqa: BLE001 - any failure means "not migrated"
        raise BackupError(f"not a migrated Tunnelplane database ({exc})") from None
    return str(row[0]) if row else ""


def _run(command: list[str]) -> None:
    """Run a PostgreSQL tool; its own message (never the URL) if it fails."""
    try:
        result = subprocess.run(  # noqa: S603 - fixed tools, no shell
            command, capture_output=True, text=True, timeout=PG_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise BackupError(f"{command[0]} is not installed (PostgreSQL client tools)") from None
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1:] or ["failed"]
        raise BackupError(f"{command[0]}: {detail[0]}")


def backups(directory: Path) -> list[Manifest]:
    """The backups in ``directory`` with a readable manifest, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("tunnelplane-*.json"):
        with contextlib.suppress(BackupError):
            found.append(Manifest.read(path))
    return sorted(found, key=lambda m: (m.created_at, m.file))


def prune(directory: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` backups; the files deleted."""
    gone = []
    for old in backups(directory)[:-keep]:
        for path in (directory / old.file, directory / f"{old.file}.json"):
            path.unlink(missing_ok=True)
        gone.append(old.file)
    return gone


# -- restore and verify ---------------------------------------------------------------------


def checked(path: Path) -> Manifest:
    """The manifest of backup ``path``, once the file matches its size and checksum."""
    manifest = Manifest.read(path)
    file = path if path.suffix != ".json" else path.with_name(manifest.file)
    if not file.exists():
        raise BackupError(f"{file}: no such backup file")
    if file.stat().st_size != manifest.size or sha256_of(file) != manifest.sha256:
        raise BackupError(f"{file}: does not match its manifest's checksum (damaged?)")
    return manifest


def restore(path: Path, url: str) -> Manifest:
    """Restore backup ``path`` into the database at ``url``."""
    manifest = checked(path)
    file = path.with_name(manifest.file)
    head = head_revision()
    if manifest.schema_revision != head:
        raise BackupError(
            f"the backup's schema revision is {manifest.schema_revision}, this code's is "
            f"{head}: restore it with the code of that revision, then migrate"
        )
    target = sqlite_path(url)
    if (target is not None) != (manifest.backend == "sqlite"):
        raise BackupError(f"a {manifest.backend} backup cannot be restored into this database")
    if target is not None:
        _restore_sqlite(file, target)
    else:
        _run(["pg_restore", "--clean", "--if-exists", "--no-owner", "--single-transaction",
              f"--dbname={libpq_url(url)}", str(file)])  # fmt: skip
    return manifest


def _restore_sqlite(file: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.restoring")
    staging.unlink(missing_ok=True)
    private_file(staging)  # created 0600; the copy keeps the mode
    shutil.copyfile(file, staging)
    for suffix in ("-wal", "-shm"):  # the old database's journal must not be replayed
        target.with_name(target.name + suffix).unlink(missing_ok=True)
    staging.replace(target)


def verify(path: Path, url: str) -> dict[str, int]:
    """Restore backup ``path`` into a scratch database of ``url``'s backend and compare
    every table's rows with the manifest; the counts."""
    manifest = checked(path)
    file = path.with_name(manifest.file)
    with _scratch(manifest, file, url) as counts:
        found = counts
    if found != manifest.rows:
        differ = {t: (manifest.rows.get(t), found.get(t)) for t in set(found) | set(manifest.rows)}
        differ = {t: v for t, v in differ.items() if v[0] != v[1]}
        raise BackupError(f"row counts differ from the manifest (manifest, restored): {differ}")
    return found


@contextlib.contextmanager
def _scratch(manifest: Manifest, file: Path, url: str) -> Iterator[dict[str, int]]:
    if manifest.backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="tunnelplane-verify-") as directory:
            copy = Path(directory) / "verify.sqlite"
            shutil.copyfile(file, copy)
            with contextlib.closing(sqlite3.connect(copy)) as conn:
                yield _sqlite_counts(conn)
        return
    import psycopg

    if sqlite_path(url) is not None:
        raise BackupError("verifying a PostgreSQL backup needs TP_DATABASE_URL on PostgreSQL")
    admin = sa.engine.make_url(libpq_url(url))
    name = f"tp_verify_{secrets.token_hex(6)}"
    maintenance = admin.set(database="postgres").render_as_string(hide_password=False)
    scratch = admin.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        _run(["pg_restore", "--no-owner", "--single-transaction", f"--dbname={scratch}", str(file)])
        with psycopg.connect(scratch) as conn:
            yield _pg_counts(conn)
    finally:
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the server's view ----------------------------------------------------------------------


class BackupAge(Collector):
    """``tunnelplane_backup_last_success_timestamp_seconds``: the newest backup in the
    directory (absent when there is none), read at scrape time."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tunnelplane_backup_last_success_timestamp_seconds",
            "When the newest backup in TP_BACKUP_DIR was made (Unix time).",
        )
        newest = backups(self._directory)[-1:]
        for manifest in newest:
            family.add_metric([], datetime.fromisoformat(manifest.created_at).timestamp())
        yield family


def describe(manifest: Manifest) -> str:
    """One line about a backup, for the command line."""
    rows = sum(manifest.rows.values())
    return (
        f"{manifest.file}: {manifest.backend}, {manifest.size} bytes, {rows} rows in "
        f"{len(manifest.rows)} tables, schema {manifest.schema_revision}, "
        f"sha256 {manifest.sha256[:16]}…, made {manifest.created_at}"
    )
