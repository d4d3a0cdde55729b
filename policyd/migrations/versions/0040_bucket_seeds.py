"""bucket seeds: what a limit that began to bind mid-window (a policy's new plan limit or cap, a key moved to a
plan with one) counted from, the use before it

Revision ID: 0040
Revises: 0039
Create Date: 2026-12-07 09:20:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0040'
down_revision = '0039'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'bucket_seeds',
        sa.Column('bucket_key', sa.String(length=512), nullable=False),
        sa.Column('amount', sa.BigInteger(), nullable=False),
        sa.Column('made_ms', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('bucket_key'),
    )


def downgrade() -> None:
    op.drop_table('bucket_seeds')
