"""The server as a real child process: the CLI, production-mode checks and graceful
shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.request import urlopen

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tunnelplane.v1 import auth_pb2, auth_pb2_grpc, users_pb2

from tests.helpers import PASSWORD, eventually, fails, unique_email
from tests.processes import ServerProcess, child_env, run_cli, serving

pytestmark = pytest.mark.slow


@pytest.fixture
async def migrated_dir(tmp_path: Path) -> Path:
    result = run_cli("migrate", env=child_env(tmp_path))
    assert result.returncode == 0, result.stderr
    return tmp_path


@pytest.fixture
async def server_process(migrated_dir: Path) -> AsyncIterator[ServerProcess]:
    # Slow password hashing gives the shutdown test a call that is reliably in flight.
    env = child_env(
        migrated_dir, TP_ARGON2_TIME_COST="40", TP_ARGON2_MEMORY_KIB="16384", TP_SHUTDOWN_GRACE="30"
    )
    async with serving(env) as server:
        yield server


def started_logins(metrics_port: int) -> float:
    text = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(
        r'grpc_server_started_total\{grpc_method="Login",grpc_service="tunnelplane.v1.AuthService",'
        r'grpc_type="unary"\} (\S+)',
        text,
    )
    return float(match.group(1)) if match else 0.0


async def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(
    server_process: ServerProcess,
) -> None:
    target = f"127.0.0.1:{server_process.grpc_port}"
    async with grpc.aio.insecure_channel(target) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        email = unique_email()
        await auth.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD))
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        slow_login = asyncio.ensure_future(
            auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
        )
        # Until the server has the call in hand: another process, so poll its metrics.
        await eventually(lambda: started_logins(server_process.metrics_port) >= 1, within=20)
        server_process.process.send_signal(signal.SIGTERM)

        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        login = await slow_login  # the in-flight call completes normally
        assert login.tokens.access_token
    async with grpc.aio.insecure_channel(target) as fresh:
        await fails(
            auth_pb2_grpc.AuthServiceStub(fresh).GetJwks(auth_pb2.GetJwksRequest(), timeout=5),
            grpc.StatusCode.UNAVAILABLE,
        )
    assert await asyncio.wait_for(server_process.process.wait(), 40) == 0
    await server_process.drain_log()
    messages = [entry.get("message") for entry in server_process.log]
    assert "shutting down" in messages
    assert messages[-1] == "stopped"


async def test_production_mode_refuses_default_secrets(tmp_path: Path) -> None:
    result = run_cli("serve", env=child_env(tmp_path, TP_MODE="production"))
    assert result.returncode == 2
    assert "TP_JWT_PRIVATE_KEY" in result.stderr
    assert "TP_PAGE_TOKEN_SECRET" in result.stderr
    assert "TP_SECRETS_KEY" in result.stderr
    assert not (tmp_path / "jwt-signing-key.pem").exists()
    assert not (tmp_path / "secrets.key").exists()


async def test_bad_setting_is_named(tmp_path: Path) -> None:
    result = run_cli("serve", env=child_env(tmp_path, TP_GRPC_PORT="fifty"))
    assert result.returncode == 2
    assert "TP_GRPC_PORT" in result.stderr


async def test_create_admin_bootstraps_a_super_admin(migrated_dir: Path) -> None:
    env = child_env(migrated_dir)
    email = unique_email("root")
    created = run_cli(
        "create-admin", "--email", email, "--password-stdin", env=env, stdin=PASSWORD + "\n"
    )
    assert created.returncode == 0, created.stderr
    assert "super_admin" in created.stdout
    assert PASSWORD not in created.stdout + created.stderr
    generated = run_cli("create-admin", "--email", unique_email("gen"), env=env)
    assert generated.returncode == 0, generated.stderr
    assert "password (shown once)" in generated.stdout

    from server.app import App
    from server.settings import Settings

    app = App(Settings.from_env(env))
    try:
        await app.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            auth = auth_pb2_grpc.AuthServiceStub(channel)
            login = await auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
            assert login.user.role == users_pb2.User().role.__class__(2)  # ROLE_SUPER_ADMIN
            from tunnelplane.v1 import users_pb2_grpc

            listing = await users_pb2_grpc.UserServiceStub(channel).ListUsers(
                users_pb2.ListUsersRequest(),
                metadata=(("authorization", f"Bearer {login.tokens.access_token}"),),
            )
            assert email in {u.email for u in listing.users}
    finally:
        await app.stop(grace=0)
    # Running it again for an existing account promotes instead of failing.
    again = run_cli("create-admin", "--email", email, "--password-stdin", env=env, stdin="x\n")
    assert again.returncode == 0, again.stderr
    assert "is now super_admin" in again.stdout


async def test_promoting_from_the_command_line_reaches_a_running_embedded_server(
    migrated_dir: Path,
) -> None:
    """Found by `make run`: a user signed in on a running server without Redis and then made
    super_admin with `create-admin` stayed a plain user there for the subject cache's five
    minutes (the command cannot reach the server's memory). The in-process cache now lives
    five seconds."""
    from tunnelplane.v1 import admin_pb2, admin_pb2_grpc

    from server.app import App
    from server.settings import Settings
    from tests.helpers import Client, eventually

    env = child_env(migrated_dir)
    app = App(Settings.from_env(env))
    try:
        await app.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            user = await Client(app, channel).new_user()
            status = admin_pb2_grpc.AdminServiceStub(channel).GetSystemStatus
            request = admin_pb2.GetSystemStatusRequest()
            refused = status(request, metadata=user.metadata)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await refused  # PERMISSION_DENIED, and the user's state is cached now
            promoted = await asyncio.to_thread(
                run_cli, "create-admin", "--email", user.email, env=env
            )
            assert promoted.returncode == 0, promoted.stderr

            async def allowed() -> bool:
                try:
                    await status(request, metadata=user.metadata)
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                    return False
                return True

            await eventually(allowed, within=15, every=0.25)
    finally:
        await app.stop(grace=0)
