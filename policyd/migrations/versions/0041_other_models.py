"""what parts of a record's cost other models ran (an Anthropic reply's usage.iterations at other models than
the one served: an advisor's calls, a server-side fallback's declined attempts): reconciled under each

Records from before hold none: {} is their figure.

Revision ID: 0041
Revises: 0040
Create Date: 2026-12-07 12:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0041'
down_revision = '0040'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('other_models', sa.JSON(), server_default='{}', nullable=False))
        batch_op.add_column(sa.Column('other_models_cost_nanos', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('other_models_cost_nanos')
        batch_op.drop_column('other_models')
