"""remember which chat prompts were turned into tasks, and tasks given up on

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ranking_state', sa.String(length=16), nullable=True))
    with op.batch_alter_table('ranking_tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('skipped_reason', sa.Text(), nullable=True))
    # Prompts that already became tasks must not be looked at again.
    op.execute("UPDATE messages SET ranking_state = 'task' WHERE id IN "
               "(SELECT source_message_id FROM ranking_tasks WHERE source_message_id IS NOT NULL)")


def downgrade() -> None:
    with op.batch_alter_table('ranking_tasks', schema=None) as batch_op:
        batch_op.drop_column('skipped_reason')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('ranking_state')
