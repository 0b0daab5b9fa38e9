"""call outcomes per minute

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 17:40:00

Compatibility: the code of the previous release must keep working against the schema
this migration produces (rolling deploys run both at once). Add columns as nullable or
with a server default, backfill in a later release, never rename or drop in one step.

A new table only (error analytics): the previous release does not read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from server.storage.tables import UTCDateTime


revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('call_outcomes',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('window_start', UTCDateTime(timezone=True), nullable=False),
    sa.Column('method', sa.String(length=200), nullable=False),
    sa.Column('code', sa.String(length=40), nullable=False),
    sa.Column('reason', sa.String(length=100), nullable=False),
    sa.Column('category', sa.String(length=20), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_call_outcomes'))
    )
    with op.batch_alter_table('call_outcomes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_call_outcomes_window_start'), ['window_start'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('call_outcomes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_call_outcomes_window_start'))
    op.drop_table('call_outcomes')
