"""limit resets: a limit's current window forgiven by an operator (what its bucket had counted of settled requests,
taken out of it; the audit and a rebuild take it out of what the records imply too)

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-06 19:10:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0034'
down_revision = '0033'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('limit_resets',
                    sa.Column('id', sa.String(length=64), nullable=False),
                    sa.Column('customer_id', sa.String(length=128), nullable=False),
                    sa.Column('bucket_key', sa.String(length=512), nullable=False),
                    sa.Column('label', sa.String(length=256), nullable=False),
                    sa.Column('unit', sa.String(length=16), nullable=False),
                    sa.Column('amount', sa.BigInteger(), nullable=False),
                    sa.Column('reason', sa.String(length=512), nullable=False),
                    sa.Column('created_ms', sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint('id'))
    op.create_index('ix_limit_resets_customer_id', 'limit_resets', ['customer_id'])
    op.create_index('ix_limit_resets_bucket_key', 'limit_resets', ['bucket_key'])


def downgrade() -> None:
    op.drop_index('ix_limit_resets_bucket_key', table_name='limit_resets')
    op.drop_index('ix_limit_resets_customer_id', table_name='limit_resets')
    op.drop_table('limit_resets')
