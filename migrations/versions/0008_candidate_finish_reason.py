"""candidates.finish_reason: whether a candidate reply ended by itself or was cut at its token budget

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('candidates') as batch:
        batch.add_column(sa.Column('finish_reason', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('candidates') as batch:
        batch.drop_column('finish_reason')
