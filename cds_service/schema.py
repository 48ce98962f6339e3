"""Validation at the edge: CDS Hooks 2.0.1 requests, feedback, results API and descriptors.

Everything that enters the service passes one of these functions and comes out typed, or is
refused with an ApiError whose OperationOutcome names the offending element. Bodies are parsed
strictly (no NaN/Infinity, an object at the top).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from flask import Request
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
from models import schema as feature_schema

JSON_TYPES = ("application/json", "application/fhir+json")
_UID = r"^[0-9]+(\.[0-9]+)*$"
_FHIR_ID = r"^[A-Za-z0-9\-\.]{1,64}$"
_USER_REF = r"^(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-\.]{1,64}$"

Uid = Annotated[str, StringConstraints(pattern=_UID, max_length=64)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class HookId(StrEnum):
    """Hooks this service answers (CDS Hooks 2.0.1 hook names)."""

    PATIENT_VIEW = "patient-view"


class FeedbackOutcome(StrEnum):
    """CDS Hooks 2.0.1 §Feedback outcome values."""

    ACCEPTED = "accepted"
    OVERRIDDEN = "overridden"


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def parse_json(data: bytes) -> Any:
    """Strict JSON (RFC 8259): NaN and Infinity are refused."""
    return json.loads(data, parse_constant=_reject_constant)


def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, or 415 (not JSON) / 400 (malformed, not an object)."""
    if request.mimetype not in JSON_TYPES:
        raise ApiError(
            415,
            f"Content-Type must be application/json, got {request.mimetype or 'none'}",
            code=IssueType.NOT_SUPPORTED,
        )
    try:
        body = parse_json(request.get_data(cache=True))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}", code=IssueType.STRUCTURE) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code=IssueType.STRUCTURE)
    return body


def _as_api_error(exc: ValidationError, status: int) -> ApiError:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
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

    @field_validator("outcome_timestamp")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    feedback: list[FeedbackItem] = Field(min_length=1, max_length=100)


def parse_feedback(body: dict[str, Any]) -> FeedbackRequest:
    try:
        return FeedbackRequest.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc, 400) from None


# --- results API (docs/results-api.md) ------------------------------------------------------


class PatientKey(_Strict):
    id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    issuer: Annotated[str, StringConstraints(max_length=64)] = ""


class ResultPayload(_Strict):
    """One analysed series as the node publishes it."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    api_version: Literal[1]
    pipeline_version: ShortText
    study_instance_uid: Uid
    series_instance_uid: Uid
    accession_number: Annotated[str, StringConstraints(max_length=64)] | None = None
    patient: PatientKey
    acquired_at: datetime
    laterality: Literal["L", "R"] | None = None
    features: dict[str, float | int | None]
    provenance: dict[str, Any]
    previews: dict[str, str] | None = None

    @field_validator("acquired_at", mode="before")
    @classmethod
    def _parse_time(cls, value: Any) -> datetime:
        if not isinstance(value, str):
            raise ValueError("expected an ISO 8601 date-time string")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an ISO 8601 date-time: {value!r}") from None
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed

    @field_validator("features")
    @classmethod
    def _features(cls, value: dict[str, float | int | None]) -> dict[str, float | int | None]:
        allowed = set(feature_schema.QUANTITATIVE_NAMES)
        for name, number in value.items():
            if name not in allowed:
                raise ValueError(f"features.{name}: unknown feature")
            try:
                feature_schema.validate_value(name, number)
            except feature_schema.FeatureValidationError as exc:
                raise ValueError(f"features.{exc}") from None
        return value

    @field_validator("previews")
    @classmethod
    def _previews(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        for name, data in value.items():
            if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", name):
                raise ValueError(f"previews.{name}: name must be 1-64 of [A-Za-z0-9_-]")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"previews.{name}: not base64") from None
            if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
                raise ValueError(f"previews.{name}: not a PNG image")
        return value


def parse_result(body: dict[str, Any]) -> ResultPayload:
    try:
        return ResultPayload.model_validate(body)
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


def finite(value: float | int | None) -> float | None:
    """A JSON number as float, or None for missing/NaN."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number
