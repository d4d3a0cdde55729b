"""image input tokens: the part of input_tokens that was images, priced apart (gpt-image-1's edits)

Records and rollups from before hold none: 0 is their figure, so no rollup is rebuilt.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-04 21:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('usage_records', 'usage_rollups'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('image_input_tokens', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    for table in ('usage_rollups', 'usage_records'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('image_input_tokens')
