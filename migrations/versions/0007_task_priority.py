"""ranking_tasks.priority and priority_reason: the Rank tab serves first the tasks a ranking teaches most

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ranking_tasks') as batch:
        batch.add_column(sa.Column('priority', sa.Float(), nullable=True))
        batch.add_column(sa.Column('priority_reason', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('ranking_tasks') as batch:
        batch.drop_column('priority_reason')
        batch.drop_column('priority')
