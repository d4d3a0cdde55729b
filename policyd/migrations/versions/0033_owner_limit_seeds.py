"""owner limit seeds: what an owner had used in a bucket's window before its limit was made, kept with the limit
(written into the bucket; the audit and a rebuild add it to what the records imply)

Limits from before hold none: their buckets counted from their making.

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-06 17:40:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0033'
down_revision = '0032'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('owner_limits', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seeds', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('owner_limits', schema=None) as batch_op:
        batch_op.drop_column('seeds')
