"""export_reports, measurement_reports, sync_state: results kept in step with the service

Per export, what the service was last told of its state (a changed row is reported again, so a
service outage is caught up); every SR the node wrote (original and revisions) for the revised
SR; the assessment poll's cursor.

Revision ID: 0004_export_reports
Revises: 0003_exports
Create Date: 2026-12-01 13:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004_export_reports'
down_revision = '0003_exports'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('export_reports',
    sa.Column('export_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('reported_updated_at', sa.Float(), nullable=False),
    sa.Column('reported_state', sa.String(length=16), nullable=False),
    sa.Column('reported_at', sa.Float(), nullable=False),
    sa.Column('refused', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('export_id')
    )
    op.create_table('measurement_reports',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('source_series_uid', sa.String(length=64), nullable=False),
    sa.Column('pipeline_version', sa.String(length=64), nullable=False),
    sa.Column('original_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sr_series_uid', sa.String(length=64), nullable=False),
    sa.Column('instance_number', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('content_key', sa.Text(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('measurement_reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_measurement_reports_original_uid'), ['original_uid'], unique=False)
        batch_op.create_index(batch_op.f('ix_measurement_reports_source_series_uid'), ['source_series_uid'], unique=False)

    op.create_table('sync_state',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )


def downgrade() -> None:
    op.drop_table('sync_state')
    with op.batch_alter_table('measurement_reports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_measurement_reports_source_series_uid'))
        batch_op.drop_index(batch_op.f('ix_measurement_reports_original_uid'))

    op.drop_table('measurement_reports')
    op.drop_table('export_reports')
