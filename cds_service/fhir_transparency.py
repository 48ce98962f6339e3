"""The AI-transparency companions of the HER2-low Observation (FHIR R4, fhir.resources R4B).

Beside the Observation (``fhir.py``) an EHR that files a model estimate needs to know which model
made it, from what, and where its model card is (HL7 AI Transparency on FHIR, STU1 ballot; the
DICOM side of IHE AI Results is the node's SR):

- a **Device** for the model (AI Device profile: ``type`` Artificial-Intelligence, ``aiKind``
  machine-learning model, ``modelCardDescription`` → the model card),
- a **DocumentReference** carrying the model card (AI Model-Card profile: ``type`` AIModelCard,
  Markdown attachment with ``size`` and SHA-1 ``hash`` as FHIR R4 Attachment asks, plus a link to
  the review app's HTML rendering),
- a **Provenance** targeting the Observation and the report (AI Provenance profile: ``reason``
  AIAST, agent the Device in the Artificial-Intelligence role, entities the ImagingStudy, the
  radiologist's descriptors with their author, and the model card),
- a **DiagnosticReport** grouping the Observation with ``imagingStudy`` → the MRI study
  (identified by ``urn:dicom:uid`` / ``urn:oid:<StudyInstanceUID>``; the EHR's id is added per
  call when the ``imaging`` prefetch names it).

Everything is built once per stored prediction (the card is prepared, ``card_cache``); ids are
name-based UUIDs so the same prediction always yields the same resources. In a card suggestion the
resources reference each other relatively (``Observation/<id>``), which CDS Hooks 2.0.1 resolves
by processing a suggestion's actions as one transaction against ``fhirServer``;
``transaction_bundle`` rewrites them to ``urn:uuid:`` references for the service's own write-back.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.provenance import Provenance

from cds_service.fhir import (
    DICOM_UID_SYSTEM,
    LOCAL_SYSTEM,
    NOTE_ESTIMATE,
    NOTE_REFERENCE,
    fhir_instant,
    with_subject,
)
from models.prediction import Prediction

AIT = "http://hl7.org/fhir/uv/aitransparency"
AI_DEVICE_TYPE_SYSTEM = f"{AIT}/CodeSystem/AIdeviceTypeCS"
AI_INPUTS_SYSTEM = f"{AIT}/CodeSystem/AIinputsCS"
EXT_AI_KIND = f"{AIT}/StructureDefinition/aitransparency.AIKind"
EXT_MODEL_CARD = f"{AIT}/StructureDefinition/aitransparency.modelCardDescription"
OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"
ONNX_SHA256_SYSTEM = "urn:her2low:onnx-sha256"
MODEL_CARD_ID_SYSTEM = "urn:her2low:model-card-sha256"
REPORT_ID_SYSTEM = "urn:her2low:diagnostic-report"
DESCRIPTORS_ID_SYSTEM = "urn:her2low:descriptors"
REVIEW_USER_SYSTEM = "urn:her2low:review-user"
PREDICTION_ID_SYSTEM = "urn:her2low:prediction"
MARKDOWN = "text/markdown"

# Name-based ids: the same prediction (or model, or model card) always gets the same id.
_NAMESPACE = uuid.UUID("6f1d3c1e-5a0b-4d8e-9b7a-2c4e8f0a1b3d")

AIAST: dict[str, str] = {
    "system": OBSERVATION_VALUE,
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
_AI_ROLE = {
    "system": AI_DEVICE_TYPE_SYSTEM,
    "code": "Artificial-Intelligence",
    "display": "All kinds of Artificial Intelligence",
}


def _id(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


def _dump(model: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = model.model_dump(mode="json", exclude_none=True)
    return dumped


@dataclass(frozen=True)
class DescriptorSource:
    """Who entered the BI-RADS descriptors the estimate used (a Provenance entity's agent)."""

    author: str
    version: int | None = None
    entered_at: datetime | None = None


@dataclass(frozen=True)
class TransparencySet:
    """The Observation with its companions, as FHIR JSON (each one validated by fhir.resources)."""

    observation: dict[str, Any]
    diagnostic_report: dict[str, Any]
    provenance: dict[str, Any]
    device: dict[str, Any]
    model_card: dict[str, Any]

    def resources(self) -> list[dict[str, Any]]:
        """In suggestion order: the Observation first (what an EHR files if it files one)."""
        return [
            self.observation,
            self.diagnostic_report,
            self.provenance,
            self.device,
            self.model_card,
        ]


def fallback_model_card(prediction: Prediction) -> str:
    """A minimal card when the runtime has none (tests, injected predictors)."""
    lines = [
        f"# Model card: {prediction.model_name} {prediction.model_version} "
        f"({prediction.variant.value})",
        "",
        "> The output is a statistical estimate of the HER2 group, not a pathology result. "
        "Confirm HER2 status by IHC/ISH.",
        "",
        f"- ONNX SHA-256: `{prediction.onnx_sha256}`",
        f"- Operating threshold: {prediction.threshold * 100:.0f}%",
    ]
    if prediction.reference:
        lines.append(f"- {NOTE_REFERENCE}")
    return "\n".join(lines) + "\n"


def variant_model_card(runtime: Any, prediction: Prediction) -> str | None:
    """The Markdown card of the prediction's model variant (``ModelRuntime.cards``), if any."""
    cards = getattr(runtime, "cards", None)
    if not isinstance(cards, Mapping):
        return None
    card = cards.get(prediction.variant)
    if not isinstance(card, dict) or (card.get("name"), card.get("version")) != (
        prediction.model_name,
        prediction.model_version,
    ):
        return None  # no card, or the card of another model than the one that made the estimate
    try:
        from models.card import render_markdown

        return render_markdown(card)
    except (ImportError, KeyError, TypeError, ValueError):
        return None


def attachment(data: bytes, content_type: str, title: str) -> dict[str, Any]:
    """FHIR R4 Attachment with inline data, ``size`` (bytes) and ``hash`` (base64 SHA-1)."""
    return {
        "contentType": content_type,
        "language": "en",
        "data": base64.b64encode(data).decode("ascii"),
        "size": len(data),
        "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),
        "title": title,
    }


def _model_label(prediction: Prediction) -> str:
    return f"{prediction.model_name} {prediction.model_version}"


@functools.lru_cache(maxsize=16)
def _model_resources_json(
    name: str,
    version: str,
    variant: str,
    sha256: str,
    reference: bool,
    markdown: str,
    html_url: str | None,
) -> str:
    """Device + model-card DocumentReference of one model as JSON text (built once per model)."""
    label = f"{name} {version}"
    text = markdown.encode("utf-8")
    card_sha256 = hashlib.sha256(text).hexdigest()
    doc_id = _id("model-card", card_sha256)
    device_id = _id("device", sha256, variant)
    content: list[dict[str, Any]] = [
        {"attachment": attachment(text, MARKDOWN, f"Model card: {label} ({variant})")}
    ]
    if html_url:
        content.append(
            {
                "attachment": {
                    "contentType": "text/html",
                    "url": html_url,
                    "title": "Model card (HTML, HER2-low review app)",
                }
            }
        )
    document = {
        "resourceType": "DocumentReference",
        "id": doc_id,
        "identifier": [{"system": MODEL_CARD_ID_SYSTEM, "value": card_sha256}],
        "status": "current",
        "docStatus": "final",
        "type": {
            "coding": [
                {"system": AI_INPUTS_SYSTEM, "code": "AIModelCard", "display": "AI Model-Card"}
            ],
            "text": "AI model card",
        },
        "category": [
            {
                "coding": [
                    {
                        "system": AI_INPUTS_SYSTEM,
                        "code": "AIModelCardMarkdownFormat",
                        "display": "Markdown Format",
                    }
                ]
            }
        ],
        "description": f"Model card of {label} ({variant}): intended use, inputs, validation, "
        "limitations",
        "content": content,
    }
    versions = [
        {"type": {"text": "model version"}, "value": version},
        {"type": {"text": "ONNX SHA-256"}, "value": sha256},
    ]
    device: dict[str, Any] = {
        "resourceType": "Device",
        "id": device_id,
        "extension": [
            {
                "url": EXT_AI_KIND,
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": AI_DEVICE_TYPE_SYSTEM,
                            "code": "Machine-Learning-Models",
                            "display": "Machine Learning Models",
                        }
                    ],
                    "text": "Logistic regression model (ONNX)",
                },
            },
            {
                "url": EXT_MODEL_CARD,
                "valueReference": {"reference": f"DocumentReference/{doc_id}"},
            },
        ],
        "identifier": [{"system": ONNX_SHA256_SYSTEM, "value": sha256}],
        "status": "active",
        "deviceName": [{"name": name, "type": "model-name"}],
        "type": {
            "coding": [_AI_ROLE],
            "text": "Statistical (logistic regression) model, ONNX",
        },
        "version": versions,
    }
    if reference:
        device["note"] = [{"text": NOTE_REFERENCE}]
    checked = [
        _dump(DocumentReference.model_validate(document)),
        _dump(Device.model_validate(device)),
    ]
    return json.dumps(checked)


