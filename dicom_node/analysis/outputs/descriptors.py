"""The radiologist's BI-RADS MRI descriptors as coded qualitative evaluations (PS3.16).

Each descriptor of :data:`models.schema.DESCRIPTORS` is a (concept name, coded value) pair of
TID 1411's qualitative evaluations. Standard codes are used wherever PS3.16 has one: the
BI-RADS® value sets CID 6005 (shape) and CID 6007 (margin), the MRI value sets CID 6341 (margin),
CID 6343 (signal characteristic) and CID 6345 (enhancement pattern, the delayed-phase curve
types), CID 6335/6128 (distribution terms), CID 240 (present/absent), the concept names
SCT 300842002 "Shape" and RADLEX RID6058 "Enhancement pattern" (CID 6333), DCM 111037
"Margins", SCT 79654002 "Edema" (CID 6056) and RADLEX RID39467 "T2 Hyperintensity" (CID 6343).

BI-RADS terms without a PS3.16 code (non-mass enhancement, rim enhancement, dark internal
septations, clumped and clustered-ring NME, the "multiple regions" distribution, and the concept
names "lesion type", "NME distribution" and "kinetic curve") are in the node's private scheme
``99HER2LOW``, declared in every SR's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

from collections.abc import Mapping

from highdicom.sr import CodedConcept

from dicom_node.analysis.outputs.codes import PRIVATE_SCHEME

__all__ = ["DESCRIPTOR_CODES", "LIKELIHOOD", "LIKELIHOOD_UNIT", "NOT_SCORED", "coded_descriptor"]


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


_PRESENT = CodedConcept("52101004", "SCT", "Present")  # CID 240
_ABSENT = CodedConcept("272519000", "SCT", "Absent")  # CID 240
_HOMOGENEOUS = CodedConcept("112160", "DCM", "Homogeneous")  # CID 6343
_HETEROGENEOUS = CodedConcept("RID6060", "RADLEX", "Heterogeneous")  # CID 6343
_ENHANCEMENT_PATTERN = CodedConcept("RID6058", "RADLEX", "Enhancement pattern")  # CID 6333

#: Descriptor name → (concept name, {value → coded value}).
DESCRIPTOR_CODES: Mapping[str, tuple[CodedConcept, Mapping[str, CodedConcept]]] = {
    "lesion_type": (  # not DCM 121071 "Finding": TID 1411 uses it for the finding type (Lesion)
        _private("LESIONTYPE", "BI-RADS MRI lesion type"),
        {
            "mass": CodedConcept("4147007", "SCT", "Mass"),  # CID 6335
            "nme": _private("NME", "Non-mass enhancement"),
        },
    ),
    "mass_shape": (
        CodedConcept("300842002", "SCT", "Shape"),  # CID 6333
        {  # CID 6005 Shape Characteristic from BI-RADS®
            "oval": CodedConcept("84360004", "SCT", "Ovoid shape (Oval)"),
            "round": CodedConcept("42700002", "SCT", "Round shape"),
            "irregular": CodedConcept("49608001", "SCT", "Irregular"),
        },
    ),
    "mass_margin": (
        CodedConcept("111037", "DCM", "Margins"),
        {
            "circumscribed": CodedConcept("129738007", "SCT", "Circumscribed lesion"),  # 6007
            "irregular": CodedConcept("49608001", "SCT", "Irregular"),  # CID 6341
            "spiculated": CodedConcept("129742005", "SCT", "Spiculated lesion"),  # CID 6007
        },
    ),
    "mass_internal_enhancement": (
        _ENHANCEMENT_PATTERN,
        {
            "homogeneous": _HOMOGENEOUS,
            "heterogeneous": _HETEROGENEOUS,
            "rim": _private("RIM", "Rim enhancement"),
            "dark_internal_septations": _private("DARKSEPTA", "Dark internal septations"),
        },
    ),
    "nme_distribution": (
        _private("NMEDIST", "Non-mass enhancement distribution"),
        {
            "focal": CodedConcept("87017008", "SCT", "Focal"),  # CID 6335
            "linear": CodedConcept("112150", "DCM", "Linear"),  # CID 6335
            "segmental": CodedConcept("62372003", "SCT", "Segmental"),  # CID 6128
            "regional": CodedConcept("410674003", "SCT", "Regional"),  # CID 6335
            "multiple_regions": _private("MULTIREGION", "Multiple regions"),
            "diffuse": CodedConcept("19648000", "SCT", "Diffuse"),  # CID 6335
        },
    ),
    "nme_internal_pattern": (
        _ENHANCEMENT_PATTERN,
        {
            "homogeneous": _HOMOGENEOUS,
            "heterogeneous": _HETEROGENEOUS,
            "clumped": _private("CLUMPED", "Clumped enhancement"),
            "clustered_ring": _private("CLUSTEREDRING", "Clustered ring enhancement"),
        },
    ),
    "t2_hyperintensity": (
        CodedConcept("RID39467", "RADLEX", "T2 Hyperintensity"),  # CID 6343
        {"yes": _PRESENT, "no": _ABSENT},
    ),
    "peritumoral_edema": (
        CodedConcept("79654002", "SCT", "Edema"),  # CID 6056
        {"yes": _PRESENT, "no": _ABSENT},
    ),
    "kinetic_curve": (
        _private("KINETICCURVE", "Delayed phase kinetic curve type"),
        {  # CID 6345 MRI Enhancement Pattern
            "persistent": CodedConcept("130597", "DCM", "Persistent delayed phase: Type 1 curve"),
            "plateau": CodedConcept("130598", "DCM", "Plateau delayed phase: Type 2 curve"),
            "washout": CodedConcept("130599", "DCM", "Washout delayed phase: Type 3 curve"),
        },
    ),
}

#: No standard code exists for a HER2-low likelihood (notes/dicom.md): private, unit UCUM.
LIKELIHOOD = _private("HER2LOWP", "HER2-low likelihood")
LIKELIHOOD_UNIT = CodedConcept("{probability}", "UCUM", "probability")
#: TEXT concept of each reason the service gave for not scoring.
NOT_SCORED = _private("NOTSCORED", "HER2-low likelihood not scored")
#: TEXT concept of a descriptor the node has no code for (a newer service): "name: value".
UNCODED = _private("DESCRIPTOR", "BI-RADS descriptor")


def coded_descriptor(name: str, value: str) -> tuple[CodedConcept, CodedConcept] | None:
    """(concept name, coded value) of one descriptor; ``None`` when the node has no code."""
    entry = DESCRIPTOR_CODES.get(name)
    if entry is None:
        return None
    concept, values = entry
    coded = values.get(value)
    return None if coded is None else (concept, coded)
