"""proxies, config revisions and scaling events

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 09:47:45.905415

Compatibility: the code of the previous release must keep working against the schema
this migration produces (rolling deploys run both at once). Add columns as nullable or
with a server default, backfill in a later release, never rename or drop in one step.

New tables only (users' proxies, their config revisions and scaling events): the previous
release does not read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from server.storage.tables import UTCDateTime


revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('proxies',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('user_id', sa.String(length=40), nullable=False),
    sa.Column('display_name', sa.String(length=255), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('state_reason', sa.String(length=300), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('config_version', sa.Integer(), nullable=False),
    sa.Column('desired_instances', sa.Integer(), nullable=False),
    sa.Column('instances', sa.JSON(), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('create_time', UTCDateTime(timezone=True), nullable=False),
    sa.Column('update_time', UTCDateTime(timezone=True), nullable=False),
    sa.Column('state_time', UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_active_time', UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_proxies_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_proxies')),
    sa.UniqueConstraint('user_id', 'request_id', name=op.f('uq_proxies_user_id_request_id'))
    )
    with op.batch_alter_table('proxies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_proxies_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_proxies_user_id_create_time_id'), ['user_id', 'create_time', 'id'], unique=False)

    op.create_table('proxy_config_revisions',
    sa.Column('proxy_id', sa.String(length=40), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('actor', sa.String(length=100), nullable=False),
    sa.Column('restored_version', sa.Integer(), nullable=False),
    sa.Column('create_time', UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['proxy_id'], ['proxies.id'], name=op.f('fk_proxy_config_revisions_proxy_id_proxies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('proxy_id', 'version', name=op.f('pk_proxy_config_revisions'))
    )
    op.create_table('proxy_scaling_events',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('proxy_id', sa.String(length=40), nullable=False),
    sa.Column('trigger', sa.String(length=20), nullable=False),
    sa.Column('from_instances', sa.Integer(), nullable=False),
    sa.Column('to_instances', sa.Integer(), nullable=False),
    sa.Column('applied', sa.Boolean(), nullable=False),
    sa.Column('reason', sa.String(length=300), nullable=False),
    sa.Column('cpu_percent', sa.Float(), nullable=False),
    sa.Column('streams', sa.Integer(), nullable=False),
    sa.Column('actor', sa.String(length=100), nullable=False),
    sa.Column('create_time', UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['proxy_id'], ['proxies.id'], name=op.f('fk_proxy_scaling_events_proxy_id_proxies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_proxy_scaling_events'))
    )
    with op.batch_alter_table('proxy_scaling_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_proxy_scaling_events_proxy_id_create_time'), ['proxy_id', 'create_time'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('proxy_scaling_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_proxy_scaling_events_proxy_id_create_time'))

    op.drop_table('proxy_scaling_events')
    op.drop_table('proxy_config_revisions')
    with op.batch_alter_table('proxies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_proxies_user_id_create_time_id'))
        batch_op.drop_index(batch_op.f('ix_proxies_state'))

    op.drop_table('proxies')
