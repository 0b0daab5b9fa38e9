"""stream time in daily usage

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 10:05:45.286778

Compatibility: the code of the previous release must keep working against the schema
this migration produces (rolling deploys run both at once). Add columns as nullable or
with a server default, backfill in a later release, never rename or drop in one step.

``tunnel_usage.stream_milliseconds``: how long the requests counted were open, added up.
A new column with a server default (0): the previous release, which does not write it,
keeps working; days counted before it read as 0 s.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('tunnel_usage', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stream_milliseconds', sa.BigInteger(), server_default='0', nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('tunnel_usage', schema=None) as batch_op:
        batch_op.drop_column('stream_milliseconds')

