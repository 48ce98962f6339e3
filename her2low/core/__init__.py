"""The floor both components stand on: settings, structured logs, database engines and migrations.

Imports neither ``dicom_node`` nor ``cds_service`` (an import-linter contract checks it), so the
node and the service can each be installed and started without the other.
"""
