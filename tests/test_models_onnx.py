"""The ONNX graph is the whole pipeline: same probabilities as scikit-learn, contract-named I/O."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest

from models.data import Cohort
from models.estimator import Her2LowClassifier
from models.export import feed_from_rows, to_onnx
from models.schema import DESCRIPTOR_NAMES, FEATURE_NAMES, FEATURES, QUANTITATIVE_NAMES
from models.simulate import simulate_cohort

_TYPICAL = {  # ranges random inputs are drawn from, per statistic (all within the schema)
    "mean": (0.3e-3, 3.0e-3),
    "median": (0.3e-3, 3.0e-3),
    "p5": (0.0, 2.0e-3),
    "p95": (0.5e-3, 3.5e-3),
    "skewness": (-2.0, 2.0),
    "kurtosis": (-1.5, 8.0),
    "entropy": (1.0, 7.0),
}


def random_rows(n: int, seed: int) -> list[dict]:
    """Valid inputs: random lesion type, applicable descriptors (20 % blank), 20 % NaN numbers."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        lesion = str(rng.choice(["mass", "nme", ""]))
        row: dict = {}
        for name in DESCRIPTOR_NAMES:
            spec = FEATURES[name]
            if name == "lesion_type":
                row[name] = lesion
            elif lesion and lesion not in {t.value for t in spec.applies_to}:
                row[name] = ""
            else:
                row[name] = "" if rng.random() < 0.2 else str(rng.choice(spec.values))
        for name in QUANTITATIVE_NAMES:
            stat = FEATURES[name].extra["statistic"]
            lo, hi = _TYPICAL[stat]
            if name.startswith("kapp") and stat in ("mean", "median", "p5", "p95"):
                lo, hi = lo * 1000 / 1.5, hi * 1000 / 1.5
            row[name] = float("nan") if rng.random() < 0.2 else float(rng.uniform(lo, hi))
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def fitted() -> Her2LowClassifier:
    cohort = Cohort.from_records(simulate_cohort(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Her2LowClassifier(FEATURE_NAMES).fit(cohort.matrix(FEATURE_NAMES), cohort.y)


@pytest.fixture(scope="module")
def session(fitted: Her2LowClassifier) -> ort.InferenceSession:
    return ort.InferenceSession(
        to_onnx(fitted).SerializeToString(), providers=["CPUExecutionProvider"]
    )


def test_graph_inputs_and_outputs_follow_the_contract(
    fitted: Her2LowClassifier, session: ort.InferenceSession
) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == list(FEATURE_NAMES)
    assert inputs["mass_shape"].type == "tensor(string)"
    assert inputs["dapp_mean"].type == "tensor(float)"
    assert all(len(i.shape) == 2 and i.shape[1] == 1 for i in inputs.values())
    assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]


def test_onnx_matches_sklearn_on_random_valid_inputs(
    fitted: Her2LowClassifier, session: ort.InferenceSession
) -> None:
    rows = random_rows(500, seed=11)
    assert any(r["mass_shape"] == "" for r in rows) and any(np.isnan(r["dapp_mean"]) for r in rows)
    X = np.empty((len(rows), len(FEATURE_NAMES)), dtype=object)
    for j, name in enumerate(FEATURE_NAMES):
        X[:, j] = [r[name] for r in rows]
    expected = fitted.predict_proba(X)
    label, proba = session.run(None, feed_from_rows(FEATURE_NAMES, rows))
    assert proba.shape == (500, 3)
    np.testing.assert_allclose(proba, expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(label, fitted.predict(X))
    # The preprocessing really is inside the graph: blanks and NaN move the output.
    changed = dict(rows[0], mass_shape="", dapp_mean=float("nan"), kapp_mean=float("nan"))
    p_changed = session.run(None, feed_from_rows(FEATURE_NAMES, [changed]))[1]
    assert not np.allclose(p_changed, proba[:1])


def test_selected_subset_exports_only_its_inputs() -> None:
    cohort = Cohort.from_records(simulate_cohort(2))
    names = ("mass_shape", "peritumoral_edema", "kapp_mean")
    model = Her2LowClassifier(names).fit(cohort.matrix(names), cohort.y)
    sess = ort.InferenceSession(to_onnx(model).SerializeToString())
    assert [i.name for i in sess.get_inputs()] == list(names)
    rows = random_rows(50, seed=3)
    X = np.asarray([[r[n] for n in names] for r in rows], dtype=object)
    got = sess.run(["probabilities"], feed_from_rows(names, rows))[0]
    np.testing.assert_allclose(got, model.predict_proba(X), atol=1e-5, rtol=0)
