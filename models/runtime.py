"""ONNX inference with explanations: what ``cds_service`` calls to turn inputs into a Prediction.

Loading is the expensive, checked step (hash against card, input names/types/shapes, the card's
check cases re-run); ``predict`` is then a validation, one ``session.run`` and a few dot products.

Variant choice: a registry version may hold a combined, a descriptors-only and a
quantitative-only model. The runtime uses the most complete one whose required inputs (card
``required_inputs``: lesion type for any descriptor model, every numeric input) are present —
combined, then descriptors, then quantitative — and reports which in ``Prediction.variant``.
Shen et al. found descriptors stronger in masses and DKI features in NME, so a case with only one
kind of input still gets the model built for it rather than imputed values.

Conventions: every card records the fit and discretisation settings of its training features
(``fit_settings``; cards without it mean the legacy ``nls``, no denoising).
``predict(..., conventions=...)`` refuses with :class:`models.contract.SettingsMismatchError`
when a result's settings differ, so numbers computed under one convention are never scored by a
model trained under another.

Contributions: the multinomial model's log(P(low)/P(zero)) split into per-input terms
(coefficient difference low - zero, times the standardised value or on the active one-hot
level). They add up, with the intercept difference, to that log-odds exactly; see the card's
``contributions`` entry.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.card import fit_settings
from models.contract import AnalysisConventions, SettingsMismatchError
from models.export import OUTPUT_LABEL, OUTPUT_PROBABILITIES
from models.prediction import Contribution, ModelVariant, Prediction
from models.recalibration import CalibrationMap, adjust
from models.registry import ModelEntry, RegistryError, resolve_entries
from models.schema import (
    FEATURES,
    LESION_TYPE,
    FeatureKind,
    FeatureValidationError,
    Her2Group,
    InputValue,
    validate_inputs,
)

POSITIVE = "low"
REFERENCE_CLASS = "zero"
PREFERENCE: tuple[ModelVariant, ...] = (
    ModelVariant.COMBINED,
    ModelVariant.DESCRIPTORS,
    ModelVariant.QUANTITATIVE,
)
CHECK_TOLERANCE = 1e-5


class ModelLoadError(RuntimeError):
    """A model whose graph does not match its card (names, types, shapes, check cases)."""


@dataclass(frozen=True)
class _NumericTerm:
    index: int  # position in LoadedModel.inputs
    weight: float  # coef_low - coef_ref on the standardised value
    mean: float
    scale: float
    impute: float


def _present(value: InputValue) -> bool:
    """A validated value is present unless "" or NaN (NaN != NaN)."""
    return value != "" and value == value


class LoadedModel:
    """One verified variant: the ONNX session plus what is needed to explain its output."""

    def __init__(self, entry: ModelEntry, *, threads: int = 1) -> None:
        self.entry = entry
        card = entry.card
        data = entry.read_verified()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.inputs: tuple[str, ...] = tuple(card["onnx"]["inputs"])
        self.required: tuple[str, ...] = tuple(card.get("required_inputs", self.inputs))
        self.classes: tuple[str, ...] = tuple(str(c) for c in card["classes"])
        self.threshold = float(card["threshold"]["value"])
        self.variant = entry.variant
        self.reference = bool(card.get("reference", False))
        self.settings = fit_settings(card)
        self._check_graph()
        if POSITIVE not in self.classes:
            raise ModelLoadError(f"{entry.path}: classes {self.classes} lack {POSITIVE!r}")
        self.low_index = self.classes.index(POSITIVE)
        # Predictions list classes as zero, low, over (then any others) whatever the graph order.
        canonical: list[str] = [str(g.value) for g in Her2Group if g.value in self.classes]
        canonical += [c for c in self.classes if c not in canonical]
        self._display = tuple(self.classes.index(c) for c in canonical)
        self.display_classes: tuple[str, ...] = tuple(canonical)
        self._categorical = tuple(FEATURES[n].kind is FeatureKind.CATEGORICAL for n in self.inputs)
        self._prepare_contributions(card["coefficients"])
        self._considered = tuple(dict.fromkeys((*self.required, *self.inputs)))
        self._applies = {
            n: frozenset(t.value for t in FEATURES[n].applies_to) for n in self._considered
        }
        self._run_check_cases(card["onnx"].get("check_cases", []))
        # A site recalibration (models.recalibration) remaps P(low) after the graph; the check
        # cases above test the graph itself.
        self.recalibration = CalibrationMap.from_card(card)

    # -- load-time checks ---------------------------------------------------------------------
    def _check_graph(self) -> None:
        where = f"{self.entry.path}"
        for name in (*self.inputs, *self.required):
            if name not in FEATURES:
                raise ModelLoadError(f"{where}: card input {name!r} is not a schema feature")
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        if set(graph_inputs) != set(self.inputs):
            raise ModelLoadError(
                f"{where}: graph inputs {sorted(graph_inputs)} differ from the card's "
                f"{sorted(self.inputs)}"
            )
        for name in self.inputs:
            node = graph_inputs[name]
            want = (
                "tensor(string)"
                if FEATURES[name].kind is FeatureKind.CATEGORICAL
                else "tensor(float)"
            )
            if node.type != want:
                raise ModelLoadError(f"{where}: input {name!r} is {node.type}, expected {want}")
            shape = list(node.shape)
            if len(shape) != 2 or shape[1] != 1:
                raise ModelLoadError(f"{where}: input {name!r} has shape {shape}, expected [N, 1]")
        outputs = {o.name: o for o in self.session.get_outputs()}
        for name in (OUTPUT_LABEL, OUTPUT_PROBABILITIES):
            if name not in outputs:
                raise ModelLoadError(f"{where}: graph has no output {name!r}")
        width = outputs[OUTPUT_PROBABILITIES].shape[-1]
        if isinstance(width, int) and width != len(self.classes):
            raise ModelLoadError(
                f"{where}: probabilities has {width} columns, card lists {len(self.classes)}"
            )

    def _prepare_contributions(self, coefficients: Mapping[str, Any]) -> None:
        classes = list(coefficients["classes"])
        if classes != list(self.classes):
            raise ModelLoadError(f"{self.entry.path}: coefficient classes differ from classes")
        others = [c for c in classes if c != POSITIVE]

        def contrast(coef: Mapping[str, float]) -> float:
            if REFERENCE_CLASS in coef:
                return float(coef[POSITIVE] - coef[REFERENCE_CLASS])
            return float(coef[POSITIVE] - np.mean([coef[c] for c in others]))

        self.intercept_contrast = contrast(coefficients["intercept"])
        index = {name: i for i, name in enumerate(self.inputs)}
        self._numeric: list[_NumericTerm] = []
        self._levels: dict[int, dict[str, float]] = {}
        for term in coefficients["terms"]:
            i = index[term["feature"]]
            if term["level"] is None:
                self._numeric.append(
                    _NumericTerm(
                        i, contrast(term["coef"]), term["mean"], term["scale"], term["impute"]
                    )
                )
            else:
                self._levels.setdefault(i, {})[term["level"]] = contrast(term["coef"])

    def _run_check_cases(self, cases: Sequence[Mapping[str, Any]]) -> None:
        for case in cases:
            row = {
                name: (
                    (case["inputs"].get(name) or "")
                    if self._categorical[i]
                    else (math.nan if case["inputs"].get(name) is None else case["inputs"][name])
                )
                for i, name in enumerate(self.inputs)
            }
            got = self.run([row])[0]
            want = np.asarray(case["probabilities"], dtype=float)
            if got.shape != want.shape or np.max(np.abs(got - want)) > CHECK_TOLERANCE:
                raise ModelLoadError(
                    f"{self.entry.path}: check case gives {got.tolist()}, card expects "
                    f"{want.tolist()}; the graph and the card disagree"
                )

    # -- inference ----------------------------------------------------------------------------
    def feed(self, rows: Sequence[Mapping[str, InputValue]]) -> dict[str, np.ndarray]:
        feed: dict[str, np.ndarray] = {}
        for name, categorical in zip(self.inputs, self._categorical, strict=True):
            column = [row[name] for row in rows]
            if categorical:
                feed[name] = np.array(column, dtype=object).reshape(-1, 1)
            else:
                feed[name] = np.array(column, dtype=np.float32).reshape(-1, 1)
        return feed

    def run(self, rows: Sequence[Mapping[str, InputValue]]) -> np.ndarray:
        """Probabilities [len(rows), n_classes] for validated rows."""
        out = self.session.run([OUTPUT_PROBABILITIES], self.feed(rows))
        return np.asarray(out[0], dtype=float)

    def contributions(self, row: Mapping[str, InputValue]) -> tuple[Contribution, ...]:
        """Per-input log-odds terms (low vs zero), largest |log_odds| first."""
        terms: list[Contribution] = []
        for t in self._numeric:
            name = self.inputs[t.index]
            raw = float(row[name])
            x = t.impute if math.isnan(raw) else raw
            value = None if math.isnan(raw) else raw
            terms.append(Contribution(name, value, t.weight * (x - t.mean) / t.scale))
        for i, levels in self._levels.items():
            name = self.inputs[i]
            level = str(row[name])
            terms.append(Contribution(name, level or None, levels.get(level, 0.0)))
        terms.sort(key=lambda c: -abs(c.log_odds))
        return tuple(terms)

    def eligible(self, row: Mapping[str, InputValue]) -> bool:
        return all(_present(row[name]) for name in self.required)

    def missing_required(self, row: Mapping[str, InputValue]) -> list[str]:
        return [name for name in self.required if not _present(row[name])]

    def prediction(self, row: Mapping[str, InputValue], proba: np.ndarray) -> Prediction:
        lesion = str(row.get(LESION_TYPE, ""))
        used = tuple(n for n in self._considered if _present(row[n]))
        missing = tuple(
            n
            for n in self._considered
            if not _present(row[n]) and (not lesion or lesion in self._applies[n])
        )
        card = self.entry.card
        if self.recalibration is not None:
            proba = adjust(proba, self.low_index, self.recalibration)
        return Prediction(
            probability=float(proba[self.low_index]),
            classes=self.display_classes,
            probabilities=tuple(float(proba[i]) for i in self._display),
            threshold=self.threshold,
            model_name=str(card["name"]),
            model_version=str(card["version"]),
            variant=self.variant,
            reference=self.reference,
            onnx_sha256=self.entry.sha256,
            inputs_used=used,
            inputs_missing=missing,
            contributions=self.contributions(row),
        )


class ModelRuntime:
    """Loaded, verified model variants of one registry version; picks one per case."""

    def __init__(self, models: Iterable[LoadedModel]) -> None:
        by_variant: dict[ModelVariant, LoadedModel] = {}
        for model in models:
            if model.variant in by_variant:
                raise RegistryError(f"two {model.variant.value} models given")
            by_variant[model.variant] = model
        if not by_variant:
            raise RegistryError("no models to load")
        self._models = by_variant
        self._order = [by_variant[v] for v in PREFERENCE if v in by_variant]

    @classmethod
    def load(
        cls,
        model_dir: Path | None = None,
        *,
        name: str | None = None,
        version: str | None = None,
        threads: int = 1,
    ) -> ModelRuntime:
        """Load a model folder, a version folder or a registry (``None``: shipped reference).

        Raises ``ModelIntegrityError`` when an ONNX file does not match its card's SHA-256, and
        ``ModelLoadError`` when the graph does not match the card.
        """
        entries = resolve_entries(model_dir, name=name, version=version)
        return cls(LoadedModel(e, threads=threads) for e in entries)

    @property
    def variants(self) -> tuple[ModelVariant, ...]:
        return tuple(m.variant for m in self._order)

    def model(self, variant: ModelVariant | str) -> LoadedModel:
        variant = ModelVariant(variant)
        try:
            return self._models[variant]
        except KeyError:
            raise RegistryError(f"no {variant.value} model loaded") from None

    @property
    def cards(self) -> dict[ModelVariant, dict[str, Any]]:
        return {m.variant: m.entry.card for m in self._order}

    def check_conventions(self, conventions: AnalysisConventions) -> None:
        """Raise SettingsMismatchError if a result's settings differ from any loaded model's."""
        differences: list[str] = []
        for model in self._order:
            for line in model.settings.conventions.differences(conventions):
                if line not in differences:
                    differences.append(line)
        if differences:
            raise SettingsMismatchError(differences)

    def choose(self, row: Mapping[str, InputValue]) -> LoadedModel:
        """The most complete variant whose required inputs are present in a validated row."""
        for model in self._order:
            if model.eligible(row):
                return model
        first = self._order[0]
        missing = first.missing_required(row)
        options = "; ".join(
            f"{m.variant.value} needs {', '.join(m.missing_required(row))}" for m in self._order
        )
        raise FeatureValidationError(
            missing[0] if missing else LESION_TYPE,
            f"not enough inputs for any model variant ({options})",
        )

    def predict(
        self,
        inputs: Mapping[str, object],
        *,
        variant: ModelVariant | str | None = None,
        conventions: AnalysisConventions | None = None,
    ) -> Prediction:
        """P(HER2-low) of one lesion with its basis. Bad input raises FeatureValidationError;
        ``conventions`` (the result's settings) differing from the model's raise
        SettingsMismatchError before anything is computed."""
        if conventions is not None:
            self.check_conventions(conventions)
        row = validate_inputs(inputs)
        model = self.model(variant) if variant is not None else self.choose(row)
        if variant is not None and not model.eligible(row):
            missing = model.missing_required(row)
            raise FeatureValidationError(
                missing[0], f"required by the {model.variant.value} model but missing"
            )
        return model.prediction(row, model.run([row])[0])

    def predict_batch(
        self, rows: Iterable[Mapping[str, object]], *, variant: ModelVariant | str | None = None
    ) -> list[Prediction]:
        """Predictions for many lesions; each row gets its own variant, one run per variant.

        The cyclic garbage collector is paused while the result objects are built: they hold no
        cycles, and collections triggered by thousands of small allocations tripled the cost.
        """
        with _gc_paused():
            return self._predict_batch(rows, variant)

    def _predict_batch(
        self, rows: Iterable[Mapping[str, object]], variant: ModelVariant | str | None
    ) -> list[Prediction]:
        checked = [validate_inputs(r) for r in rows]
        chosen: list[LoadedModel] = []
        for row in checked:
            model = self.model(variant) if variant is not None else self.choose(row)
            if variant is not None and not model.eligible(row):
                missing = model.missing_required(row)
                raise FeatureValidationError(
                    missing[0], f"required by the {model.variant.value} model but missing"
                )
            chosen.append(model)
        results: list[Prediction | None] = [None] * len(checked)
        for model in self._order:
            idx = [i for i, m in enumerate(chosen) if m is model]
            if not idx:
                continue
            proba = model.run([checked[i] for i in idx])
            for k, i in enumerate(idx):
                results[i] = model.prediction(checked[i], proba[k])
        return [r for r in results if r is not None]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@functools.lru_cache(maxsize=8)
def _cached(path: str | None, name: str | None, version: str | None) -> ModelRuntime:
    return ModelRuntime.load(Path(path) if path else None, name=name, version=version)


def get_runtime(
    model_dir: Path | None = None, *, name: str | None = None, version: str | None = None
) -> ModelRuntime:
    """A process-wide runtime per location, loaded (and verified) once."""
    return _cached(str(model_dir) if model_dir else None, name, version)
