"""end user limits: the fingerprint of a customer's end users' own limits (owner_limits rows of scope end_user) on
each of its keys, part of the key's terms

Keys from before carry none: their customers' end users have none.

Revision ID: 0035
Revises: 0034
Create Date: 2026-12-06 19:50:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0035'
down_revision = '0034'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('end_user_limits', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('end_user_limits')
