"""SQLAlchemy table definitions: the single description of the schema.

Alembic migrations must agree with this metadata; a test compares them.
"""

from __future__ import annotations

import sqlalchemy as sa

from server.storage.schema import (
    POSTGRES_ONLY_INDEXES,
    UTCDateTime,
    _id,
    _tunnel_fk,
    _user_fk,
    in_dialect,
    metadata,
)

__all__ = ["POSTGRES_ONLY_INDEXES", "UTCDateTime", "in_dialect", "metadata"]

users = sa.Table(
    "users",
    metadata,
    _id(),
    sa.Column("email", sa.String(254), nullable=False),
    sa.Column("display_name", sa.String(100), nullable=False),
    sa.Column("password_hash", sa.String(255), nullable=True),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("tier", sa.String(20), nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("preferences", sa.JSON(), nullable=False),
    sa.Column("has_avatar", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Column("update_time", UTCDateTime(), nullable=False),
    sa.Column("delete_time", UTCDateTime(), nullable=True),
    sa.Column("purge_time", UTCDateTime(), nullable=True),
    sa.Column("last_login_time", UTCDateTime(), nullable=True),
    sa.UniqueConstraint("email"),
    sa.Index(None, "create_time", "id"),
    sa.Index(None, "purge_time"),
    # The admin's user search (migration 0012): each filterable field in the list's order,
    # and substring searches (ILIKE) through trigrams on PostgreSQL.
    *(
        sa.Index(f"ix_users_{f}_create_time_id", f, "create_time", "id")
        for f in ("tier", "role", "state")
    ),
    sa.Index("ix_users_last_login_time", "last_login_time"),
)
for _field in ("email", "display_name"):  # ILIKE searches through trigrams: PostgreSQL only
    sa.Index(
        f"ix_users_{_field}_trgm",
        users.c[_field],
        postgresql_using="gin",
        postgresql_ops={_field: "gin_trgm_ops"},
    ).ddl_if(dialect="postgresql")

avatars = sa.Table(
    "avatars",
    metadata,
    sa.Column(
        "user_id", sa.String(40), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("content_type", sa.String(50), nullable=False),
    sa.Column("data", sa.LargeBinary(), nullable=False),
    sa.Column("update_time", UTCDateTime(), nullable=False),
)

sessions = sa.Table(
    "sessions",
    metadata,
    _id(),
    _user_fk(),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Column("expire_time", UTCDateTime(), nullable=False),
    sa.Column("revoke_time", UTCDateTime(), nullable=True),
    sa.Column("revoke_reason", sa.String(40), nullable=False, default=""),
    sa.Column("ip_address", sa.String(64), nullable=False, default=""),
    sa.Column("user_agent", sa.String(512), nullable=False, default=""),
    sa.Index(None, "user_id"),
)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    _id(),
    sa.Column(
        "session_id",
        sa.String(40),
        sa.ForeignKey("sessions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    _user_fk(),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Column("expire_time", UTCDateTime(), nullable=False),
    sa.Column("used_time", UTCDateTime(), nullable=True),
    sa.UniqueConstraint("token_hash"),
    sa.Index(None, "session_id"),
    sa.Index(None, "user_id"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    _id(),
    _user_fk(),
    sa.Column("display_name", sa.String(100), nullable=False),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("scopes", sa.JSON(), nullable=False),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Column("expire_time", UTCDateTime(), nullable=True),
    sa.Column("revoke_time", UTCDateTime(), nullable=True),
    sa.Column("last_use_time", UTCDateTime(), nullable=True),
    sa.Column("replaced_by", sa.String(40), nullable=False, default=""),
    #: An agent key's one tunnel (no foreign key: a deleted tunnel leaves the key useless,
    #: not rebound to "any tunnel").
    sa.Column("tunnel_id", sa.String(40), nullable=True),
    sa.UniqueConstraint("secret_hash"),
    sa.Index(None, "user_id", "create_time"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    _id(),
    sa.Column("time", UTCDateTime(), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False, default=""),
    sa.Column("method", sa.String(200), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("outcome", sa.String(40), nullable=False),
    sa.Column("reason", sa.String(100), nullable=False, default=""),
    sa.Column("actor_user_id", sa.String(40), nullable=False, default=""),
    sa.Column("api_key_id", sa.String(40), nullable=False, default=""),
    sa.Column("subject_user_id", sa.String(40), nullable=False, default=""),
    sa.Column("resource", sa.String(300), nullable=False, default=""),
    sa.Column("ip_address", sa.String(64), nullable=False, default=""),
    sa.Column("user_agent", sa.String(512), nullable=False, default=""),
    sa.Column("details", sa.JSON(), nullable=False),
    # The hash chain (migration 0013): one chain per UTC day; older entries have none.
    sa.Column("chain_day", sa.String(10), nullable=True),
    sa.Column("chain_seq", sa.BigInteger(), nullable=True),
    sa.Column("prev_hash", sa.String(64), nullable=True),
    sa.Column("content_hash", sa.String(64), nullable=True),
    sa.Column("hash", sa.String(64), nullable=True),
    #: Personal data erased (a purged user): only the stored content hash remains.
    sa.Column("erased", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Index(None, "subject_user_id", "time"),
    sa.Index(None, "time"),
    sa.Index("ix_audit_log_chain", "chain_day", "chain_seq", unique=True),
)
#: The newest link of each day's audit chain.
audit_chain_heads = sa.Table(
    "audit_chain_heads",
    metadata,
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

#: Rate-limit refusals, aggregated per minute, subject, address, method and policy.
rate_limit_violations = sa.Table(
    "rate_limit_violations",
    metadata,
    _id(),
    sa.Column("window_start", UTCDateTime(), nullable=False),
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("ip_address", sa.String(64), nullable=False),
    sa.Column("method", sa.String(200), nullable=False),
    sa.Column("policy", sa.String(40), nullable=False),
    sa.Column("count", sa.Integer(), nullable=False),
    sa.Index(None, "window_start", "id"),
)

#: Calls per minute by method, code and reason (server/domain/analytics): error rates and
#: the top errors. Rows are keyed by a hash of the four, so replicas add to one row.
call_outcomes = sa.Table(
    "call_outcomes",
    metadata,
    _id(),
    sa.Column("window_start", UTCDateTime(), nullable=False),
    sa.Column("method", sa.String(200), nullable=False),
    sa.Column("code", sa.String(40), nullable=False),
    sa.Column("reason", sa.String(100), nullable=False),
    sa.Column("category", sa.String(20), nullable=False),
    sa.Column("count", sa.BigInteger(), nullable=False),
    sa.Index(None, "window_start"),
)

#: The event log (outbox): written in the transaction of the change it describes.
events = sa.Table(
    "events",
    metadata,
    _id(),
    sa.Column("type", sa.String(100), nullable=False),
    sa.Column("subject", sa.String(300), nullable=False),
    _user_fk(),
    sa.Column("actor", sa.String(100), nullable=False, default=""),
    sa.Column("time", UTCDateTime(), nullable=False),
    sa.Column("payload", sa.JSON(), nullable=False),
    sa.Index(None, "user_id", "id"),
)

tunnels = sa.Table(
    "tunnels",
    metadata,
    _id(),
    _user_fk(),
    sa.Column("display_name", sa.String(255), nullable=False),
    sa.Column("description", sa.String(1000), nullable=False, default=""),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("state_reason", sa.String(300), nullable=False, default=""),
    sa.Column("running", sa.Boolean(), nullable=False),
    sa.Column("health", sa.String(20), nullable=False),
    sa.Column("config", sa.JSON(), nullable=False),
    sa.Column("active_endpoint", sa.String(2048), nullable=False, default=""),
    sa.Column("listen_port", sa.Integer(), nullable=False),
    sa.Column("connected_agents", sa.Integer(), nullable=False, default=0),
    sa.Column("lost_agents", sa.Integer(), nullable=False, default=0),
    sa.Column("request_id", sa.String(64), nullable=True),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Column("update_time", UTCDateTime(), nullable=False),
    sa.Column("state_time", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("user_id", "display_name"),
    sa.UniqueConstraint("user_id", "request_id"),
    sa.UniqueConstraint("listen_port"),
    sa.Index(None, "user_id", "create_time", "id"),
)

tunnel_endpoints = sa.Table(
    "tunnel_endpoints",
    metadata,
    _tunnel_fk(primary_key=True),
    sa.Column("position", sa.Integer(), primary_key=True),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("priority", sa.Integer(), nullable=False),
    sa.Column("weight", sa.Integer(), nullable=False),
    sa.Column("health", sa.String(20), nullable=False),
    sa.Column("failures", sa.Integer(), nullable=False, default=0),
    sa.Column("successes", sa.Integer(), nullable=False, default=0),
    sa.Column("last_probe_time", UTCDateTime(), nullable=True),
    sa.Column("last_error", sa.String(200), nullable=False, default=""),
    sa.Column("next_probe_time", UTCDateTime(), nullable=False),
    sa.Index(None, "next_probe_time"),
)

tunnel_shares = sa.Table(
    "tunnel_shares",
    metadata,
    _tunnel_fk(primary_key=True),
    sa.Column(
        "grantee_id",
        sa.String(40),
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("role", sa.Integer(), nullable=False),
    sa.Column("expire_time", UTCDateTime(), nullable=True),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Column("creator_id", sa.String(40), nullable=False),
    #: The grantee whose share this one was granted through (NULL: by the owner or an admin).
    sa.Column("parent_grantee_id", sa.String(40), nullable=True),
    sa.Index(None, "grantee_id", "create_time"),
)

share_links = sa.Table(
    "share_links",
    metadata,
    _id(),
    _tunnel_fk(),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("role", sa.Integer(), nullable=False),
    sa.Column("max_uses", sa.Integer(), nullable=False),
    sa.Column("use_count", sa.Integer(), nullable=False, default=0),
    sa.Column("expire_time", UTCDateTime(), nullable=False),
    sa.Column("share_ttl", sa.Integer(), nullable=True),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Column("revoke_time", UTCDateTime(), nullable=True),
    #: Who made the link (NULL in rows from before 0007: the owner).
    sa.Column("creator_id", sa.String(40), nullable=True),
    #: The share the link was made through (NULL: by the owner or an admin).
    sa.Column("parent_grantee_id", sa.String(40), nullable=True),
    sa.UniqueConstraint("token_hash"),
    sa.Index(None, "tunnel_id", "create_time"),
)

#: Agent sessions: one row per agent id of a tunnel, kept across reconnects.
agent_sessions = sa.Table(
    "agent_sessions",
    metadata,
    _tunnel_fk(primary_key=True),
    sa.Column("agent_id", sa.String(64), primary_key=True),
    sa.Column("api_key_id", sa.String(40), nullable=False, default=""),
    sa.Column("version", sa.String(64), nullable=False, default=""),
    sa.Column("hostname", sa.String(255), nullable=False, default=""),
    sa.Column("os", sa.String(255), nullable=False, default=""),
    sa.Column("connected", sa.Boolean(), nullable=False),
    sa.Column("active_connections", sa.BigInteger(), nullable=False, default=0),
    sa.Column("connect_time", UTCDateTime(), nullable=False),
    sa.Column("last_seen_time", UTCDateTime(), nullable=False),
    sa.Column("last_report_time", UTCDateTime(), nullable=True),
    sa.Index(None, "connected", "last_seen_time"),
)

#: Reports already counted, so that a re-sent report is not counted twice.
agent_reports = sa.Table(
    "agent_reports",
    metadata,
    _tunnel_fk(primary_key=True),
    sa.Column("agent_id", sa.String(64), primary_key=True),
    sa.Column("sequence", sa.BigInteger(), primary_key=True),
    sa.Column("receive_time", UTCDateTime(), nullable=False),
)

LATENCY_COLUMNS = [f"latency_{i}" for i in range(14)]

#: Traffic and usage per tunnel and UTC day. Outlives the tunnel (billing needs it).
tunnel_usage = sa.Table(
    "tunnel_usage",
    metadata,
    sa.Column("tunnel_id", sa.String(40), primary_key=True),
    sa.Column("day", sa.Date(), primary_key=True),
    _user_fk(),
    sa.Column("tunnel_name", sa.String(300), nullable=False),
    sa.Column("tier", sa.String(20), nullable=False),
    sa.Column("connections", sa.BigInteger(), nullable=False),
    sa.Column("bytes_in", sa.BigInteger(), nullable=False),
    sa.Column("bytes_out", sa.BigInteger(), nullable=False),
    sa.Column("peak_concurrency", sa.BigInteger(), nullable=False),
    sa.Column("request_count", sa.BigInteger(), nullable=False),
    sa.Column("success_count", sa.BigInteger(), nullable=False),
    sa.Column("error_count", sa.BigInteger(), nullable=False),
    *(sa.Column(name, sa.BigInteger(), nullable=False) for name in LATENCY_COLUMNS),
    sa.Column("stream_milliseconds", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Index(None, "user_id", "day"),
    sa.Index(None, "day"),
)

#: Requests counted against each user's monthly quota, rolled up from the rate limiter's
#: counters: an absolute count per user and month that a roll-up only ever raises.
monthly_request_usage = sa.Table(
    "monthly_request_usage",
    metadata,
    sa.Column(
        "user_id",
        sa.String(40),
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("month", sa.Date(), primary_key=True),
    sa.Column("requests", sa.BigInteger(), nullable=False),
    sa.Column("update_time", UTCDateTime(), nullable=False),
)

#: Webhook endpoints. The secret signs deliveries; the previous one keeps signing until
#: ``previous_secret_expire_time`` after a rotation.
webhooks = sa.Table(
    "webhooks",
    metadata,
    _id(),
    _user_fk(),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("description", sa.String(1000), nullable=False, default=""),
    sa.Column("event_types", sa.JSON(), nullable=False),
    sa.Column("transform", sa.String(2000), nullable=False, default=""),
    sa.Column("rate_limit", sa.Integer(), nullable=False, default=0),
    # Custom headers, legacy: written in the clear by releases before 0008 (and tools); the
    # server writes {} here and the headers sealed in sealed_headers (see storage/webhooks.py).
    sa.Column("headers", sa.JSON(), nullable=False),
    sa.Column("sealed_headers", sa.Text(), nullable=True),
    sa.Column("disabled_reason", sa.String(20), nullable=False, default=""),
    sa.Column("secret", sa.String(200), nullable=False),
    sa.Column("previous_secret", sa.String(200), nullable=True),
    sa.Column("previous_secret_expire_time", UTCDateTime(), nullable=True),
    sa.Column("failing_since", UTCDateTime(), nullable=True),
    # GCRA state of the delivery rate limit: the theoretical arrival time of the next send.
    sa.Column("rate_tat", UTCDateTime(), nullable=True),
    sa.Column("request_id", sa.String(64), nullable=True),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Column("update_time", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("user_id", "request_id"),
    sa.Index(None, "user_id", "create_time", "id"),
)

#: The outbox: one row per event and endpoint, written with the event. Pending rows are
#: claimed by moving ``next_attempt_time`` past the claim's lease.
webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    _id(),
    sa.Column(
        "webhook_id",
        sa.String(40),
        sa.ForeignKey("webhooks.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column(
        "event_id",
        sa.String(40),
        sa.ForeignKey("events.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("event_type", sa.String(100), nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("attempt_count", sa.Integer(), nullable=False, default=0),
    sa.Column("next_attempt_time", UTCDateTime(), nullable=True),
    # Which claim holds the row (0: none); a result is recorded only by its claim.
    sa.Column("claim", sa.BigInteger(), nullable=False, default=0),
    # A test send: delivered once, never retried, never counted against the endpoint.
    sa.Column("test", sa.Boolean(), nullable=False, default=False),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Column("update_time", UTCDateTime(), nullable=False),
    sa.Index(None, "webhook_id", "id"),
    sa.Index(
        "ix_webhook_deliveries_due",
        "next_attempt_time",
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    ),
)

#: Every HTTP request of a delivery.
webhook_attempts = sa.Table(
    "webhook_attempts",
    metadata,
    sa.Column(
        "delivery_id",
        sa.String(40),
        sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("number", sa.Integer(), primary_key=True),
    sa.Column("time", UTCDateTime(), nullable=False),
    sa.Column("status_code", sa.Integer(), nullable=False),
    sa.Column("latency", sa.Float(), nullable=False),
    sa.Column("response_excerpt", sa.String(1024), nullable=False),
    sa.Column("error", sa.String(300), nullable=False),
    sa.Column("succeeded", sa.Boolean(), nullable=False),
)

#: Long-running operations. Work is resumable: ``cursor`` says where it stands, and the
#: replica running it renews ``lease_until``; another replica takes over when it lapses.
operations = sa.Table(
    "operations",
    metadata,
    _id(),
    _user_fk(),
    sa.Column("kind", sa.String(50), nullable=False),
    sa.Column("target", sa.String(300), nullable=False),
    sa.Column("params", sa.JSON(), nullable=False),
    sa.Column("cursor", sa.String(40), nullable=False, default=""),
    sa.Column("processed", sa.BigInteger(), nullable=False, default=0),
    sa.Column("total", sa.BigInteger(), nullable=False, default=0),
    sa.Column("done", sa.Boolean(), nullable=False, default=False),
    sa.Column("result", sa.JSON(), nullable=True),
    sa.Column("error_code", sa.Integer(), nullable=False, default=0),
    sa.Column("error_message", sa.String(300), nullable=False, default=""),
    sa.Column("request_id", sa.String(64), nullable=True),
    sa.Column("lease_until", UTCDateTime(), nullable=True),
    sa.Column("create_time", UTCDateTime(), nullable=False),
    sa.Column("update_time", UTCDateTime(), nullable=False),
    sa.Column("end_time", UTCDateTime(), nullable=True),
    sa.UniqueConstraint("user_id", "request_id"),
    sa.Index(None, "user_id", "create_time", "id"),
    sa.Index(None, "done", "lease_until"),
)

# The proxies' tables live in their own module, on this metadata (a cycle by design: it
# needs the helpers above, and whoever reads this metadata needs its tables).
from server.storage.proxies import tables as _proxy_tables  # noqa: E402, F401
