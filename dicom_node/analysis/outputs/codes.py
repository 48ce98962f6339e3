"""Coded concepts of the result objects (PS3.16), in one place.

Quantities: DCM 113041 Apparent Diffusion Coefficient (CID 7263/7272), DCM 113294 Kurtosis
Diffusion Coefficient (Dapp), DCM 113206 Apparent Kurtosis Coefficient (Kapp). Statistics: CID
7464 (SCT Mean, SCT Median, DCM Skewness, DCM Kurtosis) and CID 7465 percentiles (SCT 5th/95th
percentile). No standard code exists for the IBSI intensity-histogram entropy (IBSI TLU2): it,
like anything else the node coins, is in the private scheme ``99HER2LOW`` declared in each SR's
Coding Scheme Identification Sequence.
"""

from __future__ import annotations

from collections.abc import Mapping

from highdicom.sr import CodedConcept

__all__ = [
    "BREAST",
    "DIFFUSION_MODEL",
    "LATERALITY",
    "LESION",
    "MR_BREAST",
    "PRIVATE_SCHEME",
    "QUANTITY",
    "STATISTIC",
    "STATISTIC_UNIT",
    "UNIT",
    "VOLUME",
    "VOLUME_UNIT",
]

PRIVATE_SCHEME = "99HER2LOW"
PRIVATE_SCHEME_NAME = "her2low-cds private codes"

QUANTITY: Mapping[str, CodedConcept] = {
    "adc": CodedConcept("113041", "DCM", "Apparent Diffusion Coefficient"),
    "dapp": CodedConcept("113294", "DCM", "Kurtosis Diffusion Coefficient"),
    "kapp": CodedConcept("113206", "DCM", "Apparent Kurtosis Coefficient"),
}
#: UCUM units of each map (mm²/s; Kapp is a unitless ratio).
UNIT: Mapping[str, CodedConcept] = {
    "adc": CodedConcept("mm2/s", "UCUM", "mm2/s"),
    "dapp": CodedConcept("mm2/s", "UCUM", "mm2/s"),
    "kapp": CodedConcept("{ratio}", "UCUM", "ratio"),
}
DIFFUSION_MODEL: Mapping[str, CodedConcept] = {
    "adc": CodedConcept("113250", "DCM", "Mono-exponential diffusion model"),
    "dapp": CodedConcept("113252", "DCM", "Kurtosis diffusion model"),
    "kapp": CodedConcept("113252", "DCM", "Kurtosis diffusion model"),
}
STATISTIC: Mapping[str, CodedConcept] = {
    "mean": CodedConcept("373098007", "SCT", "Mean"),
    "median": CodedConcept("373099004", "SCT", "Median"),
    "p5": CodedConcept("371888009", "SCT", "5th Percentile Value"),
    "p95": CodedConcept("371889001", "SCT", "95th Percentile Value"),
    "skewness": CodedConcept("126051", "DCM", "Skewness"),
    "kurtosis": CodedConcept("126052", "DCM", "Kurtosis"),
    "entropy": CodedConcept("ENTROPY", PRIVATE_SCHEME, "Intensity histogram entropy"),
}
_NO_UNITS = CodedConcept("1", "UCUM", "no units")
#: Unit of a statistic that is not in the map's unit (``None`` = the map's unit).
STATISTIC_UNIT: Mapping[str, CodedConcept | None] = {
    "mean": None,
    "median": None,
    "p5": None,
    "p95": None,
    "skewness": _NO_UNITS,
    "kurtosis": _NO_UNITS,
    "entropy": CodedConcept("bit", "UCUM", "bit"),
}
VOLUME = CodedConcept("118565006", "SCT", "Volume")
VOLUME_UNIT = CodedConcept("cm3", "UCUM", "cubic centimeter")
LESION = CodedConcept("52988006", "SCT", "Lesion")
BREAST = CodedConcept("76752008", "SCT", "Breast")
MR_BREAST = CodedConcept("241615005", "SCT", "MRI of breast")
LATERALITY: Mapping[str, CodedConcept] = {
    "L": CodedConcept("7771000", "SCT", "Left"),
    "R": CodedConcept("24028007", "SCT", "Right"),
}
TISSUE = CodedConcept("85756007", "SCT", "Tissue")
TUMOR = CodedConcept("108369006", "SCT", "Tumor")
COMMENT = CodedConcept("121106", "DCM", "Comment")
