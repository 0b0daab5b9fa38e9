"""Command line: ``python -m server serve | migrate | create-admin``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import secrets
import signal
import sys

from server import logs
from server.app import App
from server.domain.audit.model import AuditScope
from server.domain.audit.service import close_scope, open_scope
from server.domain.common.errors import DomainError, NotFound
from server.domain.identity.model import Role
from server.runtime import tune_gc
from server.settings import Settings, SettingsError
from server.storage.database import make_engine
from server.storage.migrate import upgrade

log = logging.getLogger("tunnelplane.server")


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then drain gracefully and return 0."""
    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except BaseException:
        await app.stop(grace=0)
        raise
    tune_gc()
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
    scope = AuditScope(method="cli/create-admin", action="users.create_admin", ip_address="local")
    token = open_scope(scope)
    try:
        try:
            user = await app.users.promote(email, Role.SUPER_ADMIN)
            print(f"{user.name} ({user.email}) is now super_admin; password unchanged")
        except NotFound:
            chosen = password or secrets.token_urlsafe(18)
            user = await app.accounts.register(email, chosen, "", role=Role.SUPER_ADMIN)
            print(f"created {user.name} ({user.email}) as super_admin")
            if password is None:
                print(f"password (shown once): {chosen}")
    except DomainError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        close_scope(token)
        await app.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run a command."""
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server")
    commands.add_parser("migrate", help="apply database migrations")
    admin = commands.add_parser("create-admin", help="create or promote a super_admin")
    admin.add_argument("--email", required=True)
    admin.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "serve":
        return asyncio.run(serve(settings))
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
