"""blind A/B trials of versions in the chat: trials, turns, and a per-user opt-out

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ab_trials',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('candidate_version_id', sa.Integer(), nullable=True),
    sa.Column('baseline_version_id', sa.Integer(), nullable=True),
    sa.Column('share', sa.Float(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_by', sa.String(length=80), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['candidate_version_id'], ['model_versions.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['baseline_version_id'], ['model_versions.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('ab_turns',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('trial_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('user_message_id', sa.Integer(), nullable=False),
    sa.Column('candidate_message_id', sa.Integer(), nullable=True),
    sa.Column('baseline_message_id', sa.Integer(), nullable=True),
    sa.Column('candidate_version', sa.String(length=120), nullable=False),
    sa.Column('baseline_version', sa.String(length=120), nullable=False),
    sa.Column('left', sa.String(length=16), nullable=False),
    sa.Column('pick', sa.String(length=16), nullable=True),
    sa.Column('picked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['trial_id'], ['ab_trials.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_message_id'], ['messages.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['candidate_message_id'], ['messages.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['baseline_message_id'], ['messages.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('user_message_id')
    )
    op.create_index('ix_ab_turns_trial_id', 'ab_turns', ['trial_id'], unique=False)
    op.create_index('ix_ab_turns_user_id', 'ab_turns', ['user_id'], unique=False)
    # A plain ADD COLUMN: a batch (copy-and-move) of users on SQLite would cascade-delete every
    # conversation through the foreign keys.
    op.add_column('users', sa.Column('ab_opt_out', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_index('ix_ab_turns_user_id', table_name='ab_turns')
    op.drop_index('ix_ab_turns_trial_id', table_name='ab_turns')
    op.drop_column('users', 'ab_opt_out')  # SQLite >= 3.35 drops a column in place
    op.drop_table('ab_turns')
    op.drop_table('ab_trials')
