"""reservation facts: what an open reservation keeps beside its record, for a rebuild of the counters

Records from before hold none: a rebuild gives theirs the facts it always gave (no estimates).

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-05 20:50:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0027'
down_revision = '0026'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reservation_facts', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('reservation_facts')
