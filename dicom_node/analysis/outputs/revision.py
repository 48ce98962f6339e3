"""A revised TID 1500 Measurement Report carrying what the service concluded (PS3.3 C.17.2).

At analysis time the node has the numbers but neither the radiologist's BI-RADS descriptors nor
the HER2-low likelihood: those come later from the service (``GET /api/v1/assessments``). A
*revision* is a new instance of the same SR series: a new (deterministic) SOP Instance UID, the
next Instance Number, the Predecessor Documents Sequence referencing the SR it replaces, and the
content of the **original** report (ROI, volume, the 21 statistics, TID 4019, the disclaimer)
plus, in the lesion's measurement group (TID 1411):

- each entered descriptor as a qualitative evaluation, coded per :mod:`.descriptors`;
- the likelihood as a TID 300 measurement (private code, UCUM ``{probability}``) whose own
  Algorithm Identification (TID 4019) names the model and its version;

and at the root, as TEXT, the model's statement ("reference model, not clinically validated")
and, when the service did not score, each of its reasons (no number is written then).

Completion Flag is COMPLETE when the likelihood is there, PARTIAL when it is not; Verification
Flag stays UNVERIFIED (the node signs nothing); Preliminary Flag stays PRELIMINARY.
Everything is built from the stored files, so no analysis is re-run.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_node.analysis.outputs import codes as c
from dicom_node.analysis.outputs.context import DISCLAIMER
from dicom_node.analysis.outputs.descriptors import (
    LIKELIHOOD,
    LIKELIHOOD_UNIT,
    NOT_SCORED,
    UNCODED,
    coded_descriptor,
)
from dicom_node.analysis.outputs.identification import derived_uid

__all__ = [
    "AssessmentContent",
    "assessment_items",
    "lesion_group",
    "revise_measurement_report",
    "revision_uid",
]

_IMAGING_MEASUREMENTS = ("126010", "DCM")
_MEASUREMENT_GROUP = ("125007", "DCM")
#: Patient and study attributes the new SR takes from the one it revises (same patient, study).
_PATIENT_STUDY = (
    "SpecificCharacterSet",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_MAX_TEXT = 1024


@dataclass(frozen=True)
class AssessmentContent:
    """What a revised SR carries beside the original's numbers (from one service assessment)."""

    #: Entered descriptors only (name → coded value of :data:`models.schema.DESCRIPTORS`).
    descriptors: Mapping[str, str] = field(default_factory=dict)
    probability: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    #: The model's statement; empty → the project's :data:`DISCLAIMER`.
    statement: str = ""
    not_scored: tuple[str, ...] = ()

    def key(self) -> str:
        """Canonical JSON of what the SR *carries*: the entered descriptors and the likelihood
        with its model. Equal keys need no new revision; the reasons for not scoring and the
        statement alone do not make one (an SR per unscored series would only be noise)."""
        scored = self.probability is not None
        return json.dumps(
            {
                "descriptors": {k: v for k, v in sorted(self.descriptors.items()) if v},
                "probability": self.probability,
                "model": [self.model_name, self.model_version] if scored else None,
            },
            sort_keys=True,
            separators=(",", ":"),
        )


def revision_uid(original_uid: str, instance_number: int, content: AssessmentContent) -> str:
    """The revision's SOP Instance UID: the same inputs always give the same UID (no duplicate
    object in a PACS when a revision is re-sent or re-built after a crash)."""
    digest = hashlib.sha256(content.key().encode()).hexdigest()
    return derived_uid(original_uid, "sr revision", str(instance_number), digest)


def _text(value: str) -> str:
    """Free text from the service, made safe for UT: control characters become spaces."""
    cleaned = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in value)
    return cleaned.strip()[:_MAX_TEXT] or "-"


def _model_label(content: AssessmentContent) -> str:
    return " ".join(x for x in (content.model_name, content.model_version) if x) or "unknown"


def _group_items(content: AssessmentContent) -> list[Dataset]:
    """Descriptors (CODE) and the likelihood (NUM + TID 4019) for the lesion's group."""
    items: list[Dataset] = []
    for name, value in sorted(content.descriptors.items()):
        coded = coded_descriptor(name, value) if value else None
        if coded is not None:
            items.extend(hd.sr.QualitativeEvaluation(name=coded[0], value=coded[1]))
    if content.probability is not None:
        items.extend(
            hd.sr.Measurement(
                name=LIKELIHOOD,
                value=float(content.probability),
                unit=LIKELIHOOD_UNIT,
                algorithm_id=hd.sr.AlgorithmIdentification(
                    name=_text(content.model_name or "unknown")[:64],
                    version=_text(content.model_version or "unknown")[:64],
                ),
            )
        )
    return items


