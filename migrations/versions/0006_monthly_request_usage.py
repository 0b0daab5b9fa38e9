"""monthly request usage rolled up from the limiter

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 02:00:00.000000

Compatibility: the code of the previous release must keep working against the schema
this migration produces (rolling deploys run both at once). Add columns as nullable or
with a server default, backfill in a later release, never rename or drop in one step.
A new table only: the previous release never reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from server.storage.tables import UTCDateTime

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'monthly_request_usage',
        sa.Column('user_id', sa.String(length=40), nullable=False),
        sa.Column('month', sa.Date(), nullable=False),
        sa.Column('requests', sa.BigInteger(), nullable=False),
        sa.Column('update_time', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ['user_id'],
            ['users.id'],
            name=op.f('fk_monthly_request_usage_user_id_users'),
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('user_id', 'month', name=op.f('pk_monthly_request_usage')),
    )


def downgrade() -> None:
    op.drop_table('monthly_request_usage')
