"""an explicit cache's storage (Gemini's cachedContents): its tokens x the seconds it is set to live, charged at
cache_storage per 1M token-hours

Records and rollups from before hold none: 0 is their figure, so no rollup is rebuilt.

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-06 11:20:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0031'
down_revision = '0030'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('usage_records', 'usage_rollups'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('cache_storage_token_seconds', sa.BigInteger(), server_default='0',
                                          nullable=False))


def downgrade() -> None:
    for table in ('usage_rollups', 'usage_records'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('cache_storage_token_seconds')
