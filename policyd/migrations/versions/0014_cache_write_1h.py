"""an hour's cache writes: the part of a request's cache writes kept an hour, priced apart

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-24 07:58:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cache_write_1h_input_tokens', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('cache_write_1h_input_tokens')
