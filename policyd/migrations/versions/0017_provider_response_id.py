"""provider response id: the response the provider stored for a request (the Responses API's), kept so that
whose each stored response is can be found once Redis no longer holds it (and a rebuild knows it again)

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-24 18:20:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('provider_response_id', sa.String(length=256), server_default='', nullable=False))
        batch_op.create_index(batch_op.f('ix_usage_records_provider_response_id'), ['provider_response_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_usage_records_provider_response_id'))
        batch_op.drop_column('provider_response_id')
