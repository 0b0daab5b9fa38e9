"""Alembic, driven from code: ``python -m server migrate`` and the test fixtures use this."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine

PROJECT = Path(__file__).resolve().parents[2]


def alembic_config(connection: Any = None) -> Config:
    """Alembic's configuration (from ``[tool.alembic]`` in pyproject.toml)."""
    config = Config(toml_file=str(PROJECT / "pyproject.toml"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` through ``engine``."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: command.upgrade(alembic_config(sync), revision))
