"""webhook custom headers sealed at rest

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 02:00:00.000000

Compatibility: the code of the previous release must keep working against the schema
this migration produces (rolling deploys run both at once). Add columns as nullable or
with a server default, backfill in a later release, never rename or drop in one step.

``webhooks.sealed_headers`` (nullable) holds an endpoint's custom headers sealed with
AES-256-GCM under ``TP_SECRETS_KEY``, bound to the row. The migration cannot seal (it has no
key): the server reads both forms, seals the plaintext ``headers`` of existing rows when it
starts, and from then on writes ``{}`` to ``headers``. During a rolling deploy a replica of
the previous release still works against this schema; it sees ``{}`` for rows the new
release wrote, so its deliveries to those endpoints go without their custom headers (a
receiver that insists answers 4xx and the delivery is retried, by then on the new release).
The ``headers`` column stays until a later release drops it. Downgrading drops the sealed
headers (the migration has no key to open them).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('webhooks') as batch:
        batch.add_column(sa.Column('sealed_headers', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('webhooks') as batch:
        batch.drop_column('sealed_headers')
