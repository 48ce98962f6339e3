"""Model lifecycle: recalibration on a site's labelled cases without retraining, recorded in the
card with before/after plots; and the seed paper's figures beside the model's own."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from models.card import SEED_PAPER, read_card
from models.cli import main as model_cli
from models.contract import FeatureValidationError
from models.data import read_cohort_csv, write_cohort_csv
from models.prediction import ModelVariant
from models.recalibration import CalibrationMap, adjust, fit_map
from models.registry import reference_root
from models.runtime import ModelRuntime
from models.simulate import simulate_cohort

REFERENCE = reference_root() / "her2low-reference" / "0.1.0"


def _miscalibrated(n: int = 4000, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Model P(low) that is overconfident: truth is sigmoid(0.5·logit(p) − 0.4)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, n)
    truth = 1 / (1 + np.exp(-(0.5 * np.log(p / (1 - p)) - 0.4)))
    return p, rng.random(n) < truth


def test_platt_recovers_a_known_miscalibration() -> None:
    p, y = _miscalibrated()
    mapping = fit_map(p, y, "platt")
    assert mapping.a == pytest.approx(0.5, abs=0.1) and mapping.b == pytest.approx(-0.4, abs=0.1)
    after = mapping.apply(p)
    assert np.mean((after - y) ** 2) < np.mean((p - y) ** 2)
    assert np.all(np.diff(mapping.apply(np.sort(p))) >= 0)  # monotone: ranking kept


def test_isotonic_is_monotone_within_zero_one() -> None:
    p, y = _miscalibrated(seed=5)
    mapping = fit_map(p, y, "isotonic")
    grid = np.linspace(0, 1, 101)
    out = mapping.apply(grid)
    assert np.all(np.diff(out) >= 0) and out.min() >= 0 and out.max() <= 1
    again = CalibrationMap.from_card({"recalibration": {"map": mapping.to_card()}})
    assert again == mapping


def test_adjust_keeps_a_probability_vector() -> None:
    mapping = CalibrationMap("platt", a=1.0, b=1.0)
    out = adjust(np.array([0.2, 0.5, 0.3]), 1, mapping)
    assert out.sum() == pytest.approx(1.0) and out[1] == pytest.approx(float(mapping.apply(0.5)))
    assert out[0] / out[2] == pytest.approx(0.2 / 0.3)


def test_too_few_or_one_sided_cases_are_refused() -> None:
    with pytest.raises(ValueError, match="both kinds"):
        fit_map([0.5] * 20, [True] * 20, "platt")
    with pytest.raises(ValueError, match="method"):
        fit_map(*_miscalibrated(), "beta")


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_cli_recalibrates_a_model_and_the_runtime_applies_it(
    tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site.csv"
    write_cohort_csv(site, simulate_cohort(11))
    source = REFERENCE / ModelVariant.QUANTITATIVE.value
    out = tmp_path / "recal"
    code = model_cli(
        ["model", "recalibrate", str(source), str(site), "--method", method, "--out", str(out)]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == method

    card = read_card(out)
    original = read_card(source)
    rec = card["recalibration"]
    assert rec["method"] == method and rec["cohort"]["n"] == len(read_cohort_csv(site))
    assert rec["after"]["brier"] <= rec["before"]["brier"] + 1e-12
    assert card["version"] == f"0.1.0-recal-{method}"
    # The graph is untouched: same bytes, same hash as the original card records.
    onnx = (out / "model.onnx").read_bytes()
    assert hashlib.sha256(onnx).hexdigest() == original["onnx"]["sha256"] == card["onnx"]["sha256"]
    for png in ("calibration_before.png", "calibration_after.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    text = (out / "card.md").read_text()
    assert "### Site recalibration" in text and "calibration_after.png" in text

    mapping = CalibrationMap.from_card(card)
    assert mapping is not None
    raw_rt, new_rt = ModelRuntime.load(source), ModelRuntime.load(out)
    cohort = read_cohort_csv(site)
    checked = 0
    for row in list(cohort.rows)[:40]:
        inputs = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        try:
            raw = raw_rt.predict(inputs, variant="quantitative")
        except FeatureValidationError:
            continue  # a simulated case without the model's input
        checked += 1
        new = new_rt.predict(inputs, variant="quantitative")
        assert new.probability == pytest.approx(float(mapping.apply(raw.probability)))
        assert sum(new.probabilities) == pytest.approx(1.0)
        if method == "platt":  # strictly monotone: every case keeps its side of the threshold
            assert new.above_threshold == raw.above_threshold

    assert checked >= 20
    # A recalibrated model is not recalibrated again (start from the original).
    assert (
        model_cli(["model", "recalibrate", str(out), str(site), "--out", str(tmp_path / "again")])
        == 2
    )


def test_cards_state_the_seed_paper_beside_the_simulated_figures() -> None:
    figures = {c["variant"]: c["paper_auc"] for c in SEED_PAPER["comparisons"]}
    assert figures == {"descriptors": 0.763, "combined": 0.802}
    for variant in ModelVariant:
        card = read_card(REFERENCE / variant.value)
        assert card["seed_paper"] == SEED_PAPER
        text = (REFERENCE / variant.value / "card.md").read_text()
        assert "Shen et al., Tomography 2025;11(3):31" in text
        assert "0.763" in text and "0.802" in text and "non-mass enhancement" in text
        assert "simulated cohort (not clinical)" in text
    combined = (REFERENCE / "combined" / "card.md").read_text()
    own = {
        (m["task"], m["subset"]): m["auc"]
        for m in read_card(REFERENCE / "combined")["performance"]["metrics"]
    }
    assert f"{own[('low_vs_zero', 'nme')]:.3f} (nme lesions)" in combined
