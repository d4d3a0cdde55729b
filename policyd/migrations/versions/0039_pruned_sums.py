"""pruned sums: what deleted usage records still count for (a lifetime budget's holds, an expiring grant's
consumption), kept when record retention deletes them

Revision ID: 0039
Revises: 0038
Create Date: 2026-12-07 06:10:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0039'
down_revision = '0038'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'pruned_sums',
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('key', sa.String(length=512), nullable=False),
        sa.Column('amount', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('kind', 'key'),
    )


def downgrade() -> None:
    op.drop_table('pruned_sums')
