"""Training cohorts: one row per lesion, read from CSV and validated against the schema.

A cohort is kept as validated rows (not a DataFrame; pandas is not a dependency) and turned into
the object matrix the estimator takes with :meth:`Cohort.matrix`.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.contract import DEFAULT_FIT, FitSettings
from models.schema import (
    FEATURE_NAMES,
    FEATURES,
    LESION_TYPE,
    TARGET,
    FeatureValidationError,
    Her2Group,
    InputValue,
    validate_inputs,
)


class CohortError(ValueError):
    """A cohort file that cannot be used, with the row (1-based, header = row 1) and column."""


@dataclass(frozen=True)
class Cohort:
    """Validated lesions with their HER2 group labels."""

    rows: tuple[dict[str, InputValue], ...]
    labels: tuple[str, ...]
    target: str = TARGET
    source: str = ""
    sha256: str = ""
    #: The fit its quantitative features were computed with: the ``method`` and ``denoise``
    #: columns ``her2low fit`` writes, else the node's default (:data:`models.contract.DEFAULT_FIT`).
    fit: FitSettings = DEFAULT_FIT

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def y(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=object)

    @property
    def lesion_types(self) -> np.ndarray:
        return np.asarray([r[LESION_TYPE] for r in self.rows], dtype=object)

    def matrix(self, features: Sequence[str]) -> np.ndarray:
        """Object matrix [n, len(features)]: strings for descriptors, floats (NaN) for numbers."""
        X = np.empty((len(self.rows), len(features)), dtype=object)
        for j, name in enumerate(features):
            X[:, j] = [row[name] for row in self.rows]
        return X

    def counts(self) -> dict[str, int]:
        return {g: int(sum(1 for y in self.labels if y == g)) for g in sorted(set(self.labels))}

    @classmethod
    def from_records(
        cls,
        records: Iterable[Mapping[str, object]],
        *,
        target: str = TARGET,
        source: str = "",
        sha256: str = "",
    ) -> Cohort:
        """Validate records (feature columns + the target); extra columns are ignored.

        The optional ``method`` and ``denoise`` columns must agree on every row: a model is
        trained on features computed one way, and scores only results computed that way.
        """
        rows: list[dict[str, InputValue]] = []
        labels: list[str] = []
        fits: dict[tuple[str, str], int] = {}
        for i, record in enumerate(records, start=2):
            if record.get("method") or record.get("denoise"):
                key = (
                    str(record.get("method") or DEFAULT_FIT.method).strip(),
                    str(record.get("denoise") or "none").strip(),
                )
                fits.setdefault(key, i)
            label = str(record.get(target, "") or "").strip().lower()
            if label not in {g.value for g in Her2Group}:
                raise CohortError(
                    f"row {i}, column {target}: {label!r} is not one of zero, low, over"
                )
            values = {k: v for k, v in record.items() if k in FEATURES}
            try:
                rows.append(validate_inputs(values))
            except FeatureValidationError as exc:
                raise CohortError(f"row {i}, column {exc.feature}: {exc.message}") from exc
            labels.append(label)
        if not rows:
            raise CohortError("the cohort has no rows")
        if len(fits) > 1:
            seen = ", ".join(f"{m}/{d} (first in row {r})" for (m, d), r in fits.items())
            raise CohortError(
                f"columns method/denoise: the rows were computed with different fits ({seen}); "
                "train on features computed one way"
            )
        fit = DEFAULT_FIT
        if fits:
            ((method, denoise),) = fits
            try:
                fit = FitSettings(method=method, denoise=denoise)
            except ValueError:
                raise CohortError(
                    f"columns method/denoise: {method!r}/{denoise!r} is not a fit setting"
                ) from None
        return cls(tuple(rows), tuple(labels), target, source, sha256, fit)


def read_cohort_csv(path: str | Path, *, target: str = TARGET) -> Cohort:
    """Read a cohort CSV: columns named after features; empty cells are missing."""
    path = Path(path)
    data = path.read_bytes()
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or target not in reader.fieldnames:
            raise CohortError(f"{path}: no column {target!r}")
        return Cohort.from_records(
            list(reader),
            target=target,
            source=path.name,
            sha256=hashlib.sha256(data).hexdigest(),
        )


def write_cohort_csv(
    path: str | Path, rows: Sequence[Mapping[str, object]], *, target: str = TARGET
) -> None:
    """Write rows in the CSV layout ``read_cohort_csv`` reads (NaN and None as empty cells)."""
    columns = [*FEATURE_NAMES, target]
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)
