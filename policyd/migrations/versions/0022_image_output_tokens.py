"""image output tokens: the part of output_tokens that was images, priced apart (Gemini's image models)

Records and rollups from before hold none: 0 is their figure, so no rollup is rebuilt.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-04 22:45:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('usage_records', 'usage_rollups'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('image_output_tokens', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    for table in ('usage_rollups', 'usage_records'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('image_output_tokens')
