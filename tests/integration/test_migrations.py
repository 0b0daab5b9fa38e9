"""Migrations and models never disagree, on either database."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from server.storage.database import make_engine
from server.storage.migrate import upgrade
from server.storage.tables import in_dialect, metadata
from tests.conftest import create_postgres_database, drop_postgres_database, require_postgres


def differences(connection: object) -> list[object]:
    dialect = connection.dialect.name  # type: ignore[attr-defined]
    context = MigrationContext.configure(
        connection,  # type: ignore[arg-type]
        opts={
            "compare_type": True,
            "compare_server_default": True,
            "include_object": lambda obj, name, kind, *_: in_dialect(name, kind, dialect),
        },
    )
    return list(compare_metadata(context, metadata))


async def check(url: str) -> None:
    engine = make_engine(url, pool_size=1, statement_timeout=60)
    try:
        await upgrade(engine)
        async with engine.connect() as conn:
            diff = await conn.run_sync(differences)
            tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        assert diff == [], f"models and migrations disagree: {diff}"
        assert set(metadata.tables) <= tables
        await upgrade(engine)  # a second run is a no-op
    finally:
        await engine.dispose()


async def test_sqlite_schema_matches_models(tmp_path: Path) -> None:
    await check(f"sqlite+aiosqlite:///{tmp_path / 'schema.db'}")


async def test_postgres_schema_matches_models() -> None:
    require_postgres()
    url = create_postgres_database()
    try:
        await check(url)
    finally:
        drop_postgres_database(url)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_migrations_render_offline(dialect: str) -> None:
    """`alembic upgrade head --sql` works, so DBAs can review the DDL."""
    import io

    from alembic import command

    from server.storage.migrate import alembic_config

    config = alembic_config()
    buffer = io.StringIO()
    config.output_buffer = buffer
    url = "sqlite:///x.db" if dialect == "sqlite" else "postgresql://u@h/d"
    import os

    old = os.environ.get("TP_DATABASE_URL")
    os.environ["TP_DATABASE_URL"] = url
    try:
        command.upgrade(config, "head", sql=True)
    finally:
        if old is None:
            os.environ.pop("TP_DATABASE_URL")
        else:
            os.environ["TP_DATABASE_URL"] = old
    assert "CREATE TABLE users" in buffer.getvalue()
