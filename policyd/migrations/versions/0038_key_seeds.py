"""key seeds: what a key had used in a window before its own limit of that window was made (its bucket's seed, as
an owner's), for the audit and a rebuild

Revision ID: 0038
Revises: 0037
Create Date: 2026-12-07 03:50:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0038'
down_revision = '0037'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seeds', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('seeds')
