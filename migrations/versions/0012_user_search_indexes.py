"""user search indexes

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 20:20:00

Compatibility: the code of the previous release must keep working against the schema
this migration produces (rolling deploys run both at once). Add columns as nullable or
with a server default, backfill in a later release, never rename or drop in one step.

Indexes only (the admin's user search at 100,000 users and more: see bench/README.md):
each filterable field with the list's keyset order, the last sign-in time, and, on
PostgreSQL, trigram indexes that serve the substring searches (``email : "x"``, an ILIKE)
of e-mail addresses and display names. ``pg_trgm`` is a trusted extension (PostgreSQL 13
and later): the owner of the database may create it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYSET = ('tier', 'role', 'state')


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        for field in KEYSET:
            batch_op.create_index(f'ix_users_{field}_create_time_id', [field, 'create_time', 'id'], unique=False)
        batch_op.create_index('ix_users_last_login_time', ['last_login_time'], unique=False)
    if op.get_context().dialect.name == 'postgresql':
        op.execute('CREATE EXTENSION IF NOT EXISTS pg_trgm')
        for field in ('email', 'display_name'):
            op.create_index(
                f'ix_users_{field}_trgm', 'users', [field],
                postgresql_using='gin', postgresql_ops={field: 'gin_trgm_ops'},
            )


def downgrade() -> None:
    if op.get_context().dialect.name == 'postgresql':
        for field in ('email', 'display_name'):
            op.drop_index(f'ix_users_{field}_trgm', table_name='users')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_index('ix_users_last_login_time')
        for field in KEYSET:
            batch_op.drop_index(f'ix_users_{field}_create_time_id')
