"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-25 13:07:08.020134
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=256), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('result_id', sa.String(length=36), nullable=True),
    sa.Column('detail', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_audit_result', 'audit', ['result_id'], unique=False)
    op.create_table('feedback',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('card_uuid', sa.String(length=64), nullable=False),
    sa.Column('result_id', sa.String(length=36), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('accepted_suggestions', sa.JSON(), nullable=True),
    sa.Column('override_reason', sa.JSON(), nullable=True),
    sa.Column('user_comment', sa.Text(), nullable=True),
    sa.Column('outcome_timestamp', sa.DateTime(timezone=True), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('card_uuid', 'outcome', 'outcome_timestamp', name='uq_feedback')
    )
    op.create_index('ix_feedback_result', 'feedback', ['result_id'], unique=False)
    op.create_table('jti_replay',
    sa.Column('iss', sa.String(length=255), nullable=False),
    sa.Column('jti', sa.String(length=255), nullable=False),
    sa.Column('exp', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('iss', 'jti')
    )
    op.create_index(op.f('ix_jti_replay_exp'), 'jti_replay', ['exp'], unique=False)
    op.create_table('results',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('pipeline_version', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_issuer', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('accession_number', sa.String(length=64), nullable=True),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('laterality', sa.String(length=1), nullable=True),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('review_flag', sa.String(length=64), nullable=True),
    sa.Column('observation_override', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('series_instance_uid', 'pipeline_version', name='uq_results_series_pipeline')
    )
    op.create_index('ix_results_patient', 'results', ['patient_issuer', 'patient_id'], unique=False)
    op.create_index('ix_results_study', 'results', ['study_instance_uid'], unique=False)
    op.create_table('descriptors',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('result_id', sa.String(length=36), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('entered_by', sa.String(length=128), nullable=False),
    sa.Column('entered_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('values', sa.JSON(), nullable=False),
    sa.Column('roi_confirmed', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['result_id'], ['results.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('result_id', 'version', name='uq_descriptor_version')
    )
    op.create_table('predictions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('result_id', sa.String(length=36), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('descriptors_version', sa.Integer(), nullable=True),
    sa.Column('prediction', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('probability', sa.Float(), nullable=True),
    sa.Column('card_uuid', sa.String(length=36), nullable=False),
    sa.Column('observation', sa.JSON(), nullable=True),
    sa.Column('observation_status', sa.String(length=32), nullable=False),
    sa.Column('basis', sa.JSON(), nullable=True),
    sa.Column('computed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['result_id'], ['results.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('card_uuid')
    )
    op.create_index('ix_predictions_result', 'predictions', ['result_id', 'id'], unique=False)
    op.create_table('result_revisions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('result_id', sa.String(length=36), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('accession_number', sa.String(length=64), nullable=True),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('laterality', sa.String(length=1), nullable=True),
    sa.Column('features', sa.JSON(), nullable=False),
    sa.Column('provenance', sa.JSON(), nullable=False),
    sa.Column('previews', sa.JSON(), nullable=True),
    sa.Column('payload_sha256', sa.String(length=64), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['result_id'], ['results.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('result_id', 'revision', name='uq_revision')
    )


def downgrade() -> None:
    op.drop_table('result_revisions')
    op.drop_index('ix_predictions_result', table_name='predictions')
    op.drop_table('predictions')
    op.drop_table('descriptors')
    op.drop_index('ix_results_study', table_name='results')
    op.drop_index('ix_results_patient', table_name='results')
    op.drop_table('results')
    op.drop_index(op.f('ix_jti_replay_exp'), table_name='jti_replay')
    op.drop_table('jti_replay')
    op.drop_index('ix_feedback_result', table_name='feedback')
    op.drop_table('feedback')
    op.drop_index('ix_audit_result', table_name='audit')
    op.drop_table('audit')