def _root_items(content: AssessmentContent) -> list[Dataset]:
    """TEXT at the root: the model's statement, why it did not score, uncoded descriptors."""
    statement = _text(content.statement or DISCLAIMER)
    items: list[Dataset] = [
        hd.sr.TextContentItem(
            name=c.COMMENT,
            value=f"HER2-low likelihood model {_text(_model_label(content))}: {statement}",
            relationship_type="CONTAINS",
        )
    ]
    if content.probability is None:
        for reason in content.not_scored or ("no likelihood was computed",):
            items.append(
                hd.sr.TextContentItem(
                    name=NOT_SCORED, value=_text(reason), relationship_type="CONTAINS"
                )
            )
    for name, value in sorted(content.descriptors.items()):
        if value and coded_descriptor(name, value) is None:
            items.append(
                hd.sr.TextContentItem(
                    name=UNCODED, value=_text(f"{name}: {value}"), relationship_type="CONTAINS"
                )
            )
    return items


def assessment_items(content: AssessmentContent) -> tuple[list[Dataset], list[Dataset]]:
    """(items for the lesion's measurement group, TEXT items for the root) of ``content``."""
    return _group_items(content), _root_items(content)


def _concept(item: Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return str(name.CodeValue), str(name.CodingSchemeDesignator)


def lesion_group(root: Dataset) -> Dataset:
    """The lesion's TID 1411 Measurement Group container inside a TID 1500 root."""
    for container in root.ContentSequence:
        if container.get("ValueType") == "CONTAINER" and _concept(container) == (
            _IMAGING_MEASUREMENTS
        ):
            for group in container.get("ContentSequence", []):
                if _concept(group) == _MEASUREMENT_GROUP:
                    return group
    raise ValueError("the original report has no measurement group")


def _evidence(original: Dataset) -> list[Dataset]:
    """The original's evidence as minimal datasets (UIDs), the first with patient and study."""
    out: list[Dataset] = []
    for seq in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in original.get(seq, []):
            for series in study.get("ReferencedSeriesSequence", []):
                for ref in series.get("ReferencedSOPSequence", []):
                    ds = Dataset()
                    ds.StudyInstanceUID = study.StudyInstanceUID
                    ds.SeriesInstanceUID = series.SeriesInstanceUID
                    ds.SOPClassUID = ref.ReferencedSOPClassUID
                    ds.SOPInstanceUID = ref.ReferencedSOPInstanceUID
                    out.append(ds)
    if not out:
        raise ValueError("the original report lists no evidence")
    first = Dataset()
    for keyword in _PATIENT_STUDY:
        if keyword in original:
            setattr(first, keyword, deepcopy(original[keyword].value))
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        if keyword not in first:
            setattr(first, keyword, None)
    first.update(out[0])
    first.StudyInstanceUID = original.StudyInstanceUID
    out[0] = first
    return out


def _needs_unicode(items: Sequence[Dataset]) -> bool:
    return any(not str(item.get("TextValue", "")).isascii() for item in items)


def revise_measurement_report(
    original: Dataset,
    previous: Dataset,
    content: AssessmentContent,
    *,
    instance_number: int,
) -> hd.sr.Comprehensive3DSR:
    """The revision ``instance_number`` of ``original`` replacing ``previous`` (may be equal).

    ``original`` is the report written at analysis time (instance 1); its content is copied,
    never the previous revision's, so a revision never carries a stale descriptor.
    """
    root = Dataset()
    for keyword in (
        "ValueType",
        "ConceptNameCodeSequence",
        "ContinuityOfContent",
        "ContentTemplateSequence",
    ):
        if keyword in original:
            setattr(root, keyword, deepcopy(original[keyword].value))
    root.ContentSequence = DicomSequence([deepcopy(item) for item in original.ContentSequence])
    group_items, root_items = assessment_items(content)
    lesion_group(root).ContentSequence.extend(group_items)
    root.ContentSequence.extend(root_items)
    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(original),
        content=root,
        series_instance_uid=str(original.SeriesInstanceUID),
        series_number=int(original.SeriesNumber),
        sop_instance_uid=revision_uid(str(original.SOPInstanceUID), instance_number, content),
        instance_number=instance_number,
        manufacturer=str(original.get("Manufacturer", "") or ""),
        is_complete=content.probability is not None,
        is_final=False,
        is_verified=False,
        previous_versions=[previous],
    )
    for keyword in ("ManufacturerModelName", "SeriesDescription", "SoftwareVersions"):
        if keyword in original:
            setattr(sr, keyword, original[keyword].value)
    schemes = [deepcopy(s) for s in original.get("CodingSchemeIdentificationSequence", [])]
    if not any(s.get("CodingSchemeDesignator") == c.PRIVATE_SCHEME for s in schemes):
        scheme = Dataset()
        scheme.CodingSchemeDesignator = c.PRIVATE_SCHEME
        scheme.CodingSchemeName = c.PRIVATE_SCHEME_NAME
        scheme.CodingSchemeResponsibleOrganization = str(original.get("Manufacturer", "") or "")
        schemes.append(scheme)
    sr.CodingSchemeIdentificationSequence = schemes
    if _needs_unicode([*root_items, *group_items]):
        sr.SpecificCharacterSet = "ISO_IR 192"
    return sr
