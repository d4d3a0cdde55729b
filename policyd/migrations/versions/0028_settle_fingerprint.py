"""settle fingerprint: what a settled request's numbers were, so a rebuild answers a retried Settle

Records from before hold none: a rebuild does not restore their closed reservations (retries of them are
new to Redis, as before).

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-05 22:40:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0028'
down_revision = '0027'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('settle_fingerprint', sa.String(length=64), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('settle_fingerprint')
