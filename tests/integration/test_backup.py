"""``python -m server backup | restore | verify`` as an operator runs them, on SQLite and on
PostgreSQL: back up a serving database, destroy it, restore it, and the API serves the
same data; a damaged file, a backup of another schema revision and a verification that
finds other rows are refused; old backups are pruned; the server reports the newest one's
age."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.request import urlopen

import grpc
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tunnelplane.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    tunnels_pb2,
    tunnels_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)

from server.backup import Manifest, head_revision, libpq_url
from tests.conftest import (
    create_postgres_database,
    drop_postgres_database,
    migrate,
    require_postgres,
)
from tests.helpers import PASSWORD, unique_email
from tests.processes import child_env, run_cli, serving

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL of the test's own ("" for the embedded SQLite file)."""
    if request.param == "sqlite":
        yield ""
        return
    require_postgres()
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


def environment(tmp_path: Path, database: str) -> dict[str, str]:
    return child_env(
        tmp_path / "data",
        TP_DATABASE_URL=database,
        TP_BACKUP_DIR=str(tmp_path / "backups"),
        TP_JWT_PRIVATE_KEY_FILE=str(tmp_path / "jwt.pem"),
    )


async def prepared(tmp_path: Path, database: str) -> dict[str, str]:
    from server.domain.identity.tokens import generate_private_key_pem

    (tmp_path / "jwt.pem").write_bytes(generate_private_key_pem())
    env = environment(tmp_path, database)
    ran = run_cli("migrate", env=env)
    assert ran.returncode == 0, ran.stderr
    return env


async def sign_in(port: int, email: str) -> tuple[tuple[str, str], ...]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        login = await auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(email=email, password=PASSWORD)
        )
    return (("authorization", f"Bearer {login.tokens.access_token}"),)


async def what_is_served(port: int, email: str) -> tuple[str, list[str]]:
    """The user's e-mail address and tunnels' names, as the API serves them."""
    metadata = await sign_in(port, email)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        me = await users_pb2_grpc.UserServiceStub(channel).GetUser(
            users_pb2.GetUserRequest(name="users/me"), metadata=metadata
        )
        listed = await tunnels_pb2_grpc.TunnelServiceStub(channel).ListTunnels(
            tunnels_pb2.ListTunnelsRequest(parent="users/me"), metadata=metadata
        )
    return me.email, sorted(t.display_name for t in listed.tunnels)


async def test_backup_destroy_restore_serves_the_same_data(tmp_path: Path, database: str) -> None:
    env = await prepared(tmp_path, database)
    email = unique_email("backup")
    async with serving(env) as server:
        following = asyncio.create_task(server.follow_log())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            await auth_pb2_grpc.AuthServiceStub(channel).Register(
                auth_pb2.RegisterRequest(email=email, password=PASSWORD)
            )
        metadata = await sign_in(server.grpc_port, email)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            tunnels = tunnels_pb2_grpc.TunnelServiceStub(channel)
            for name in ("ollama", "webapp"):
                await tunnels.CreateTunnel(
                    tunnels_pb2.CreateTunnelRequest(
                        parent="users/me", tunnel=tunnels_pb2.Tunnel(display_name=name)
                    ),
                    metadata=metadata,
                )
        before = await what_is_served(server.grpc_port, email)

        made = run_cli("backup", env=env)  # while the server serves
        assert made.returncode == 0, made.stderr
        assert made.stdout.startswith("backed up: tunnelplane-")

        # The server reports the backup's age.
        text = await asyncio.to_thread(
            lambda: urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read()
        )
        samples = {
            s.name: s.value
            for f in text_string_to_metric_families(text.decode())
            for s in f.samples
        }
        (manifest_path,) = (tmp_path / "backups").glob("*.json")
        manifest = Manifest.read(manifest_path)
        assert samples["tunnelplane_backup_last_success_timestamp_seconds"] > 0
        server.process.send_signal(signal.SIGTERM)
        assert await server.process.wait() == 0
        await following

    assert manifest.schema_revision == head_revision()
    assert manifest.rows["users"] >= 1
    assert manifest.rows["tunnels"] == 2
    backup_file = tmp_path / "backups" / manifest.file

    verified = run_cli("verify", str(backup_file), env=env)
    assert verified.returncode == 0, verified.stderr
    assert "match" in verified.stdout

    destroy(tmp_path, database)
    restored = run_cli("restore", str(backup_file), env=env)
    assert restored.returncode == 0, restored.stderr

    async with serving(env) as server:
        assert await what_is_served(server.grpc_port, email) == before


def destroy(tmp_path: Path, database: str) -> None:
    """What a lost disk or a dropped schema leaves."""
    if not database:
        for path in (tmp_path / "data").glob("tunnelplane.db*"):
            path.unlink()
        return
    with psycopg.connect(libpq_url(database), autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


async def test_damaged_or_foreign_backups_are_refused_and_old_ones_pruned(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'tunnelplane.db'}"
    (tmp_path / "data").mkdir()
    await migrate(url)
    env = environment(tmp_path, "")
    for _ in range(3):
        ran = run_cli("backup", "--keep", "2", env=env)
        assert ran.returncode == 0, ran.stderr
        assert ran.stderr == ""  # nothing to warn about: every file is made private
    manifests = sorted((tmp_path / "backups").glob("*.json"))
    assert len(manifests) == 2
    # A backup holds what the database holds: this user's alone.
    assert stat.S_IMODE((tmp_path / "backups").stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "backups").iterdir()} == {0o600}
    assert len(list((tmp_path / "backups").glob("*.sqlite"))) == 2

    newest = Manifest.read(manifests[-1])
    file = tmp_path / "backups" / newest.file
    # Another schema revision: refused, naming both.
    data = json.loads(manifests[-1].read_text())
    manifests[-1].write_text(json.dumps(data | {"schema_revision": "0000_elsewhere"}))
    refused = run_cli("restore", str(file), env=env)
    assert refused.returncode == 1
    assert "0000_elsewhere" in refused.stderr
    assert head_revision() in refused.stderr
    # Rows the manifest does not match: verification fails.
    manifests[-1].write_text(json.dumps(data | {"rows": data["rows"] | {"users": 99}}))
    failed = run_cli("verify", str(file), env=env)
    assert failed.returncode == 1
    assert "users" in failed.stderr
    # A damaged file: refused before anything is restored.
    manifests[-1].write_text(json.dumps(data))
    with file.open("r+b") as stream:
        stream.seek(200)
        stream.write(b"\xff\xff")
    damaged = run_cli("restore", str(file), env=env)
    assert damaged.returncode == 1
    assert "checksum" in damaged.stderr
    assert run_cli("verify", str(file), env=env).returncode == 1
