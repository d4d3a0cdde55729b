"""refunds: what of a request's charge was given back, and when

Records from before hold none: 0 is their figure (and the rollups', a report figure).

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-05 18:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('refunded_nanos', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('refunded_ms', sa.BigInteger(), server_default='0', nullable=False))
    with op.batch_alter_table('usage_rollups', schema=None) as batch_op:  # a report figure
        batch_op.add_column(sa.Column('refunded_nanos', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('usage_rollups', schema=None) as batch_op:
        batch_op.drop_column('refunded_nanos')
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('refunded_ms')
        batch_op.drop_column('refunded_nanos')
