"""The FHIR R4 Observation carrying the HER2-low likelihood (notes/fhir-and-review.md).

Built as a fhir.resources R4B model (R4B Observation equals R4) so structure is checked when the
prediction is computed; the hook later only sets ``subject``. The code is a local concept, never a
HER2 LOINC pathology code, so an EHR cannot file the estimate as a lab result. AI transparency:
``meta.security`` AIAST (HL7 AI Transparency on FHIR) and a contained Device for the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.observation import Observation

from her2low.core.enums import LabelledEnum
from models import schema as feature_schema
from models.contract import Laterality
from models.prediction import ModelVariant, Prediction

LOCAL_SYSTEM = "urn:her2low:codes"
LOCAL_VALUE_SYSTEM = "urn:her2low:descriptor-values"
PREDICTION_ID_SYSTEM = "urn:her2low:prediction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
DICOM_UID_SYSTEM = "urn:dicom:uid"
NOTE_ESTIMATE = "Statistical estimate — confirm HER2 status by IHC/ISH."
NOTE_REFERENCE = "Reference model, not clinically validated."

# DICOM CID 7272/7263 parameter codes for the mean of each map in the ROI. Kapp is the apparent
# kurtosis coefficient (113206) of the trace-weighted DKI fit, not the tensor mean kurtosis.
_DCM_MAP_CODES: dict[str, tuple[str, str]] = {
    "adc": ("113041", "Apparent Diffusion Coefficient"),
    "dapp": ("113294", "Kurtosis Diffusion Coefficient"),
    "kapp": ("113206", "Apparent Kurtosis Coefficient"),
}


#: DICOM laterality → SNOMED CT body structure (FHIR bodySite).
BODY_SITE: dict[Laterality, dict[str, str]] = {
    Laterality.LEFT: {"system": SNOMED, "code": "80248007", "display": "Left breast structure"},
    Laterality.RIGHT: {"system": SNOMED, "code": "73056007", "display": "Right breast structure"},
}


class Interpretation(LabelledEnum):
    """Local interpretation of the likelihood against the model's operating threshold."""

    AT_OR_ABOVE = "at-or-above-threshold", "HER2-low likelihood at or above the operating threshold"
    BELOW = "below-threshold", "HER2-low likelihood below the operating threshold"


def fhir_instant(value: datetime) -> str:
    """FHIR instant/dateTime in UTC with seconds and ``Z`` (four-digit year also before 1000:
    ``strftime("%Y")`` writes year 1 as ``1``, which FHIR refuses)."""
    utc = value.astimezone(UTC).replace(microsecond=0, tzinfo=None)
    return utc.isoformat(timespec="seconds") + "Z"


def _percent(fraction: float) -> dict[str, Any]:
    return {"value": round(fraction * 100.0, 1), "unit": "%", "system": UCUM, "code": "%"}


def _feature_component(name: str, value: float) -> dict[str, Any]:
    spec = feature_schema.FEATURES[name]
    codings: list[dict[str, str]] = [{"system": LOCAL_SYSTEM, "code": name, "display": spec.label}]
    map_name, _, stat = name.partition("_")
    if stat == "mean" and map_name in _DCM_MAP_CODES:
        code, display = _DCM_MAP_CODES[map_name]
        codings.append({"system": DCM, "code": code, "display": display})
    unit = spec.unit or "1"
    return {
        "code": {"coding": codings, "text": f"{spec.label} in the tumour ROI"},
        "valueQuantity": {
            "value": float(f"{value:.6g}"),
            "unit": unit,
            "system": UCUM,
            "code": unit,
        },
    }


def _descriptor_component(name: str, value: str) -> dict[str, Any]:
    spec = feature_schema.FEATURES[name]
    labels = dict(zip(spec.values, spec.value_labels, strict=True))
    return {
        "code": {"coding": [{"system": LOCAL_SYSTEM, "code": name, "display": spec.label}]},
        "valueCodeableConcept": {
            "coding": [
                {
                    "system": LOCAL_VALUE_SYSTEM,
                    "code": f"{name}.{value}",
                    "display": labels.get(value, value),
                }
            ],
            "text": labels.get(value, value),
        },
    }


