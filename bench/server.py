"""One server under test, in a process of its own: ``python -m bench.server --mode full|bare``.

``full`` is the real :class:`server.app.App`: the grpc.aio adapter and every stage of the
pipeline (request context, access log, metrics, tracing, deadline, audit, auth, errors).

``bare`` is a plain ``grpc.aio`` server with the same server options and one generic
handler for GetUser. The handler calls the same servicer method,
:meth:`server.api.users.UserApi.GetUser`, built from the same :class:`~server.app.App`
(never started), with the caller preset on a minimal :class:`~server.pipeline.Call`: same
storage path, no adapter, no stages.

Settings come from ``TP_*`` variables as for ``python -m server serve``. Once serving, the
process prints ``READY <port>`` on stdout; it stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
from tunnelplane.v1 import users_pb2

from server import grpc_server, logs
from server.api.users import UserApi
from server.app import App
from server.domain.principal import CredentialKind, Principal, permissions_for
from server.pipeline import Call, MethodInfo
from server.runtime import tune_gc
from server.settings import Settings

SERVICE = "tunnelplane.v1.UserService"
GET_USER = f"/{SERVICE}/GetUser"


def pin(cpu: int) -> None:
    """Run every thread of this process, and every thread it starts later, on ``cpu``."""
    for task in Path("/proc/self/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


def announce(port: int) -> None:
    """Tell the parent process where this server listens."""
    print(f"READY {port}", flush=True)


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
        announce(app.grpc_port)
        await until_stopped()
    finally:
        await app.stop(grace=0)


async def principal_of(app: App, user_id: str) -> Principal:
    """The principal the auth stage would set for this user's session token."""
    user = await app.users.get(user_id)
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
    api = UserApi(app.users, app.tiers, app.clock)

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
        announce(port)
        await until_stopped()
        await server.stop(0)
    finally:
        await app.close()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, configure logging as the real server does, and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench.server", description=__doc__)
    parser.add_argument("--mode", choices=("full", "bare"), required=True)
    parser.add_argument("--user-id", default="", help="the caller of every call (bare only)")
    parser.add_argument("--cpu", type=int, help="run on this CPU only")
    args = parser.parse_args(argv)
    if args.mode == "bare" and not args.user_id:
        parser.error("--mode bare needs --user-id")
    if args.cpu is not None:
        pin(args.cpu)
    settings = Settings.from_env()
    logs.configure(settings.log_level, settings.log_format)
    if args.mode == "full":
        asyncio.run(serve_full(settings))
    else:
        asyncio.run(serve_bare(settings, args.user_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
