"""a search context fee's size (per_search_context: Perplexity's Sonar models, OpenAI's search models) and reasoning
billed beside the output at its own price (reasoning_output: Perplexity's reasoning_tokens)

Records and rollups from before hold neither: "" and 0 are their figures, so no rollup is rebuilt.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-06 09:20:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0030'
down_revision = '0029'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('search_context_size', sa.String(length=16), server_default='', nullable=False))
    for table in ('usage_records', 'usage_rollups'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('reasoning_output_tokens', sa.BigInteger(), server_default='0',
                                          nullable=False))


def downgrade() -> None:
    for table in ('usage_rollups', 'usage_records'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('reasoning_output_tokens')
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_column('search_context_size')
