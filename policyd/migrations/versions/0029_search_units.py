"""search units: a rerank's (Cohere's, Bedrock's rerankers), billed per query of up to 100 document chunks

Records and rollups from before hold none: 0 is their figure, so no rollup is rebuilt.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-06 07:10:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0029'
down_revision = '0028'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('usage_records', 'usage_rollups'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('search_units', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    for table in ('usage_rollups', 'usage_records'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('search_units')
