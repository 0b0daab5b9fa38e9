"""The schema's building blocks: the metadata and its naming convention, the UTC datetime
type, the columns most tables share, and which indexes exist on which database. The tables
themselves are in :mod:`server.storage.tables`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = sa.MetaData(naming_convention=NAMING)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


def _id(name: str = "id") -> sa.Column[str]:
    return sa.Column(name, sa.String(40), primary_key=True)


def _user_fk(nullable: bool = False) -> sa.Column[str]:
    return sa.Column(
        "user_id",
        sa.String(40),
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        nullable=nullable,
    )


def _tunnel_fk(*, primary_key: bool = False) -> sa.Column[str]:
    return sa.Column(
        "tunnel_id",
        sa.String(40),
        sa.ForeignKey("tunnels.id", ondelete="CASCADE"),
        primary_key=primary_key,
        nullable=False,
    )


#: Indexes PostgreSQL alone has (autogenerate and the schema test skip them elsewhere).
POSTGRES_ONLY_INDEXES = frozenset({"ix_users_email_trgm", "ix_users_display_name_trgm"})


def in_dialect(name: str | None, kind: str, dialect: str) -> bool:
    """Whether a schema object of the models exists in a ``dialect`` database (for
    Alembic's ``include_object``)."""
    return not (kind == "index" and name in POSTGRES_ONLY_INDEXES and dialect != "postgresql")
