"""hosted containers: those a request may make (then those charged) and the memory limit they are priced at

Records and rollups from before hold none: 0 (and no memory) is their figure, so no rollup is rebuilt.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-04 23:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('container_memory', sa.String(length=16), server_default='', nullable=False))
    for table in ('usage_records', 'usage_rollups'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('containers', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    for table in ('usage_rollups', 'usage_records'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('containers')
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('container_memory')
