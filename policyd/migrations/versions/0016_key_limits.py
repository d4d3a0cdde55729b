"""key limits: a key's own limits (budgets, rate limits) beside its plan's

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-24 09:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('limits', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('limits')
