"""Validation at the edge: CDS Hooks 2.0.1 requests, feedback, results API and descriptors.

Everything that enters the service passes one of these functions and comes out typed, or is
refused with an ApiError whose OperationOutcome names the offending element. Bodies are read
by ``cds_service.request_json.read_json`` (size, type, depth, surrogates, strict numbers) first.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)
from pydantic.alias_generators import to_camel

from cds_service.errors import ApiError, IssueType
from cds_service.request_json import parse_json as parse_json  # re-exported (benchmarks)
from cds_service.request_json import parse_timestamp
from models import schema as feature_schema
from models.contract import ExportReport, ResultPayload

_FHIR_ID = r"^[A-Za-z0-9\-\.]{1,64}$"
_USER_REF = r"^(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-\.]{1,64}$"


class HookId(StrEnum):
    """Hooks this service answers (CDS Hooks 2.0.1 hook names)."""

    PATIENT_VIEW = "patient-view"


class FeedbackOutcome(StrEnum):
    """CDS Hooks 2.0.1 §Feedback outcome values."""

    ACCEPTED = "accepted"
    OVERRIDDEN = "overridden"


def _as_api_error(exc: ValidationError, status: int) -> ApiError:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("__root__", "[key]"))
    kind = IssueType.REQUIRED if err.get("type") == "missing" else IssueType.INVALID
    message = err.get("msg", "invalid")
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return ApiError(status, f"{loc or 'body'}: {message}", code=kind, expression=loc or None)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class _Camel(_Strict):
    """CDS Hooks JSON is camelCase; Python attributes are snake_case."""

    model_config = ConfigDict(
        strict=True, extra="allow", frozen=True, alias_generator=to_camel, populate_by_name=True
    )


# --- CDS Hooks service request (CDS Hooks 2.0.1 §HTTP Request) -----------------------------


class FhirAuthorization(_Strict):
    """``fhirAuthorization``: an OAuth 2.0 bearer token for ``fhirServer``. Never logged."""

    access_token: Annotated[str, StringConstraints(min_length=1)]
    token_type: Literal["Bearer"]
    expires_in: int = Field(gt=0)
    scope: Annotated[str, StringConstraints(min_length=1)]
    subject: Annotated[str, StringConstraints(min_length=1)]
    patient: Annotated[str, StringConstraints(pattern=_FHIR_ID)] | None = None


class PatientViewContext(_Camel):
    """patient-view context: ``userId``, ``patientId`` required, ``encounterId`` optional."""

    user_id: Annotated[str, StringConstraints(pattern=_USER_REF)]
    patient_id: Annotated[str, StringConstraints(pattern=_FHIR_ID)]
    encounter_id: Annotated[str, StringConstraints(pattern=_FHIR_ID)] | None = None


class HookRequest(_Camel):
    hook: str
    hook_instance: Annotated[
        str,
        StringConstraints(
            pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
        ),
    ]
    context: PatientViewContext
    fhir_server: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")] | None = None
    fhir_authorization: FhirAuthorization | None = None
    prefetch: dict[str, Any] | None = None

    @field_validator("hook")
    @classmethod
    def _known_hook(cls, value: str) -> str:
        if value != HookId.PATIENT_VIEW.value:
            raise ValueError(f"this service answers {HookId.PATIENT_VIEW.value!r}, not {value!r}")
        return value


def parse_hook_request(body: dict[str, Any]) -> HookRequest:
    try:
        parsed = HookRequest.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc, 400) from None
    if parsed.fhir_authorization is not None and parsed.fhir_server is None:
        raise ApiError(400, "fhirAuthorization requires fhirServer", expression="fhirServer")
    return parsed


# --- feedback (CDS Hooks 2.0.1 §Feedback) --------------------------------------------------


class Coding(_Strict):
    system: str | None = None
    code: str | None = None
    display: str | None = None


class OverrideReason(_Camel):
    reason: Coding | None = None
    user_comment: str | None = None


class AcceptedSuggestion(_Strict):
    id: Annotated[str, StringConstraints(min_length=1, max_length=64)]


class FeedbackItem(_Camel):
    card: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    outcome: FeedbackOutcome
    outcome_timestamp: datetime
    accepted_suggestions: list[AcceptedSuggestion] | None = None
    override_reason: OverrideReason | None = None

    model_config = ConfigDict(
        strict=False, extra="allow", frozen=True, alias_generator=to_camel, populate_by_name=True
    )

    @field_validator("override_reason", mode="before")
    @classmethod
    def _lenient_reason(cls, value: Any) -> Any:
        """Older drafts sent a flat Coding (``{code, system, display}``) or a bare string."""
        if isinstance(value, str):
            return {"reason": {"code": value}}
        flat = isinstance(value, dict) and not {"reason", "userComment"} & value.keys()
        if flat and {"code", "system", "display"} & value.keys():
            return {"reason": value}
        return value

    @field_validator("outcome_timestamp", mode="before")
    @classmethod
    def _timestamp(cls, value: Any) -> datetime:
        """ISO 8601, in range once converted to UTC (``9999-12-31T23:59:59-23:59`` is not)."""
        return parse_timestamp(value)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    feedback: list[FeedbackItem] = Field(min_length=1, max_length=100)


def parse_feedback(body: dict[str, Any]) -> FeedbackRequest:
    try:
        return FeedbackRequest.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc, 400) from None


# --- results API (docs/results-api.md) ------------------------------------------------------


def parse_result(body: dict[str, Any]) -> ResultPayload:
    """A results-API body validated by the contract class the node built it with (422 if not)."""
    try:
        return ResultPayload.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc, 422) from None


def parse_export_report(body: dict[str, Any]) -> ExportReport:
    """``PUT /api/v1/exports`` validated by the contract class the node built it with (422)."""
    try:
        return ExportReport.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc, 422) from None


# --- descriptors (models.schema is the vocabulary) -----------------------------------------


class DescriptorPayload(BaseModel):
    """``PUT /api/v1/cases/<id>/descriptors`` body."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    values: dict[str, str | None]
    roi_confirmed: bool = False
    entered_by: Annotated[str, StringConstraints(min_length=1, max_length=128)]


def validate_descriptor_values(values: dict[str, Any]) -> dict[str, str]:
    """Check descriptors against models.schema; returns only the entered values (lower case).

    Raises FeatureValidationError naming the descriptor.
    """
    names = set(feature_schema.DESCRIPTOR_NAMES)
    for name in values:
        if name not in names:
            raise feature_schema.FeatureValidationError(name, "not a descriptor")
    checked = feature_schema.validate_inputs(values, features=feature_schema.DESCRIPTOR_NAMES)
    return {k: str(v) for k, v in checked.items() if feature_schema.is_present(v)}


def parse_descriptors(body: dict[str, Any]) -> tuple[dict[str, str], bool, str]:
    try:
        payload = DescriptorPayload.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc, 422) from None
    try:
        values = validate_descriptor_values(payload.values)
    except feature_schema.FeatureValidationError as exc:
        raise ApiError(
            422, str(exc), code=IssueType.VALUE, expression=f"values.{exc.feature}"
        ) from None
    return values, payload.roi_confirmed, payload.entered_by