def _ref(resource: Mapping[str, Any], display: str | None = None) -> dict[str, str]:
    out = {"reference": f"{resource['resourceType']}/{resource['id']}"}
    if display:
        out["display"] = display
    return out


def _study_uid(observation: Mapping[str, Any]) -> str | None:
    for derived in observation.get("derivedFrom") or []:
        ident = derived.get("identifier") or {}
        if derived.get("type") == "ImagingStudy" and ident.get("system") == DICOM_UID_SYSTEM:
            value = str(ident.get("value", ""))
            return value.removeprefix("urn:oid:") or None
    return None


def _prediction_key(observation: Mapping[str, Any]) -> str:
    for ident in observation.get("identifier") or []:
        if ident.get("system") == PREDICTION_ID_SYSTEM and ident.get("value"):
            return str(ident["value"])
    raise ValueError("the Observation has no prediction identifier")


def build_transparency(
    *,
    observation: Mapping[str, Any],
    prediction: Prediction,
    computed_at: datetime,
    patient_id: str,
    model_card_markdown: str | None = None,
    model_card_url: str | None = None,
    descriptors: DescriptorSource | None = None,
) -> TransparencySet:
    """The Observation (for ``patient_id``) with its Device, model card, Provenance and report.

    ``observation``: the prepared Observation of ``fhir.build_observation``; its identifier,
    status, times and ImagingStudy identifier are reused so the companions agree with it.
    """
    key = _prediction_key(observation)
    obs = with_subject(observation, patient_id, None)
    obs["id"] = _id("observation", key)
    markdown = model_card_markdown or fallback_model_card(prediction)
    model_card, device = json.loads(
        _model_resources_json(
            prediction.model_name,
            prediction.model_version,
            prediction.variant.value,
            prediction.onnx_sha256,
            prediction.reference,
            markdown,
            model_card_url,
        )
    )
    label = _model_label(prediction)
    study_uid = _study_uid(observation)
    study_ref: dict[str, Any] | None = None
    if study_uid:
        study_ref = {
            "type": "ImagingStudy",
            "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"},
            "display": "Breast MRI study",
        }
    status = str(observation.get("status", "preliminary"))
    percent = float(observation.get("valueQuantity", {}).get("value", prediction.probability * 100))
    band = "at or above" if prediction.above_threshold else "below"
    conclusion = (
        f"MRI HER2-low likelihood {percent:.0f}% ({band} the {prediction.threshold * 100:.0f}% "
        f"operating threshold of {label}). {NOTE_ESTIMATE}"
    )
    if prediction.reference:
        conclusion += f" {NOTE_REFERENCE}"
    report_id = _id("diagnostic-report", key)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "meta": {"security": [AIAST]},
        "identifier": [{"system": REPORT_ID_SYSTEM, "value": key}],
        "status": status,
        "category": [
            {"coding": [{"system": DIAGNOSTIC_SERVICE, "code": "RAD", "display": "Radiology"}]}
        ],
        "code": {
            "coding": [
                {
                    "system": LOCAL_SYSTEM,
                    "code": "her2-low-likelihood-mri-report",
                    "display": "HER2-low likelihood from breast MRI (AI result)",
                }
            ],
            "text": "HER2-low likelihood from breast MRI (AI result, statistical estimate)",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": observation.get("effectiveDateTime"),
        "issued": observation.get("issued") or fhir_instant(computed_at),
        "result": [_ref(obs, "HER2-low likelihood (statistical estimate)")],
        "imagingStudy": [study_ref] if study_ref else None,
        "conclusion": conclusion,
    }
    entities: list[dict[str, Any]] = []
    if study_ref:
        entities.append({"role": "source", "what": study_ref})
    if descriptors is not None:
        value = key.split("/", 1)[0]
        if descriptors.version is not None:
            value += f"/v{descriptors.version}"
        when = f", entered {descriptors.entered_at:%Y-%m-%d}" if descriptors.entered_at else ""
        entities.append(
            {
                "role": "source",
                "what": {
                    "identifier": {"system": DESCRIPTORS_ID_SYSTEM, "value": value},
                    "display": f"Radiologist's BI-RADS MRI descriptors{when}",
                },
                "agent": [
                    {
                        "type": {
                            "coding": [
                                {"system": PARTICIPANT_TYPE, "code": "author", "display": "Author"}
                            ]
                        },
                        "who": {
                            "identifier": {
                                "system": REVIEW_USER_SYSTEM,
                                "value": descriptors.author,
                            },
                            "display": descriptors.author,
                        },
                    }
                ],
            }
        )
    entities.append({"role": "derivation", "what": _ref(model_card, f"Model card of {label}")})
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": _id("provenance", key),
        "target": [_ref(obs), _ref(report)],
        "occurredDateTime": fhir_instant(computed_at),
        "recorded": fhir_instant(computed_at),
        "activity": {
            "coding": [{"system": DATA_OPERATION, "code": "CREATE", "display": "create"}],
            "text": "HER2-low likelihood computed from DKI histogram features and descriptors",
        },
        "reason": [{"coding": [AIAST]}],
        "agent": [
            {
                "type": {
                    "coding": [{"system": PARTICIPANT_TYPE, "code": "author", "display": "Author"}]
                },
                "role": [{"coding": [_AI_ROLE]}],
                "who": _ref(device, label),
            }
        ],
        "entity": entities,
    }
    return TransparencySet(
        observation=obs,
        diagnostic_report=_dump(DiagnosticReport.model_validate(_drop_none(report))),
        provenance=_dump(Provenance.model_validate(provenance)),
        device=device,
        model_card=model_card,
    )


