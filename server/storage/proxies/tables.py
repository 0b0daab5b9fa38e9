"""The proxies' tables: proxies with their instances, config revisions, scaling events and
daily usage. Part of :data:`server.storage.tables.metadata` (imported from there)."""

from __future__ import annotations

import sqlalchemy as sa

from server.storage.schema import UTCDateTime, _id, _user_fk
from server.storage.tables import metadata


def _proxy_fk(*, primary_key: bool = False) -> sa.Column[str]:
    return sa.Column(
        "proxy_id",
        sa.String(40),
        sa.ForeignKey("proxies.id", ondelete="CASCADE"),
        primary_key=primary_key,
        nullable=False,
    )


#: A user's proxies. ``instances`` is the provisioner's placement with each instance's
#: health bookkeeping, written by the fleet loop (one writer per proxy at a time).
proxies = sa.Table(
    "proxies",
    metadata,
    _id(),
    _user_fk(),
    sa.Column("display_name", sa.String(255), nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("state_reason", sa.String(300), nullable=False, default=""),
    sa.Column("config", sa.JSON(), nullable=False),
    sa.Column("config_version", sa.Integer(), nullable=False),
    sa.Column("desired_instances", sa.Integer(), nullable=False),
    sa.Column("instances", sa.JSON(), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=True),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Column("update_time", UTCDateTime(), nullable=False),
    sa.Column("state_time", UTCDateTime(), nullable=False),
    sa.Column("last_active_time", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("user_id", "request_id"),
    sa.Index(None, "user_id", "create_time", "id"),
    sa.Index(None, "state"),
)

#: Every config a proxy had, by version; rollback copies one forward as a new version.
proxy_config_revisions = sa.Table(
    "proxy_config_revisions",
    metadata,
    _proxy_fk(primary_key=True),
    sa.Column("version", sa.Integer(), primary_key=True),
    sa.Column("config", sa.JSON(), nullable=False),
    sa.Column("actor", sa.String(100), nullable=False, default=""),
    sa.Column("restored_version", sa.Integer(), nullable=False, default=0),
    sa.Column("create_time", UTCDateTime(), nullable=False),
)

#: Scaling decisions with their inputs, applied or only recorded (dry run).
proxy_scaling_events = sa.Table(
    "proxy_scaling_events",
    metadata,
    _id(),
    _proxy_fk(),
    sa.Column("trigger", sa.String(20), nullable=False),
    sa.Column("from_instances", sa.Integer(), nullable=False),
    sa.Column("to_instances", sa.Integer(), nullable=False),
    sa.Column("applied", sa.Boolean(), nullable=False),
    sa.Column("reason", sa.String(300), nullable=False),
    sa.Column("cpu_percent", sa.Float(), nullable=False),
    sa.Column("streams", sa.Integer(), nullable=False),
    sa.Column("actor", sa.String(100), nullable=False, default=""),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Index(None, "proxy_id", "create_time"),
)
