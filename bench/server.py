"""One server under test, in a process of its own: ``python -m bench.server --mode MODE``.

``full`` is the real :class:`server.app.App`, as ``python -m server serve`` runs it: the
grpc.aio adapter, the embedded HTTP gateway, and every stage of the pipeline (request
context, access log, metrics, tracing, deadline, audit, auth, errors).

``bare`` is a plain ``grpc.aio`` server with the same server options and one generic
handler for GetUser. The handler calls the same servicer method,
:meth:`server.api.users.UserApi.GetUser`, built from the same :class:`~server.app.App`
(never started), with the caller preset on a minimal :class:`~server.pipeline.Call`: same
storage path, no adapter, no stages.

``gateway`` is the standalone gateway, ``python -m gateway`` (its own ``main``), in front
of ``--upstream``.

``fastapi`` is the baseline app of ``bench/fastapi_app.py`` under uvicorn, configured the
way ``uvicorn --workers 1 --http httptools --loop asyncio`` would run it.

Settings come from ``TP_*`` variables as for ``python -m server serve``. Once serving, the
process prints ``READY name=port ...`` on stdout (``grpc=`` and/or ``http=``), then sends
anything else it writes to stdout to its log (stderr); it stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from tunnelplane.v1 import users_pb2

from bench.fastapi_app import AppConfig, create_app
from gateway import __main__ as gateway_cli
from server import grpc_server, logs
from server.api.users import UserApi
from server.app import App
from server.domain.audit.search import AuditSearch
from server.domain.identity.model import CredentialKind, Principal
from server.domain.identity.rules import permissions_for
from server.pipeline import Call, MethodInfo
from server.process_group import pin_to_cpu
from server.runtime import tune_gc
from server.settings import Settings
from server.storage import database

SERVICE = "tunnelplane.v1.UserService"
GET_USER = f"/{SERVICE}/GetUser"
HTTP_GET_ME = "/v1/users/me"
ROOT = Path(__file__).resolve().parent.parent
DESCRIPTORS = ROOT / "generated" / "tunnelplane" / "descriptors.binpb"


def announce(**ports: int) -> None:
    """Tell the parent process where this server listens, then stop using the pipe.

    The parent reads only this line; whatever is written to stdout later (uvicorn's access
    log goes there) must not fill a pipe nobody reads, so stdout becomes the log.
    """
    print("READY " + " ".join(f"{name}={port}" for name, port in ports.items()), flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


async def until_stopped() -> None:
    """Return at the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_full(settings: Settings) -> None:
    """Serve the whole application, exactly as ``python -m server serve`` does."""
    app = App(settings)
    try:
        await app.start()
        tune_gc()
        announce(grpc=app.grpc_port, http=app.http_port)
        await until_stopped()
    finally:
        await app.stop(grace=0)


async def principal_of(app: App, user_id: str) -> Principal:
    """The principal the auth stage would set for this user's session token."""
    user = await app.identity.users.get(user_id)
    return Principal(
        user_id=user.id,
        role=user.role,
        tier=user.tier,
        credential=CredentialKind.SESSION,
        permissions=permissions_for(user.role),
    )


def bare_handler(app: App, principal: Principal) -> grpc.GenericRpcHandler:
    """GetUser served by the servicer method alone, with the caller already known."""
    method: MethodInfo = next(m for m in app.methods if m.full_name == GET_USER)
    identity = app.identity
    api = UserApi(
        identity.users,
        identity.suspensions,
        identity.tiers,
        app.limits.quotas,
        app.clock,
        AuditSearch(app.db, app.infra.lister, app.clock),
    )

    async def get_user(
        request: users_pb2.GetUserRequest, _context: grpc.aio.ServicerContext[Any, Any]
    ) -> users_pb2.User:
        call = Call(method, {}, peer="", transport="grpc")
        call.principal = principal
        return await api.GetUser(request, call)

    handler = grpc.unary_unary_rpc_method_handler(
        get_user,
        request_deserializer=method.request_type.FromString,
        response_serializer=method.response_type.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"GetUser": handler})


