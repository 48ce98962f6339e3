"""exports: result objects queued for DICOM destinations, with retry state

Revision ID: 0003_exports
Revises: 0001
Create Date: 2026-12-01 10:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003_exports'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('exports',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('batch_key', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('source_series_uid', sa.String(length=64), nullable=False),
    sa.Column('paths', sa.Text(), nullable=False),
    sa.Column('state', sa.Enum('PENDING', 'SENDING', 'DONE', 'DEAD', name='exportstate', native_enum=False, length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.Float(), nullable=False),
    sa.Column('lease_expires_at', sa.Float(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.Column('sent_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('destination', 'batch_key')
    )
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_exports_destination'), ['destination'], unique=False)
        batch_op.create_index(batch_op.f('ix_exports_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_exports_source_series_uid'), ['source_series_uid'], unique=False)
        batch_op.create_index(batch_op.f('ix_exports_state'), ['state'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_exports_state'))
        batch_op.drop_index(batch_op.f('ix_exports_source_series_uid'))
        batch_op.drop_index(batch_op.f('ix_exports_next_attempt_at'))
        batch_op.drop_index(batch_op.f('ix_exports_destination'))

    op.drop_table('exports')
