"""What a series is for, decided from its headers (SeriesDescription only as a last resort).

Diffusion is recognised from b-values in any convention (:mod:`dicom_node.series.bvalues`), Image Type
(0008,0008) values (PS3.3 C.8.13.1.1.1 / C.8.16.1: DIFFUSION, ADC, TRACEW, CALC_BVALUE …) and
Acquisition Contrast (0008,9209). Siemens TRACEW images are DERIVED but are the normal input for
breast DKI (notes/dicom.md), so they count as diffusion *trace*; ADC maps, calculated b and
exponential ADC are derived and never used as fit input. Breast is decided by configurable
:class:`BreastRules`: Body Part Examined (0018,0015, PS3.16 Annex L), Anatomic Region Sequence
(0008,2218), laterality (0020,0060 / 0020,0062) and study/series/protocol descriptions. Every
decision carries human-readable reasons; nothing is dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.series.bvalues import (
    B0_THRESHOLD,
    DiffusionInfo,
    DirectionalityValues,
    b_label,
    diffusion_info,
)
from dicom_node.series.csa import csa_image_header
from dicom_node.series.frames import FrameRef, expand_frames, imply_vendor_b0
from dicom_node.series.headers import first_text, text

__all__ = [
    "BreastRules",
    "SeriesClassification",
    "SeriesRole",
    "classify_series",
    "detect_breast",
    "frame_types",
]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

#: Image Type values of derived diffusion maps that must not be fitted.
DERIVED_DIFFUSION_TYPES = frozenset(
    {
        "ADC",
        "EADC",
        "EXP",
        "EXP_ADC",
        "EXPADC",
        "EXPONENTIAL",
        "CALC_BVALUE",
        "CALC_BVAL",
        "FA",
        "COLFA",
        "TENSOR",
        "TRACEADC",
        "TRACE_ADC",
        "DWI_ADC",
        "EXPONENTIAL_ADC",
    }
)
#: Image Type values of scanner-computed trace images (usable acquired-data input).
TRACE_TYPES = frozenset({"TRACEW", "TRACE", "ISOTROPIC", "ISODWI"})
_ADC_DESCRIPTION = re.compile(
    r"\b(e?adc|calc(ulated)?[ _-]?b|exp(onential)?[ _-]?adc|fa)\b", re.IGNORECASE
)
_DCE_DESCRIPTION = re.compile(
    r"(dyn|dce|vibrant|thrive|twist|ultrafast|perfusion|tricks|"
    r"disco|subtract|\bsub\b|post[ _-]?contrast|\+c\b)",
    re.IGNORECASE,
)
_T2_DESCRIPTION = re.compile(r"(t2|stir|tirm)", re.IGNORECASE)


class SeriesRole(Enum):
    """Role of a series in a breast MRI study."""

    DWI_TRACE = "dwi_trace"
    DWI_DIRECTIONAL = "dwi_directional"
    DWI_DERIVED = "dwi_derived"
    DCE = "dce"
    T2W = "t2w"
    SEG = "seg"
    OTHER = "other"

    @property
    def is_fit_input(self) -> bool:
        """Acquired diffusion data that the DKI fit may use."""
        return self in (SeriesRole.DWI_TRACE, SeriesRole.DWI_DIRECTIONAL)


@dataclass(frozen=True)
class BreastRules:
    """Configurable evidence that a series shows the breast.

    A series is breast when Body Part Examined or an Anatomic Region code says so, or when a
    description matches a keyword while Body Part Examined is empty or one of
    ``neutral_body_parts`` (sites label breast MRI CHEST or THORAX). Laterality L/R/B with a
    neutral body part also counts when ``laterality_counts`` is set. Any other body part
    (e.g. BRAIN) makes the series non-breast.
    """

    body_parts: frozenset[str] = frozenset({"BREAST", "BREASTS", "MAMMA"})
    neutral_body_parts: frozenset[str] = frozenset({"", "CHEST", "THORAX", "WHOLEBODY"})
    #: (coding scheme designator, code value) of breast anatomy (SCT, and legacy SRT).
    anatomic_codes: frozenset[tuple[str, str]] = frozenset(
        {
            ("SCT", "76752008"),
            ("SCT", "80248007"),
            ("SCT", "73056007"),
            ("SCT", "63762007"),
            ("SRT", "T-04000"),
            ("SRT", "T-04030"),
            ("SRT", "T-04020"),
        }
    )
    description_keywords: tuple[str, ...] = (
        "breast",
        "mamma",
        "mammae",
        "brust",
        "sein",
        "seno",
        "mama",
        "borst",
    )
    laterality_counts: bool = True


@dataclass
class SeriesClassification:
    """Role of a series, whether it shows the breast, and why."""

    role: SeriesRole
    is_breast: bool
    reasons: list[str] = field(default_factory=list)


def _upper_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip().upper() for v in value.split("\\") if v.strip()]
    try:
        return [str(v).strip().upper() for v in value]
    except TypeError:
        return [str(value).strip().upper()]


def frame_types(ds: Dataset) -> set[str]:
    """Image Type plus Frame Type (0008,9007) of enhanced objects."""
    types = set(_upper_list(ds.get("ImageType")))
    for holder in (
        *(ds.get("SharedFunctionalGroupsSequence") or []),
        *(ds.get("PerFrameFunctionalGroupsSequence") or [])[:1],
    ):
        for item in holder.get("MRImageFrameTypeSequence") or []:
            types.update(_upper_list(item.get("FrameType")))
    return types


def detect_breast(
    datasets: Sequence[Dataset], rules: BreastRules = BreastRules()
) -> tuple[bool, list[str]]:
    """Whether the series shows the breast under ``rules``, with the evidence used."""
    ds = datasets[0]
    body = text(ds, "BodyPartExamined").strip().upper()
    if body in rules.body_parts:
        return True, [f"BodyPartExamined {body}"]
    for item in ds.get("AnatomicRegionSequence") or []:
        code = (str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeValue", "")))
        meaning = str(item.get("CodeMeaning", ""))
        if code in rules.anatomic_codes or "breast" in meaning.lower():
            return True, [f"AnatomicRegionSequence {code[0]} {code[1]} ({meaning})"]
    if body not in rules.neutral_body_parts:
        return False, [f"not breast: BodyPartExamined {body}"]
    descriptions = text(
        ds,
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "RequestedProcedureDescription",
        "PerformedProcedureStepDescription",
    )
    lowered = descriptions.lower()
    for word in rules.description_keywords:
        if re.search(rf"\b{re.escape(word)}", lowered):
            return True, [f"description mentions {word!r}"]
    lat = first_text(ds, "Laterality", "ImageLaterality").strip().upper()
    if rules.laterality_counts and lat in {"L", "R", "B"}:
        where = f"BodyPartExamined {body}" if body else "no BodyPartExamined"
        return True, [f"laterality {lat} with {where}"]
    regions = [str(i.get("CodeMeaning", "")) for i in ds.get("AnatomicRegionSequence") or []]
    if regions:
        return False, [f"not breast: AnatomicRegionSequence {', '.join(regions)}"]
    return False, [
        "not breast: no breast evidence in BodyPartExamined, AnatomicRegionSequence, "
        "laterality or descriptions"
    ]


def _series_diffusion(datasets: Sequence[Dataset], frames: list[FrameRef]) -> list[DiffusionInfo]:
    """Diffusion of every placed frame plus that of images that cannot be placed, so a series
    whose geometry is missing is still recognised as diffusion (and not called T2-weighted)."""
    placed = {f.dataset_index for f in frames}
    unplaced = [
        ds
        for i, ds in enumerate(datasets)
        if i not in placed and "PerFrameFunctionalGroupsSequence" not in ds
    ]
    extra = [diffusion_info(ds, csa=csa_image_header(ds)) for ds in unplaced]
    return [f.diffusion for f in frames] + imply_vendor_b0(datasets, extra)


def _diffusion_role(
    datasets: Sequence[Dataset], infos: list[DiffusionInfo], types: set[str], reasons: list[str]
) -> SeriesRole | None:
    has_b = [d for d in infos if d.b is not None]
    contrast = text(datasets[0], "AcquisitionContrast").upper()
    derived = sorted(types & DERIVED_DIFFUSION_TYPES)
    if derived:
        reasons.append(f"ImageType {'/'.join(derived)}: derived diffusion map, not fit input")
        return SeriesRole.DWI_DERIVED
    if not has_b and "DIFFUSION" not in types and contrast != "DIFFUSION":
        return None
    if not has_b:
        if _ADC_DESCRIPTION.search(text(datasets[0], "SeriesDescription")):
            reasons.append(
                "diffusion image without b-values and an ADC-like SeriesDescription: derived map"
            )
            return SeriesRole.DWI_DERIVED
        reasons.append("diffusion image type but no b-value in any convention")
        return SeriesRole.DWI_TRACE
    sources = sorted({d.source.value for d in has_b if d.source})
    bs = sorted({d.b for d in has_b if d.b is not None})
    reasons.append(f"b-values {[b_label(b) for b in bs]} from {'; '.join(sources)}")
    trace_types = sorted(types & TRACE_TYPES)
    if trace_types:
        reasons.append(
            f"ImageType {'/'.join(trace_types)}: scanner trace-weighted images "
            "(derived from directions, usable as fit input)"
        )
        return SeriesRole.DWI_TRACE
    directions: dict[float, set[tuple[float, ...]]] = {}
    for d in has_b:
        if (
            d.b is not None
            and d.b >= B0_THRESHOLD
            and d.direction is not None
            and d.directionality is not DirectionalityValues.ISOTROPIC
        ):
            directions.setdefault(d.b, set()).add(tuple(round(x, 3) for x in d.direction))
    n_dirs = max((len(v) for v in directions.values()), default=0)
    if n_dirs > 1:
        reasons.append(f"up to {n_dirs} gradient directions per b: trace formed by geometric mean")
        return SeriesRole.DWI_DIRECTIONAL
    reasons.append("one image per b and slice: trace-weighted")
    return SeriesRole.DWI_TRACE


def _temporal_positions(datasets: Sequence[Dataset]) -> int:
    declared = max(
        (int(float(ds.get("NumberOfTemporalPositions", 0) or 0)) for ds in datasets), default=0
    )
    ids = {str(ds.get("TemporalPositionIdentifier", "")) for ds in datasets} - {""}
    return max(declared, len(ids))


def _contrast_role(
    datasets: Sequence[Dataset], frames: list[FrameRef], types: set[str], reasons: list[str]
) -> SeriesRole:
    ds = datasets[0]
    agent = text(ds, "ContrastBolusAgent").strip()
    contrast = text(ds, "AcquisitionContrast").upper()
    n_time = _temporal_positions(datasets)
    positions = {tuple(round(x, 1) for x in f.position) for f in frames}
    repeats = len(frames) // max(len(positions), 1)
    description = text(ds, "SeriesDescription", "ProtocolName")
    if (n_time > 1 or repeats > 1) and (
        agent or "SUBTRACTION" in types or _DCE_DESCRIPTION.search(description)
    ):
        reasons.append(
            f"{max(n_time, repeats)} time points"
            + (f", contrast agent {agent!r}" if agent else "")
            + ": dynamic contrast-enhanced"
        )
        return SeriesRole.DCE
    if "SUBTRACTION" in types and (agent or _DCE_DESCRIPTION.search(description)):
        # one post − pre phase: scanners store each subtraction as its own series
        reasons.append("subtraction images (Image Type SUBTRACTION): dynamic contrast-enhanced")
        return SeriesRole.DCE
    te = float(ds.get("EchoTime", 0) or 0)
    tr = float(ds.get("RepetitionTime", 0) or 0)
    sequence = set(_upper_list(ds.get("ScanningSequence")))
    if contrast == "T2" or (te >= 60 and tr >= 1500 and "GR" not in sequence):
        reasons.append(
            f"T2-weighted (TE {te:g} ms, TR {tr:g} ms"
            + (", Acquisition Contrast T2" if contrast == "T2" else "")
            + ")"
        )
        return SeriesRole.T2W
    if "IR" in sequence and _T2_DESCRIPTION.search(description):
        reasons.append("inversion recovery (STIR) fluid-sensitive series: T2-weighted role")
        return SeriesRole.T2W
    if _DCE_DESCRIPTION.search(description) and (n_time > 1 or agent):
        reasons.append("dynamic series by description")
        return SeriesRole.DCE
    reasons.append("no diffusion, dynamic or T2 evidence")
    return SeriesRole.OTHER


def classify_series(
    datasets: Sequence[Dataset], rules: BreastRules = BreastRules()
) -> SeriesClassification:
    """Role and breast status of one series (all its instances' headers)."""
    if not datasets:
        return SeriesClassification(SeriesRole.OTHER, False, ["empty series"])
    ds = datasets[0]
    is_breast, breast_reasons = detect_breast(datasets, rules)
    reasons: list[str] = []
    if (
        str(ds.get("Modality", "")) == "SEG"
        or str(ds.get("SOPClassUID", "")) == SEGMENTATION_STORAGE
    ):
        reasons.append("Segmentation Storage object (DICOM SEG)")
        return SeriesClassification(SeriesRole.SEG, is_breast, reasons + breast_reasons)
    types: set[str] = set()
    for d in datasets:
        types |= frame_types(d)
    frames = expand_frames(datasets)
    role = _diffusion_role(datasets, _series_diffusion(datasets, frames), types, reasons)
    if role is None:
        role = _contrast_role(datasets, frames, types, reasons)
    if not role.is_fit_input:
        reasons.append(f"not usable as DKI input (role {role.value})")
    return SeriesClassification(role, is_breast, reasons + breast_reasons)
