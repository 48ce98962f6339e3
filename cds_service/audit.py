"""The audit trail's vocabulary: every action the service writes to the ``audit`` table.

One StrEnum instead of bare strings, so a filter or a report can list the actions and a typo in
a writer fails at import rather than producing a row nobody searches for. Values are the strings
stored since the first release (the column stays ``String(64)``); new ones are appended.
"""

from __future__ import annotations

from enum import StrEnum


class AuditAction(StrEnum):
    """What happened (``audit.action``)."""

    # results API (actor: the DICOM node)
    RESULT_CREATED = "result-created"
    RESULT_UNCHANGED = "result-unchanged"
    RESULT_UPDATED = "result-updated"
    IDENTITY_AMBIGUOUS = "identity-ambiguous"  # store.ReviewFlag
    # CDS Hooks calls and feedback (actor: the EHR client)
    CARD_SHOWN = "card-shown"
    DISCORDANCE_DETECTED = "discordance-detected"
    FEEDBACK_ACCEPTED = "feedback-accepted"
    FEEDBACK_OVERRIDDEN = "feedback-overridden"
    # FHIR write-back (writeback.WritebackOutcome)
    FHIR_WRITEBACK_SUCCEEDED = "fhir-writeback-succeeded"
    FHIR_WRITEBACK_FAILED = "fhir-writeback-failed"
    FHIR_WRITEBACK_DROPPED = "fhir-writeback-dropped"
    # review app: accounts
    SIGNED_IN = "signed-in"
    SIGNED_OUT = "signed-out"
    SIGN_IN_REFUSED = "sign-in-refused"
    # review app: cases
    CASE_VIEWED = "case-viewed"
    DESCRIPTORS_ENTERED = "descriptors-entered"
    ROI_CONFIRMED = "roi-confirmed"
    BOARD_CONFIRM = "board-confirm"
    BOARD_AMEND = "board-amend"
    BOARD_ENTERED_IN_ERROR = "board-entered-in-error"
    BOARD_DATE_SET = "board-date-set"
    PATHOLOGY_ENTERED = "pathology-entered"
    PATHOLOGY_RECEIVED = "pathology-received"
    # review app: reading and exporting
    MODEL_CARD_VIEWED = "model-card-viewed"
    CONCORDANCE_VIEWED = "concordance-viewed"
    PACKET_EXPORTED = "packet-exported"
    AUDIT_VIEWED = "audit-viewed"
    AUDIT_EXPORTED = "audit-exported"
    # the service itself
    PREDICTIONS_RECOMPUTED = "predictions-recomputed"

    @classmethod
    def board(cls, decision: str) -> AuditAction:
        """The action of a tumour-board decision (``store.BoardDecision`` value)."""
        return cls(f"board-{decision}")

    @classmethod
    def result(cls, status: str) -> AuditAction:
        """The action of a results-API answer (``store.IngestStatus`` value)."""
        return cls(f"result-{status}")

    @classmethod
    def feedback(cls, outcome: str) -> AuditAction:
        """The action of a CDS Hooks feedback outcome (``schema.FeedbackOutcome`` value)."""
        return cls(f"feedback-{outcome}")


#: Who wrote an event when no person did (``audit.actor``).
SERVICE_ACTOR = "cds-service"
