"""end user paused: an end user of a customer whose requests are refused (end_user_paused) until resumed, its own
limits kept

Revision ID: 0037
Revises: 0036
Create Date: 2026-12-07 01:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0037'
down_revision = '0036'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('owner_limits', schema=None) as batch_op:
        batch_op.add_column(sa.Column('paused', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('owner_limits', schema=None) as batch_op:
        batch_op.drop_column('paused')
