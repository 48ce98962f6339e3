"""Patient matching by identifier only (notes/fhir-and-review.md §Identity).

A result carries DICOM PatientID (0010,0020) and IssuerOfPatientID (0010,0021); the configured
table maps the issuer to a FHIR ``Identifier.system``. A FHIR Patient matches when one of its
identifiers has that system and value. Names and birth dates are never used. Anything that could
mix two people up (two values for one system, results under two different DICOM patients) is
ambiguous: no card, the case is held for review.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class AmbiguousIdentityError(Exception):
    """The Patient cannot be tied to exactly one DICOM patient."""


@dataclass(frozen=True)
class PatientKeys:
    """DICOM (issuer, PatientID) pairs a FHIR Patient maps to."""

    keys: tuple[tuple[str, str], ...]


def patient_keys(patient: Mapping[str, Any], issuer_systems: Mapping[str, str]) -> PatientKeys:
    """The (issuer, PatientID) pairs of a Patient resource under the configured systems."""
    by_system: dict[str, list[str]] = {}
    for issuer, mapped in issuer_systems.items():
        by_system.setdefault(mapped, []).append(issuer)
    keys: list[tuple[str, str]] = []
    values_per_system: dict[str, set[str]] = {}
    identifiers = patient.get("identifier")
    for ident in identifiers if isinstance(identifiers, list) else []:  # wrong type: none
        if not isinstance(ident, dict):
            continue
        system, value = ident.get("system"), ident.get("value")
        if not isinstance(system, str) or not isinstance(value, str) or not value:
            continue
        if ident.get("use") == "old":
            continue
        if system in by_system:
            values_per_system.setdefault(system, set()).add(value)
            keys.extend((issuer, value) for issuer in by_system[system])
    if any(len(values) > 1 for values in values_per_system.values()):
        raise AmbiguousIdentityError("several identifier values for one system")
    return PatientKeys(tuple(dict.fromkeys(keys)))