def _drop_none(value: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if v is not None}


def transaction_bundle(resources: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A FHIR transaction creating ``resources``, with ``urn:uuid:`` references between them.

    Resources with an identifier are created conditionally (``ifNoneExist``), so a retried
    write-back or a model already on file does not make a second copy (FHIR R4 §3.1.0.8.1).
    """
    local = {
        f"{r['resourceType']}/{r['id']}": f"urn:uuid:{r['id']}"
        for r in resources
        if isinstance(r.get("id"), str)
    }
    entries = []
    for resource in resources:
        body = _rewrite_references(dict(resource), local)
        rid = body.pop("id", None)
        request: dict[str, Any] = {"method": "POST", "url": body["resourceType"]}
        identifiers = body.get("identifier")
        if isinstance(identifiers, list) and identifiers:
            first = identifiers[0]
            request["ifNoneExist"] = f"identifier={first['system']}|{first['value']}"
        entry: dict[str, Any] = {"resource": body, "request": request}
        if rid:
            entry["fullUrl"] = f"urn:uuid:{rid}"
        entries.append(entry)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return _dump(Bundle.model_validate(bundle))


def _rewrite_references(value: Any, local: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite_references(v, local) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in local:
            out["reference"] = local[ref]
        return out
    if isinstance(value, list):
        return [_rewrite_references(v, local) for v in value]
    return value


def mark_imaging_studies(value: Any, mark: str) -> Any:
    """A copy of ``value`` in which each ImagingStudy reference by StudyInstanceUID (logical,
    without a literal ``reference``) starts with the key ``mark`` holding that UID.

    The card template (``card_cache.CardTemplate``) turns each mark into
    ``"reference": "ImagingStudy/<id>"`` when the EHR's ``imaging`` prefetch names the study
    (``prefetch.imaging_study_ids``), and into nothing when it does not.
    """
    if isinstance(value, dict):
        out = {k: mark_imaging_studies(v, mark) for k, v in value.items()}
        ident = out.get("identifier")
        if (
            out.get("type") == "ImagingStudy"
            and isinstance(ident, dict)
            and ident.get("system") == DICOM_UID_SYSTEM
            and "reference" not in out
        ):
            out = {mark: str(ident.get("value", "")).removeprefix("urn:oid:"), **out}
        return out
    if isinstance(value, list):
        return [mark_imaging_studies(v, mark) for v in value]
    return value


def suggested_resources(card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The resources of a card's ``create`` actions (what the write-back sends)."""
    found: list[dict[str, Any]] = []
    for suggestion in card.get("suggestions") or []:
        for action in suggestion.get("actions") or []:
            resource = action.get("resource")
            if action.get("type") == "create" and isinstance(resource, dict):
                found.append(resource)
    return found


def action_descriptions(resources: Iterable[Mapping[str, Any]]) -> list[str]:
    """One human description per resource (CDS Hooks action.description)."""
    text = {
        "Observation": "Create an Observation: HER2-low likelihood from breast MRI "
        "(statistical estimate)",
        "DiagnosticReport": "Create a DiagnosticReport grouping the estimate with the MRI study",
        "Provenance": "Create a Provenance: computed by the model from the MRI study and the "
        "radiologist's descriptors (AI asserted)",
        "Device": "Create a Device describing the AI model (name, version, ONNX SHA-256)",
        "DocumentReference": "Create a DocumentReference carrying the model card",
    }
    return [text.get(str(r.get("resourceType")), "Create a FHIR resource") for r in resources]