def build_observation(
    *,
    prediction: Prediction,
    prediction_key: str,
    status: str,
    study_instance_uid: str,
    acquired_at: datetime,
    computed_at: datetime,
    laterality: str | None,
    features: Mapping[str, float | None],
    descriptors: Mapping[str, str],
    patient_reference: str | None = None,
) -> dict[str, Any]:
    """The Observation as FHIR JSON (validated by fhir.resources R4B, empty values omitted)."""
    interpretation = (
        Interpretation.AT_OR_ABOVE if prediction.above_threshold else Interpretation.BELOW
    )
    uses_dki = prediction.variant in (ModelVariant.COMBINED, ModelVariant.QUANTITATIVE)
    method: dict[str, Any] = {
        "text": f"{prediction.model_name} {prediction.model_version}, "
        f"{prediction.variant.value} logistic model"
    }
    if uses_dki:
        method["coding"] = [
            {"system": DCM, "code": "113252", "display": "Kurtosis diffusion model"}
        ]
    device: dict[str, Any] = {
        "resourceType": "Device",
        "id": "model",
        "identifier": [{"system": "urn:her2low:onnx-sha256", "value": prediction.onnx_sha256}],
        "deviceName": [{"name": prediction.model_name, "type": "model-name"}],
        "type": {"text": "Statistical (logistic regression) model, ONNX"},
        "version": [
            {"type": {"text": "model version"}, "value": prediction.model_version},
            {"type": {"text": "ONNX SHA-256"}, "value": prediction.onnx_sha256},
        ],
    }
    if prediction.reference:
        device["note"] = [{"text": NOTE_REFERENCE}]
    used = set(prediction.inputs_used)
    components = [
        _feature_component(name, float(value))
        for name, value in features.items()
        if name in used and value is not None and math.isfinite(float(value))
    ]
    components += [
        _descriptor_component(name, value) for name, value in descriptors.items() if name in used
    ]
    notes = [{"text": NOTE_ESTIMATE}]
    if prediction.reference:
        notes.append({"text": NOTE_REFERENCE})
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "meta": {
            "security": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                    "code": "AIAST",
                    "display": "Artificial Intelligence asserted",
                }
            ]
        },
        "contained": [device],
        "identifier": [{"system": PREDICTION_ID_SYSTEM, "value": prediction_key}],
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                        "display": "Imaging",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": LOCAL_SYSTEM,
                    "code": "her2-low-likelihood-mri",
                    "display": "HER2-low likelihood predicted from breast MRI",
                }
            ],
            "text": "HER2-low likelihood predicted from breast MRI (statistical estimate)",
        },
        "effectiveDateTime": fhir_instant(acquired_at),
        "issued": fhir_instant(computed_at),
        "valueQuantity": _percent(prediction.probability),
        "interpretation": [
            {
                "coding": [
                    {
                        "system": LOCAL_SYSTEM,
                        "code": interpretation.value,
                        "display": interpretation.display,
                    }
                ],
                "text": f"{interpretation.display} ({prediction.threshold * 100:.0f}%)",
            }
        ],
        "referenceRange": [
            {"high": _percent(prediction.threshold), "text": "operating threshold of the model"}
        ],
        "method": method,
        "device": {
            "reference": "#model",
            "display": f"{prediction.model_name} {prediction.model_version}",
        },
        "derivedFrom": [
            {
                "type": "ImagingStudy",
                "identifier": {
                    "system": DICOM_UID_SYSTEM,
                    "value": f"urn:oid:{study_instance_uid}",
                },
                "display": "Breast MRI study",
            }
        ],
        "note": notes,
    }
    if patient_reference:
        resource["subject"] = {"reference": patient_reference}
    if laterality:
        resource["bodySite"] = {"coding": [dict(BODY_SITE[Laterality(laterality)])]}
    if components:
        resource["component"] = components
    return Observation.model_validate(resource).model_dump(mode="json", exclude_none=True)


def with_subject(
    observation: Mapping[str, Any], patient_id: str, imaging_study_id: str | None
) -> dict[str, Any]:
    """A copy of a prepared Observation for one patient (and the EHR's ImagingStudy id if known)."""
    resource = dict(observation)
    resource["subject"] = {"reference": f"Patient/{patient_id}"}
    if imaging_study_id:
        derived = [dict(d) for d in resource.get("derivedFrom", [])]
        if derived:
            derived[0]["reference"] = f"ImagingStudy/{imaging_study_id}"
            resource["derivedFrom"] = derived
    return resource