async def serve_bare(settings: Settings, user_id: str) -> None:
    """Serve GetUser for ``user_id`` on a plain grpc.aio server, without the pipeline."""
    app = App(settings)
    try:
        handler = bare_handler(app, await principal_of(app, user_id))
        server = grpc.aio.server(options=grpc_server.SERVER_OPTIONS)
        server.add_generic_rpc_handlers([handler])
        port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
        await server.start()
        tune_gc()  # the same process tuning as the full server
        announce(grpc=port)
        await until_stopped()
        await server.stop(0)
    finally:
        await app.close()


class _Announcer(logging.Handler):
    """Announces the port of the standalone gateway's "gateway listening" record."""

    def emit(self, record: logging.LogRecord) -> None:
        port = getattr(record, "port", None)
        if isinstance(port, int):
            announce(http=port)


def serve_gateway(upstream: str) -> int:
    """Run ``python -m gateway`` in front of ``upstream`` on a free port."""
    logging.getLogger("gateway").addHandler(_Announcer())
    args = ["--descriptor-set", str(DESCRIPTORS), "--upstream", upstream, "--port", "0"]
    return gateway_cli.main(args)


class _Uvicorn(uvicorn.Server):
    """A uvicorn server that says when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.listening.set()


async def serve_fastapi(settings: Settings, jwks_url: str) -> None:
    """The FastAPI baseline under uvicorn, on a free port, over the same database."""
    app = create_app(
        AppConfig(
            database_url=settings.effective_database_url,
            jwks_url=jwks_url,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
    )
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, workers=1, http="httptools", loop="asyncio"
    )
    server = _Uvicorn(config)
    serving = asyncio.create_task(server.serve())
    listening = asyncio.create_task(server.listening.wait())
    await asyncio.wait({serving, listening}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        listening.cancel()
        serving.result()
        raise RuntimeError("uvicorn stopped during start-up")
    announce(http=server.servers[0].sockets[0].getsockname()[1])
    await serving


def use_sqlite_driver(driver: str) -> None:
    """Bench only: open SQLite through ``driver`` in this process. ``inline`` is what the
    server does (``server/storage/sqlite_inline.py``); ``aiosqlite`` is SQLAlchemy's
    ``sqlite+aiosqlite`` dialect with aiosqlite's own connection thread."""
    if driver == "aiosqlite":
        database.make_engine = functools.partial(database.make_engine, sqlite_inline_driver=False)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, configure logging as the real server does, and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench.server", description=__doc__)
    parser.add_argument("--mode", choices=("full", "bare", "gateway", "fastapi"), required=True)
    parser.add_argument("--user-id", default="", help="the caller of every call (bare)")
    parser.add_argument("--upstream", default="", help="the gRPC server, HOST:PORT (gateway)")
    parser.add_argument("--jwks-url", default="", help="where the token keys are (fastapi)")
    parser.add_argument("--cpu", type=int, help="run on this CPU only")
    parser.add_argument(
        "--sqlite-driver",
        choices=("inline", "aiosqlite"),
        default="inline",
        help="how the server opens SQLite (full, bare)",
    )
    args = parser.parse_args(argv)
    needed = {"bare": "user_id", "gateway": "upstream", "fastapi": "jwks_url"}.get(args.mode)
    if needed and not getattr(args, needed):
        parser.error(f"--mode {args.mode} needs --{needed.replace('_', '-')}")
    if args.cpu is not None:
        pin_to_cpu(args.cpu)
    if args.mode == "gateway":
        return serve_gateway(args.upstream)
    settings = Settings.from_env()
    use_sqlite_driver(args.sqlite_driver)
    if args.mode == "fastapi":
        asyncio.run(serve_fastapi(settings, args.jwks_url))
        return 0
    logs.configure(settings.log_level, settings.log_format)
    if args.mode == "full":
        asyncio.run(serve_full(settings))
    else:
        asyncio.run(serve_bare(settings, args.user_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
