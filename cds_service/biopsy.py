"""What the chart says about the biopsy HER2 result (from the ``her2`` prefetch).

Only explicit IHC score 0 counts as "HER2 0": "Negative" alone is not enough, because IHC
negative includes 1+, which is HER2-low. Recognised, on Observations with one of the LOINC codes
48676-1, 85319-2, 18474-7, 85318-4 and status final/amended/corrected/preliminary, newest first:
``valueString``, ``valueCodeableConcept`` (text or a coding display/code) or an
``interpretation`` text/display reading "0", "0+", "IHC 0", "score 0", "Negative (0)",
"0 (negative)", "HER2 0"; or ``valueQuantity``/``valueInteger`` equal to 0 on 48676-1/18474-7.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cds_service.prefetch import HER2_LOINC_CODES, bundle_resources, fhir_list, fhir_object

_ZERO = re.compile(
    r"^(her-?2\s*)?(ihc\s*)?(score\s*)?(0\+?|negative\s*\(\s*0\s*\+?\s*\)|0\+?\s*\(\s*negative\s*\))$"
)
_USABLE_STATUS = {"final", "amended", "corrected", "preliminary"}
_SCORE_CODES = {"48676-1", "18474-7"}


class BiopsyHer2(StrEnum):
    """The biopsy HER2 reading as far as the service needs it."""

    ZERO = "zero"
    OTHER = "other"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class BiopsyReading:
    status: BiopsyHer2
    code: str | None = None
    text: str | None = None
    date: str | None = None


def _texts(obs: dict[str, Any]) -> list[str]:
    texts: list[str] = []
    if isinstance(obs.get("valueString"), str):
        texts.append(obs["valueString"])
    concepts = [obs.get("valueCodeableConcept"), *fhir_list(obs.get("interpretation"))]
    for concept in concepts:
        if not isinstance(concept, dict):
            continue
        if isinstance(concept.get("text"), str):
            texts.append(concept["text"])
        for coding in fhir_list(concept.get("coding")):
            if isinstance(coding, dict):
                texts.extend(v for k in ("display", "code") if isinstance(v := coding.get(k), str))
    return texts


def _loinc(obs: dict[str, Any]) -> str | None:
    for coding in fhir_list(fhir_object(obs.get("code")).get("coding")):
        if (
            isinstance(coding, dict)
            and coding.get("system") == "http://loinc.org"
            and coding.get("code") in HER2_LOINC_CODES
        ):
            return str(coding["code"])
    return None


def _date(obs: dict[str, Any]) -> str:
    for key in ("effectiveDateTime", "issued"):
        if isinstance(obs.get(key), str):
            return str(obs[key])
    period = obs.get("effectivePeriod")
    if isinstance(period, dict) and isinstance(period.get("start"), str):
        return str(period["start"])
    return ""


def _is_zero(obs: dict[str, Any], code: str) -> bool:
    if any(_ZERO.match(t.strip().lower()) for t in _texts(obs)):
        return True
    if code in _SCORE_CODES:
        quantity = obs.get("valueQuantity")
        if isinstance(quantity, dict) and quantity.get("value") == 0:
            return True
        if obs.get("valueInteger") == 0 and not isinstance(obs.get("valueInteger"), bool):
            return True
    return False


def latest_reading(bundle: Any) -> BiopsyReading:
    """The newest usable HER2 Observation, classified."""
    candidates = []
    for obs in bundle_resources(bundle, "Observation"):
        code = _loinc(obs)
        status = obs.get("status")
        if code is None or not isinstance(status, str) or status not in _USABLE_STATUS:
            continue
        candidates.append((_date(obs), code, obs))
    if not candidates:
        return BiopsyReading(BiopsyHer2.UNKNOWN)
    date, code, obs = max(candidates, key=lambda c: c[0])
    texts = _texts(obs)
    status = BiopsyHer2.ZERO if _is_zero(obs, code) else BiopsyHer2.OTHER
    return BiopsyReading(status, code=code, text=texts[0] if texts else None, date=date or None)
