"""the Responses API's image_generation tool: the image model that priced its images and its usage

Records and rollups from before hold none: 0 (and no model) is their figure, so no rollup is rebuilt.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-04 23:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None

FIGURES = ('image_generation_calls', 'image_generation_input_tokens', 'image_generation_cached_input_tokens',
           'image_generation_image_input_tokens', 'image_generation_output_tokens')


def upgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('image_model', sa.String(length=256), server_default='', nullable=False))
    for table in ('usage_records', 'usage_rollups'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name in FIGURES:
                batch_op.add_column(sa.Column(name, sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    for table in ('usage_rollups', 'usage_records'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name in reversed(FIGURES):
                batch_op.drop_column(name)
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('image_model')
