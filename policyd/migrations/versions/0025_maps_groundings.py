"""prompts grounded with Google Maps (Gemini's googleMaps tool), billed per prompt

Records and rollups from before hold none: 0 is their figure, so no rollup is rebuilt.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-04 23:45:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('usage_records', 'usage_rollups'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('maps_groundings', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    for table in ('usage_rollups', 'usage_records'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('maps_groundings')
