"""The training domain of a model, and whether a case falls outside it.

A logistic model extrapolates silently: a case acquired with another b-value protocol, on
another field strength or vendor, or with a feature outside the range the model ever saw still
gets a number. The card records the domain (``training_domain``); :func:`outside` lists, in plain
words, where a case leaves it, so the service scores the case only with a visible warning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.contract import QUANTITATIVE, Provenance

__all__ = ["TrainingDomain", "outside"]

_B_TOLERANCE = 0.05  # b-values within 5 % are the same level (as the node groups them)


def _levels(b_values: Sequence[float]) -> list[float]:
    levels: list[float] = []
    for b in sorted(0.0 if v < 5 else float(v) for v in b_values):
        if not levels or b > levels[-1] * (1 + _B_TOLERANCE) + 1e-9:
            levels.append(b)
    return levels


def _same_protocol(a: Sequence[float], b: Sequence[float]) -> bool:
    la, lb = _levels(a), _levels(b)
    return len(la) == len(lb) and all(
        abs(x - y) <= _B_TOLERANCE * max(x, y) + 1e-9 for x, y in zip(la, lb, strict=True)
    )


@dataclass(frozen=True)
class TrainingDomain:
    """What the training data covered. Empty field strengths or vendors = not recorded."""

    b_values: tuple[float, ...]
    field_strengths_t: tuple[float, ...] = ()
    vendors: tuple[str, ...] = ()
    #: Per numeric model input: (min, max) over the training cases that had it.
    feature_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    note: str = ""

    @classmethod
    def from_training(
        cls,
        matrix: Mapping[str, Sequence[float]],
        *,
        b_values: Sequence[float],
        field_strengths_t: Sequence[float] = (),
        vendors: Sequence[str] = (),
        note: str = "",
    ) -> TrainingDomain:
        """The domain of a cohort: ``matrix`` maps each numeric model input to its values."""
        ranges: dict[str, tuple[float, float]] = {}
        for name, values in matrix.items():
            arr = np.asarray(values, dtype=np.float64)
            arr = arr[np.isfinite(arr)]
            if arr.size:
                ranges[name] = (float(arr.min()), float(arr.max()))
        return cls(
            b_values=tuple(float(b) for b in b_values),
            field_strengths_t=tuple(float(t) for t in field_strengths_t),
            vendors=tuple(vendors),
            feature_ranges=ranges,
            note=note,
        )

    def to_card(self) -> dict[str, Any]:
        return {
            "b_values": list(self.b_values),
            "b_value_unit": "s/mm2",
            "field_strength_t": list(self.field_strengths_t),
            "vendors": list(self.vendors),
            "feature_ranges": {k: [lo, hi] for k, (lo, hi) in self.feature_ranges.items()},
            "note": self.note,
        }

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> TrainingDomain | None:
        """The card's ``training_domain``; None for a card written before it existed."""
        data = card.get("training_domain")
        if not isinstance(data, Mapping):
            return None
        return cls(
            b_values=tuple(float(b) for b in data.get("b_values", ())),
            field_strengths_t=tuple(float(t) for t in data.get("field_strength_t", ())),
            vendors=tuple(str(v) for v in data.get("vendors", ())),
            feature_ranges={
                str(k): (float(v[0]), float(v[1]))
                for k, v in (data.get("feature_ranges") or {}).items()
            },
            note=str(data.get("note", "")),
        )


def _show(name: str, value: float) -> str:
    spec = QUANTITATIVE.get(name)
    if spec is None:
        return f"{value:.3g}"
    unit = "" if spec.display_unit == "1" else f" {spec.display_unit}"
    return f"{value * spec.display_scale:.3g}{unit}"


def outside(
    domain: TrainingDomain,
    provenance: Provenance | None,
    features: Mapping[str, float | None],
) -> list[str]:
    """Where a case leaves the training domain, one sentence each (empty: inside it).

    Only what both sides state is compared: a card that records no field strength or vendor
    (the simulated reference cohort: "not recorded") judges no scanner, and a case whose
    ``provenance.scanner`` lacks a value (older nodes, headers without it) is not called outside
    for it — unknown is not evidence of a shift, and a warning on every case would teach
    readers to ignore the real ones.
    """
    out: list[str] = []
    b_values = provenance.b_values if provenance is not None else ()
    if b_values and domain.b_values and not _same_protocol(b_values, domain.b_values):
        mine = ", ".join(f"{b:g}" for b in _levels(b_values))
        theirs = ", ".join(f"{b:g}" for b in _levels(domain.b_values))
        out.append(f"b-values {mine} s/mm2 differ from the training protocol ({theirs})")
    scanner = provenance.scanner if provenance is not None else None
    if scanner is not None:
        strength = scanner.field_strength_t
        known = domain.field_strengths_t
        # within 10 %: a "3 T" Siemens reports 2.89 T
        if known and strength is not None and all(abs(strength - t) > 0.1 * t for t in known):
            listed = ", ".join(f"{t:g} T" for t in known)
            out.append(f"field strength {strength:g} T is not in the training data ({listed})")
        vendor = scanner.manufacturer.strip()
        vendors = domain.vendors
        if vendors and vendor and not any(v.lower() in vendor.lower() for v in vendors):
            out.append(f"vendor {vendor} is not in the training data ({', '.join(vendors)})")
    for name, (lo, hi) in domain.feature_ranges.items():
        value = features.get(name)
        if value is None or not math.isfinite(value):
            continue
        if value < lo or value > hi:
            out.append(
                f"{name} = {_show(name, value)} is outside the training range "
                f"{_show(name, lo)} to {_show(name, hi)}"
            )
    return out
