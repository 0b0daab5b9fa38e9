"""shares and share links record who granted them

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 02:00:00.000000

Compatibility: the code of the previous release must keep working against the schema
this migration produces (rolling deploys run both at once). Add columns as nullable or
with a server default, backfill in a later release, never rename or drop in one step.

Every new column is nullable and means "made by the owner or an administrator" when NULL,
which is what every row written by the previous release is: it lets no share holder grant.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('tunnel_shares', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_grantee_id', sa.String(length=40), nullable=True))

    with op.batch_alter_table('share_links', schema=None) as batch_op:
        batch_op.add_column(sa.Column('creator_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('parent_grantee_id', sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('share_links', schema=None) as batch_op:
        batch_op.drop_column('parent_grantee_id')
        batch_op.drop_column('creator_id')

    with op.batch_alter_table('tunnel_shares', schema=None) as batch_op:
        batch_op.drop_column('parent_grantee_id')
