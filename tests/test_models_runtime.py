"""Registry integrity and the runtime: hash check, load-time graph checks, variant choice."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from models.data import Cohort
from models.prediction import ModelVariant, Prediction
from models.registry import ModelIntegrityError, Registry, RegistryError, compare
from models.runtime import ModelLoadError, ModelRuntime, get_runtime
from models.schema import FeatureValidationError
from models.simulate import simulate_cohort
from models.training import ModelInfo, TrainingConfig, train_and_save

VARIANTS = {
    ModelVariant.COMBINED: (
        "lesion_type",
        "mass_shape",
        "peritumoral_edema",
        "dapp_mean",
        "kapp_mean",
    ),
    ModelVariant.DESCRIPTORS: (
        "lesion_type",
        "mass_shape",
        "peritumoral_edema",
        "t2_hyperintensity",
    ),
    ModelVariant.QUANTITATIVE: ("dapp_mean", "kapp_mean", "kapp_p95"),
}
MASS = {
    "lesion_type": "mass",
    "mass_shape": "irregular",
    "peritumoral_edema": "no",
    "t2_hyperintensity": "no",
}
DKI = {"dapp_mean": 1.1e-3, "kapp_mean": 0.95, "kapp_p95": 1.25}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    tmp = tmp_path_factory.mktemp("reg")
    cohort = Cohort.from_records(simulate_cohort(9))
    reg = Registry(tmp / "registry")
    for version in ("0.9.0", "0.10.0"):
        for variant, features in VARIANTS.items():
            config = TrainingConfig(features=features, n_bootstrap=50, cv_folds=3)
            out = tmp / f"{version}-{variant.value}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train_and_save(cohort, out, config, ModelInfo(name="site", version=version))
            reg.add(out)
    return reg


@pytest.fixture(scope="module")
def runtime(registry: Registry) -> ModelRuntime:
    return ModelRuntime.load(registry.root)


def test_registry_layout_and_latest_version(registry: Registry) -> None:
    assert registry.names() == ["site"]
    assert registry.versions("site") == ["0.9.0", "0.10.0"]
    entries = registry.entries()
    assert {e.version for e in entries} == {"0.10.0"}
    assert {e.variant for e in entries} == set(ModelVariant)
    assert (registry.root / "site" / "0.10.0" / "combined" / "card.md").is_file()
    rows = compare(entries)
    assert {r["subset"] for r in rows} == {"all", "mass", "nme"}
    with pytest.raises(RegistryError, match="immutable"):
        registry.add(entries[0].path)


def test_runtime_chooses_variant_by_available_inputs(runtime: ModelRuntime) -> None:
    assert runtime.predict({**MASS, **DKI}).variant is ModelVariant.COMBINED
    assert runtime.predict(MASS).variant is ModelVariant.DESCRIPTORS
    assert runtime.predict(DKI).variant is ModelVariant.QUANTITATIVE
    # A descriptor model needs the lesion type; a partial DKI set cannot use combined.
    assert runtime.predict({"mass_shape": "oval", **DKI}).variant is ModelVariant.QUANTITATIVE
    partial = {**MASS, "dapp_mean": 1.1e-3}
    assert runtime.predict(partial).variant is ModelVariant.DESCRIPTORS
    with pytest.raises(FeatureValidationError, match="not enough inputs") as info:
        runtime.predict({"mass_shape": "oval"})
    assert info.value.feature == "lesion_type"
    forced = runtime.predict({**MASS, **DKI}, variant="quantitative")
    assert forced.variant is ModelVariant.QUANTITATIVE
    with pytest.raises(FeatureValidationError) as info:
        runtime.predict(MASS, variant=ModelVariant.QUANTITATIVE)
    assert info.value.feature == "dapp_mean"


def test_prediction_fields_and_contributions_add_up(runtime: ModelRuntime) -> None:
    inputs = {**MASS, **DKI}
    p = runtime.predict(inputs)
    card = runtime.cards[ModelVariant.COMBINED]
    assert isinstance(p, Prediction)
    assert p.classes == ("zero", "low", "over")
    assert p.probability == p.probabilities[1]
    assert math.isclose(sum(p.probabilities), 1.0, abs_tol=1e-5)
    assert p.threshold == card["threshold"]["value"]
    assert (p.model_name, p.model_version, p.reference) == ("site", "0.10.0", False)
    assert p.onnx_sha256 == card["onnx"]["sha256"]
    assert set(p.inputs_used) == set(VARIANTS[ModelVariant.COMBINED])
    assert p.inputs_missing == ()
    assert [c.feature for c in p.contributions] != []
    assert all(
        abs(a.log_odds) >= abs(b.log_odds)
        for a, b in zip(p.contributions, p.contributions[1:], strict=False)
    )
    coef = card["coefficients"]
    intercept = coef["intercept"]["low"] - coef["intercept"]["zero"]
    log_odds = math.log(p.probabilities[1] / p.probabilities[0])
    assert intercept + sum(c.log_odds for c in p.contributions) == pytest.approx(log_odds, abs=1e-4)
    assert Prediction.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_missing_optional_inputs_are_reported(runtime: ModelRuntime) -> None:
    p = runtime.predict({"lesion_type": "nme", **DKI})
    assert p.variant is ModelVariant.COMBINED
    # mass_shape does not apply to NME: neither used nor missing; edema applies but is blank.
    assert "mass_shape" not in p.inputs_missing and "peritumoral_edema" in p.inputs_missing
    by_name = {c.feature: c for c in p.contributions}
    assert by_name["peritumoral_edema"].value is None


def test_batch_matches_single_and_mixes_variants(runtime: ModelRuntime) -> None:
    rows = [{**MASS, **DKI}, MASS, DKI, {"lesion_type": "nme", **DKI}]
    batch = runtime.predict_batch(rows)
    assert [p.variant for p in batch] == [
        ModelVariant.COMBINED,
        ModelVariant.DESCRIPTORS,
        ModelVariant.QUANTITATIVE,
        ModelVariant.COMBINED,
    ]
    for row, p in zip(rows, batch, strict=True):
        single = runtime.predict(row)
        np.testing.assert_allclose(p.probabilities, single.probabilities, atol=1e-6)


def test_bad_input_names_the_feature_never_nan(runtime: ModelRuntime) -> None:
    for bad, feature in (
        ({**MASS, **DKI, "dapp_mean": "n/a"}, "dapp_mean"),
        ({**MASS, "mass_shape": "lobular"}, "mass_shape"),
        ({**MASS, "nme_distribution": "linear"}, "nme_distribution"),
        ({**DKI, "kapp_mean": 9.0}, "kapp_mean"),
    ):
        with pytest.raises(FeatureValidationError) as info:
            runtime.predict(bad)
        assert info.value.feature == feature
    with pytest.raises(FeatureValidationError):
        runtime.predict_batch([MASS, {**MASS, "mass_margin": "wavy"}])


def test_registry_refuses_a_model_whose_hash_does_not_match(
    registry: Registry, tmp_path: Path
) -> None:
    src = registry.entries()[0].path
    tampered = tmp_path / "tampered"
    shutil.copytree(src, tampered)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[-1] ^= 0x01
    (tampered / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        ModelRuntime.load(tampered)
    with pytest.raises(ModelIntegrityError):
        Registry(tmp_path / "other").add(tampered)
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())


def test_runtime_refuses_a_card_that_does_not_match_the_graph(
    registry: Registry, tmp_path: Path
) -> None:
    src = next(e for e in registry.entries() if e.variant is ModelVariant.COMBINED).path
    for mutate, message in (
        (lambda c: c["onnx"].__setitem__("inputs", c["onnx"]["inputs"][:-1]), "graph inputs"),
        (
            lambda c: c["onnx"]["check_cases"][0].__setitem__("probabilities", [0.2, 0.3, 0.5]),
            "check case",
        ),
    ):
        dest = tmp_path / message.replace(" ", "_")
        shutil.copytree(src, dest)
        card = json.loads((dest / "card.json").read_text())
        mutate(card)
        (dest / "card.json").write_text(json.dumps(card))
        with pytest.raises(ModelLoadError, match=message):
            ModelRuntime.load(dest)


def test_reference_runtime_is_flagged_and_cached() -> None:
    rt = get_runtime()
    assert rt is get_runtime()
    assert rt.variants == (
        ModelVariant.COMBINED,
        ModelVariant.DESCRIPTORS,
        ModelVariant.QUANTITATIVE,
    )
    p = rt.predict(
        {**MASS, "dapp_p5": 0.7e-3, "dapp_mean": 1.1e-3, "kapp_p95": 1.2, "kapp_mean": 0.95}
    )
    assert p.reference is True and p.model_name == "her2low-reference"
    assert 0.0 <= p.probability <= 1.0
