"""owner limits: the budgets and rate limits an operator gives a customer, or one of its workspaces, projects or
teams, binding every key of theirs; each key carries a copy (api_keys.owner_limits)

Keys from before carry none: their owners have none.

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-06 16:40:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0032'
down_revision = '0031'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('owner_limits',
                    sa.Column('customer_id', sa.String(length=128), nullable=False),
                    sa.Column('scope', sa.String(length=16), nullable=False),
                    sa.Column('owner_id', sa.String(length=128), nullable=False),
                    sa.Column('limits', sa.JSON(), nullable=False),
                    sa.Column('updated_ms', sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint('customer_id', 'scope', 'owner_id'))
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner_limits', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('owner_limits')
    op.drop_table('owner_limits')
