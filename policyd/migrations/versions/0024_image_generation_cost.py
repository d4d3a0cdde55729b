"""the image_generation tool's cost, part of a record's cost: reconciled under the image model

Records from before hold none: 0 is their figure.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-04 23:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('image_generation_cost_nanos', sa.BigInteger(), server_default='0',
                                      nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('image_generation_cost_nanos')
