"""audit hash chain, append-only

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 20:40:00

Compatibility: the code of the previous release must keep working against the schema
this migration produces (rolling deploys run both at once). Add columns as nullable or
with a server default, backfill in a later release, never rename or drop in one step.

Nullable chain columns (entries written before this have no chain, and the previous
release writes entries without one) and a table of each day's chain head. On PostgreSQL a
trigger makes the audit log append-only: no DELETE, no TRUNCATE, and the only UPDATE
allowed erases a purged user's personal data (ip address, user agent, details, resource
and the user's ids) while keeping every chained column, which the verifier accepts for an
entry marked erased. The previous release's outcome corrections (an UPDATE of outcome)
are refused: deploy the new code before this migration runs on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GUARD = """
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'UPDATE'
     AND NEW.erased
     AND NEW.id = OLD.id AND NEW.time = OLD.time AND NEW.method = OLD.method
     AND NEW.action = OLD.action AND NEW.outcome = OLD.outcome
     AND NEW.reason = OLD.reason AND NEW.request_id = OLD.request_id
     AND NEW.chain_day IS NOT DISTINCT FROM OLD.chain_day
     AND NEW.chain_seq IS NOT DISTINCT FROM OLD.chain_seq
     AND NEW.prev_hash IS NOT DISTINCT FROM OLD.prev_hash
     AND NEW.content_hash IS NOT DISTINCT FROM OLD.content_hash
     AND NEW.hash IS NOT DISTINCT FROM OLD.hash
     AND NEW.ip_address = '' AND NEW.user_agent = ''
  THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    # Plain ALTER TABLE ADD COLUMN (SQLite too: nullable, or with a default).
    op.add_column('audit_log', sa.Column('chain_day', sa.String(length=10), nullable=True))
    op.add_column('audit_log', sa.Column('chain_seq', sa.BigInteger(), nullable=True))
    op.add_column('audit_log', sa.Column('prev_hash', sa.String(length=64), nullable=True))
    op.add_column('audit_log', sa.Column('content_hash', sa.String(length=64), nullable=True))
    op.add_column('audit_log', sa.Column('hash', sa.String(length=64), nullable=True))
    op.add_column('audit_log', sa.Column('erased', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index('ix_audit_log_chain', 'audit_log', ['chain_day', 'chain_seq'], unique=True)
    op.create_table('audit_chain_heads',
    sa.Column('day', sa.String(length=10), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('day', name=op.f('pk_audit_chain_heads'))
    )
    if op.get_context().dialect.name == 'postgresql':
        op.execute(GUARD)
        op.execute(
            'CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log '
            'FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()'
        )
        op.execute(
            'CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log '
            'FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()'
        )


def downgrade() -> None:
    if op.get_context().dialect.name == 'postgresql':
        op.execute('DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log')
        op.execute('DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log')
        op.execute('DROP FUNCTION IF EXISTS audit_log_append_only()')
    op.drop_table('audit_chain_heads')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_log_chain')
        batch_op.drop_column('erased')
        batch_op.drop_column('hash')
        batch_op.drop_column('content_hash')
        batch_op.drop_column('prev_hash')
        batch_op.drop_column('chain_seq')
        batch_op.drop_column('chain_day')
