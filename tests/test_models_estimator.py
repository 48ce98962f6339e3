"""Her2LowClassifier: the sklearn contract, recovery of a planted signal, paper-style selection."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import estimator_checks_generator

from models.data import Cohort
from models.estimator import Her2LowClassifier
from models.schema import FEATURE_NAMES
from models.simulate import simulate_cohort, simulate_planted


def _contract_checks() -> list[tuple[object, object]]:
    """scikit-learn's estimator checks, less the array-API dispatch check: the estimator declares
    no array API support, and that check needs SCIPY_ARRAY_API set before scipy is imported,
    which would change scipy's behaviour for the whole suite."""
    pairs = []
    for estimator in (Her2LowClassifier(), Her2LowClassifier(select=True)):
        for est, check in estimator_checks_generator(estimator):
            name = getattr(check, "func", check).__name__
            if name != "check_array_api_input":
                pairs.append((est, check))
    return pairs


@pytest.mark.parametrize(
    ("estimator", "check"),
    _contract_checks(),
    ids=lambda x: getattr(getattr(x, "func", x), "__name__", repr(x)),
)
def test_sklearn_contract(estimator, check) -> None:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(estimator)


PLANTED = {"dapp_mean": -1.0, "kapp_mean": 0.8, "edema_yes": -1.2}
FEATURES = ("peritumoral_edema", "t2_hyperintensity", "dapp_mean", "kapp_mean", "adc_skewness")


@pytest.fixture(scope="module")
def planted() -> Cohort:
    rows = simulate_planted(
        3000,
        seed=3,
        beta_dapp_mean=PLANTED["dapp_mean"],
        beta_kapp_mean=PLANTED["kapp_mean"],
        beta_edema_yes=PLANTED["edema_yes"],
    )
    return Cohort.from_records(rows)


def test_training_recovers_planted_coefficients(planted: Cohort) -> None:
    model = Her2LowClassifier(FEATURES, C=1e4).fit(planted.matrix(FEATURES), planted.y)
    assert list(model.classes_) == ["low", "zero"]
    coef = dict()
    for term, w in zip(model.terms(), model.coef_[0], strict=True):
        coef[(term.feature, term.level)] = float(w)  # log-odds of "zero" (classes_[1])
    # sklearn's binary coefficients are for classes_[1] = "zero": flip the sign for P(low).
    d = -coef[("dapp_mean", None)]
    k = -coef[("kapp_mean", None)]
    e = -(coef[("peritumoral_edema", "yes")] - coef[("peritumoral_edema", "no")])
    # Standardised by the sample SD rather than the generator's nominal SD: allow 25 %.
    assert d == pytest.approx(PLANTED["dapp_mean"], rel=0.25)
    assert k == pytest.approx(PLANTED["kapp_mean"], rel=0.25)
    assert e == pytest.approx(PLANTED["edema_yes"], rel=0.25)
    noise_t2 = coef[("t2_hyperintensity", "yes")] - coef[("t2_hyperintensity", "no")]
    assert abs(noise_t2) < 0.25 and abs(coef[("adc_skewness", None)]) < 0.2


def test_selection_keeps_planted_features_and_drops_noise(planted: Cohort) -> None:
    names = (*FEATURES, "kapp_entropy", "nme_distribution")
    X = planted.matrix(names)[:1500]
    model = Her2LowClassifier(names, select=True).fit(X, planted.y[:1500])
    assert {"peritumoral_edema", "dapp_mean", "kapp_mean"} <= set(model.selected_features_)
    assert "t2_hyperintensity" not in model.selected_features_
    assert model.selection_["univariable_p"]["dapp_mean"] < 1e-6
    assert set(model.selection_["multivariable_p"]) == set(model.selected_features_)
    assert all(p < 0.05 for p in model.selection_["multivariable_p"].values())
    # Only the selected columns feed the final pipeline.
    n_in = model.pipeline_.named_steps["preprocess"].n_features_in_
    assert n_in == len(model.selected_features_)


def test_mixed_inputs_on_the_simulated_cohort() -> None:
    cohort = Cohort.from_records(simulate_cohort(1))
    X = cohort.matrix(FEATURE_NAMES)
    model = Her2LowClassifier(FEATURE_NAMES).fit(X, cohort.y)
    proba = model.predict_proba(X)
    assert proba.shape == (len(cohort), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert list(model.classes_) == ["low", "over", "zero"]
    assert clone(model).get_params() == model.get_params()
    with pytest.raises(ValueError, match="features"):
        model.predict_proba(X[:, :5])


def test_bad_hyperparameters_are_rejected() -> None:
    X = np.zeros((4, 1))
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="alpha_univariable"):
        Her2LowClassifier(alpha_univariable=0.0).fit(X, y)
    with pytest.raises(ValueError, match="unknown features"):
        Her2LowClassifier(("nope",)).fit(X, y)
