"""rollups and reports sum what providers bill apart: cache writes, audio tokens, images, seconds, searches

The rollups written before lack these figures: the cursor is cleared, so the next pass rebuilds every
hour from the records (as the first pass did at the upgrade that made the rollups).

Revision ID: 0019
Revises: 0018
Create Date: 2026-11-24 22:40:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None

FIGURES = ('cache_write_input_tokens', 'cache_write_1h_input_tokens', 'audio_input_tokens', 'audio_output_tokens',
           'images', 'seconds', 'web_searches', 'file_searches')


def upgrade() -> None:
    with op.batch_alter_table('usage_rollups', schema=None) as batch_op:
        for name in FIGURES:
            batch_op.add_column(sa.Column(name, sa.BigInteger(), server_default='0', nullable=False))
    op.execute("DELETE FROM rollup_cursor WHERE name = 'usage'")


def downgrade() -> None:
    with op.batch_alter_table('usage_rollups', schema=None) as batch_op:
        for name in FIGURES:
            batch_op.drop_column(name)
