"""end user records index: an end user's records in a window found by (customer, end user, created), so a limit
given one end user mid-window starts from its own records, not a scan of its customer's; the index on the customer
alone goes (ix_usage_customer_created begins with it)

Revision ID: 0036
Revises: 0035
Create Date: 2026-12-07 01:10:00.000000
"""
from alembic import op


revision = '0036'
down_revision = '0035'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.create_index('ix_usage_customer_end_user_created', ['customer_id', 'end_user_id', 'created_ms'],
                              unique=False)
        batch_op.drop_index('ix_usage_records_customer_id')


def downgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.create_index('ix_usage_records_customer_id', ['customer_id'], unique=False)
        batch_op.drop_index('ix_usage_customer_end_user_created')
