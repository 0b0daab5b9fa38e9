"""Command line: ``python -m server serve [--workers N] | migrate | create-admin``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

from server import backup, logs
from server.app import App
from server.domain.audit.model import AuditTrail, RequestContext
from server.domain.common.errors import DomainError, NotFound
from server.domain.identity.model import Role
from server.process_group import (
    SupervisorLink,
    check_shared_backends,
    pin_to_cpu,
    supervise,
    worker_cpu,
)
from server.runtime import tune_gc
from server.settings import Settings, SettingsError
from server.storage.database import make_engine
from server.storage.migrate import upgrade

log = logging.getLogger("tunnelplane.server")


async def serve(settings: Settings, supervisor: SupervisorLink | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain gracefully and return 0. A worker of a group
    (``supervisor``) also says when it serves, and stops when its supervisor is gone."""
    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if supervisor is not None:
        supervisor.on_gone(stop.set)
    try:
        await app.start()
    except BaseException:
        await app.stop(grace=0)
        raise
    tune_gc()
    if supervisor is not None:
        await supervisor.serving(app.metrics_port)
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace})
    await app.stop()
    log.info("stopped")
    return 0


async def migrate(settings: Settings) -> int:
    """Apply every pending migration."""
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url, pool_size=1, statement_timeout=600)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    log.info("database is at the latest migration")
    return 0


async def create_admin(settings: Settings, email: str, password: str | None) -> int:
    """Create a super_admin, or promote an existing user to super_admin."""
    app = App(settings)
    trail = AuditTrail(RequestContext("cli/create-admin", "users.create_admin", ip_address="local"))
    try:
        try:
            user = await app.identity.users.promote(email, Role.SUPER_ADMIN, trail)
            print(f"{user.name} ({user.email}) is now super_admin; password unchanged")
        except NotFound:
            chosen = password or secrets.token_urlsafe(18)
            user = await app.identity.accounts.register(
                email, chosen, "", role=Role.SUPER_ADMIN, trail=trail
            )
            print(f"created {user.name} ({user.email}) as super_admin")
            if password is None:
                print(f"password (shown once): {chosen}")
    except DomainError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        await app.close()
    return 0


def run_serve(settings: Settings, worker_index: int | None, control_fd: int | None) -> int:
    """``serve``: one server process, the supervisor of ``settings.workers``, or one of
    its workers (``worker_index``, started by the supervisor)."""
    if worker_index is not None and control_fd is not None:
        logs.configure(
            settings.log_level, settings.log_format, {"worker": worker_index, "pid": os.getpid()}
        )
        if settings.worker_cpu_affinity == "auto":
            cpu = worker_cpu(worker_index, os.sched_getaffinity(0))
            pin_to_cpu(cpu)
            logging.getLogger("tunnelplane").info("pinned to a CPU", extra={"cpu": cpu})
        return asyncio.run(serve(settings, SupervisorLink(control_fd)))
    if settings.workers > 1:
        logs.configure(
            settings.log_level, settings.log_format, {"supervisor": True, "pid": os.getpid()}
        )
        return asyncio.run(supervise(settings))
    logs.configure(settings.log_level, settings.log_format)
    return asyncio.run(serve(settings))


def run_backup(settings: Settings, args: argparse.Namespace) -> int:
    """``backup``, ``restore`` or ``verify``: one line on stdout when done, the reason on
    stderr (exit 1) when not."""
    url = settings.effective_database_url
    try:
        if args.command == "backup":
            directory = args.to or settings.backup_directory
            made = backup.backup(url, directory, args.keep or settings.backup_keep)
            print(f"backed up: {backup.describe(made)} in {directory}")
        elif args.command == "restore":
            restored = backup.restore(args.backup, url)
            print(f"restored: {backup.describe(restored)}")
        else:
            counts = backup.verify(args.backup, url)
            print(f"verified: {sum(counts.values())} rows in {len(counts)} tables match")
    except backup.BackupError as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return 1
    return 0


def serve_settings(workers: int | None) -> Settings:
    """The settings of ``serve``: ``--workers`` over ``TP_WORKERS``, checked for the shared
    backends that more than one worker needs."""
    settings = Settings.from_env()
    if workers is not None:
        settings = dataclasses.replace(settings, workers=workers)
        settings.validate()
    check_shared_backends(settings)
    return settings


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run a command."""
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve", help="run the gRPC server")
    serving.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the gRPC and HTTP ports (default: TP_WORKERS, 1)",
    )
    # Set by the supervisor of a group for each of its workers, never by hand.
    serving.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serving.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    commands.add_parser("migrate", help="apply database migrations")
    backing = commands.add_parser("backup", help="back the database up (see server/backup.py)")
    backing.add_argument("--to", type=Path, help="directory (default: TP_BACKUP_DIR)")
    backing.add_argument("--keep", type=int, help="backups kept (default: TP_BACKUP_KEEP)")
    for name, what in (
        ("restore", "restore a backup into the database (stop the server)"),
        ("verify", "restore a backup into a scratch database and check it"),
    ):
        command = commands.add_parser(name, help=what)
        command.add_argument("backup", type=Path, help="the backup file or its manifest")
    admin = commands.add_parser("create-admin", help="create or promote a super_admin")
    admin.add_argument("--email", required=True)
    admin.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    args = parser.parse_args(argv)
    if args.command == "serve" and (args.worker_index is None) != (args.control_fd is None):
        parser.error("--worker-index and --control-fd go together")
    try:
        settings = serve_settings(args.workers) if args.command == "serve" else Settings.from_env()
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return run_serve(settings, args.worker_index, args.control_fd)
    if args.command in ("backup", "restore", "verify"):
        return run_backup(settings, args)
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "migrate":
        return asyncio.run(migrate(settings))
    password = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("password (empty to generate one): ") or None
    return asyncio.run(create_admin(settings, args.email, password))


if __name__ == "__main__":
    sys.exit(main())
