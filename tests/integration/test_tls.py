"""TLS on the gRPC port, and production mode's rule that passwords and tokens travel only
over TLS: on the gRPC port too, where a TLS-terminating proxy counts only when declared."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tunnelplane.v1 import auth_pb2

from server.app import App
from tests.certs import self_signed
from tests.conftest import make_settings, production
from tests.helpers import PASSWORD, Client, fails, reason


async def test_tls_serves_secure_clients_only(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    settings = make_settings(
        tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        tls_cert_file=str(cert),
        tls_key_file=str(key),
    )
    server = App(settings)
    await server.start()
    try:
        target = f"127.0.0.1:{server.grpc_port}"
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(target, credentials) as secure:
            response = await health_pb2_grpc.HealthStub(secure).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert response.status in {
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,  # no tables yet: still a TLS answer
            }
        async with grpc.aio.insecure_channel(target) as plain:
            await fails(
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3),
                grpc.StatusCode.UNAVAILABLE,
            )
    finally:
        await server.stop(grace=0)


# --- production: require_tls methods on the gRPC port ------------------------------------

HTTPS = (("x-forwarded-proto", "https"),)


def login(email: str = "nobody@example.com") -> auth_pb2.LoginRequest:
    return auth_pb2.LoginRequest(email=email, password=PASSWORD)


@pytest.mark.parametrize("metadata", [(), HTTPS], ids=["plain", "forged-forwarded-proto"])
async def test_production_refuses_a_password_over_plaintext_grpc(
    tmp_path: Path, metadata: tuple[tuple[str, str], ...]
) -> None:
    async with (
        production(tmp_path, http_port=-1) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as plain,
    ):
        client = Client(server, plain, setup_metadata=metadata)
        login_refused = await fails(
            client.auth.Login(login(), metadata=metadata), grpc.StatusCode.PERMISSION_DENIED
        )
        register_refused = await fails(client.register(), grpc.StatusCode.PERMISSION_DENIED)
        assert reason(login_refused) == reason(register_refused) == "TLS_REQUIRED"
        jwks = await client.auth.GetJwks(auth_pb2.GetJwksRequest())  # no secret: served
        assert jwks.keys


async def test_production_accepts_a_password_over_grpc_with_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    async with production(
        tmp_path, http_port=-1, tls_cert_file=str(cert), tls_key_file=str(key)
    ) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        target = f"127.0.0.1:{server.grpc_port}"
        async with grpc.aio.secure_channel(target, credentials) as secure:
            user = await Client(server, secure).new_user()
        assert user.access_token


async def test_production_believes_only_a_declared_tls_proxy(tmp_path: Path) -> None:
    """Calls from a declared proxy count as TLS when it says so (x-forwarded-proto: https);
    the same proxy forwarding plain traffic (or saying nothing) does not launder it."""
    async with (
        production(tmp_path, http_port=-1, grpc_tls_proxies="127.0.0.1/32") as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        through_proxy = Client(server, channel, setup_metadata=HTTPS)
        user = await through_proxy.new_user()
        assert user.access_token
        for metadata in ((), (("x-forwarded-proto", "http"),)):
            refused = Client(server, channel, setup_metadata=metadata)
            error = await fails(refused.login(user.email), grpc.StatusCode.PERMISSION_DENIED)
            assert reason(error) == "TLS_REQUIRED"
