"""The HER2 classifier: optional paper-style feature selection, then a plain sklearn Pipeline.

Selection lives inside ``fit`` so cross-validation repeats it in every fold (selecting on the
whole cohort first would make the reported AUCs optimistic). What ``fit`` leaves behind,
``pipeline_``, is an ordinary Pipeline (ColumnTransformer -> LogisticRegression) over the
selected features only, which is what gets exported to ONNX.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from models.schema import FEATURES, FeatureKind

#: Ridge of the likelihood-ratio fits in the selection step: small enough that the deviances are
#: the textbook ones, large enough that a separating or collinear feature cannot diverge.
SELECTION_RIDGE = 1e-3


@dataclass(frozen=True)
class Term:
    """One column of the design matrix the logistic model sees."""

    feature: str
    level: str | None  # one-hot level ("" = absent) for descriptors, None for numbers
    mean: float | None = None  # StandardScaler mean (numbers)
    scale: float | None = None  # StandardScaler scale (numbers)
    impute: float | None = None  # SimpleImputer fill value (numbers)


def feature_kinds(features: Sequence[str] | None, n_features: int) -> list[FeatureKind]:
    """Schema kind of each column; without names every column is numeric (generic use)."""
    if features is None:
        return [FeatureKind.NUMERIC] * n_features
    return [FEATURES[name].kind if name in FEATURES else FeatureKind.NUMERIC for name in features]


def build_pipeline(
    features: Sequence[str],
    kinds: Sequence[FeatureKind],
    *,
    C: float,
    class_weight: str | None,
    max_iter: int,
    tol: float,
) -> Pipeline:
    """ColumnTransformer (one-hot | median impute + standardise) -> LogisticRegression.

    Descriptor categories come from the schema with "" (not entered / does not apply) as a level
    of its own, so the graph knows every controlled value even if training never saw it.
    """
    cat_idx = [i for i, k in enumerate(kinds) if k is FeatureKind.CATEGORICAL]
    num_idx = [i for i, k in enumerate(kinds) if k is FeatureKind.NUMERIC]
    transformers: list[tuple[str, Any, list[int]]] = []
    if cat_idx:
        categories = [["", *FEATURES[features[i]].values] for i in cat_idx]
        encoder = OneHotEncoder(categories=categories, handle_unknown="ignore", dtype=np.float64)
        transformers.append(("descriptors", encoder, cat_idx))
    if num_idx:
        numeric = make_pipeline(
            SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler()
        )
        transformers.append(("quantitative", numeric, num_idx))
    return Pipeline(
        [
            ("preprocess", ColumnTransformer(transformers, sparse_threshold=0.0)),
            (
                "classifier",
                LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter, tol=tol),
            ),
        ]
    )


def _design_block(column: np.ndarray, kind: FeatureKind) -> np.ndarray:
    """Design columns of one feature for the selection fits.

    Numbers: median-imputed and standardised. Descriptors: indicators of the observed levels
    minus the most frequent one (reference), so the block width is the parameter count.
    """
    if kind is FeatureKind.NUMERIC:
        x = np.asarray(column, dtype=float)
        x = np.where(np.isnan(x), np.nanmedian(x) if np.isfinite(x).any() else 0.0, x)
        sd = x.std()
        return ((x - x.mean()) / sd).reshape(-1, 1) if sd > 0 else np.zeros((len(x), 0))
    values = np.asarray([str(v) for v in column])
    levels, counts = np.unique(values, return_counts=True)
    others = [lv for lv in levels if lv != levels[np.argmax(counts)]]
    return (
        np.column_stack([values == lv for lv in others]).astype(float)
        if others
        else (np.zeros((len(values), 0)))
    )


def _baseline_logit_ll(blocks: Sequence[np.ndarray], onehot_y: np.ndarray) -> float:
    """Maximised log-likelihood of a baseline-category logit model (lightly ridged).

    Damped Newton: the design is small (n cases x a few dozen columns), so the exact Hessian is
    cheap and converges in a handful of steps even when histogram statistics are collinear.
    """
    n, k = onehot_y.shape
    m = k - 1
    Z = np.column_stack([np.ones(n), *blocks]) if blocks else np.ones((n, 1))
    p = Z.shape[1]
    ridge = np.full(p, SELECTION_RIDGE)
    ridge[0] = 0.0
    Y = onehot_y[:, 1:]

    def loglik(W: np.ndarray) -> tuple[float, np.ndarray]:
        eta = np.column_stack([np.zeros(n), Z @ W])
        eta -= eta.max(axis=1, keepdims=True)
        log_p = eta - np.log(np.exp(eta).sum(axis=1, keepdims=True))
        return float(np.sum(onehot_y * log_p)), np.exp(log_p[:, 1:])

    def objective(W: np.ndarray) -> float:
        return loglik(W)[0] - 0.5 * float(np.sum(ridge[:, None] * W**2))

    W = np.zeros((p, m))
    current = objective(W)
    for _ in range(100):
        _, P = loglik(W)
        grad = Z.T @ (Y - P) - ridge[:, None] * W  # (p, m)
        H = np.empty((p * m, p * m))
        for a in range(m):
            for b in range(m):
                w = P[:, a] * ((1.0 if a == b else 0.0) - P[:, b])
                H[a * p : (a + 1) * p, b * p : (b + 1) * p] = (Z * w[:, None]).T @ Z
        H += np.diag(np.tile(ridge, m)) + 1e-10 * np.eye(p * m)
        try:
            step = np.linalg.solve(H, grad.T.ravel()).reshape(m, p).T
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(H, grad.T.ravel(), rcond=None)[0].reshape(m, p).T
        t = 1.0
        while t > 1e-6:
            candidate = objective(W + t * step)
            if candidate >= current - 1e-12:
                break
            t *= 0.5
        W = W + t * step
        improvement = candidate - current
        current = candidate
        if abs(improvement) < 1e-9:
            break
    return loglik(W)[0]


class Her2LowClassifier(ClassifierMixin, BaseEstimator):
    """Logistic model of the HER2 group from descriptors and DKI histogram features.

    Parameters
    ----------
    features : sequence of str or None
        Column names of ``X`` (schema names). Descriptors are one-hot encoded, numbers median-
        imputed and standardised. ``None`` treats every column as numeric (generic use).
    select : bool
        Paper-style selection (Shen et al. 2025): keep features whose univariable
        likelihood-ratio test has p < ``alpha_univariable``, then drop features one by one from
        the multivariable model while the largest drop-one p >= ``alpha_multivariable``.
    alpha_univariable, alpha_multivariable : float
        Significance levels of the two selection steps.
    C : float
        Inverse L2 regularisation strength of the final model.
    class_weight : "balanced" or None
        Passed to LogisticRegression.
    max_iter, tol : int, float
        Solver settings of LogisticRegression (lbfgs).

    Attributes
    ----------
    classes_ : ndarray
        Class labels in the order of ``predict_proba`` columns.
    n_features_in_ : int
        Number of columns of ``X`` at fit.
    input_features_ : tuple of str
        Names of the columns of ``X``.
    selected_features_ : tuple of str
        Columns the final model uses (all of them when ``select`` is False).
    selection_ : dict
        p-values of both selection steps (empty when ``select`` is False).
    pipeline_ : Pipeline
        The fitted pipeline over ``selected_features_`` (this is what is exported to ONNX).
    n_iter_ : ndarray
        Solver iterations of the final LogisticRegression.
    """

    def __init__(
        self,
        features: Sequence[str] | None = None,
        *,
        select: bool = False,
        alpha_univariable: float = 0.05,
        alpha_multivariable: float = 0.05,
        C: float = 1.0,
        class_weight: str | None = None,
        max_iter: int = 1000,
        tol: float = 1e-6,
    ) -> None:
        self.features = features
        self.select = select
        self.alpha_univariable = alpha_univariable
        self.alpha_multivariable = alpha_multivariable
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        if self.features is not None and any(
            k is FeatureKind.CATEGORICAL for k in feature_kinds(self.features, 0)
        ):
            tags.input_tags.string = True
            tags.input_tags.categorical = True
        return tags

    def _check_params(self) -> None:
        for name in ("alpha_univariable", "alpha_multivariable"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C!r}")
        if self.features is not None:
            unknown = [f for f in self.features if f not in FEATURES]
            if unknown:
                raise ValueError(f"unknown features: {', '.join(unknown)}")
            if len(set(self.features)) != len(self.features):
                raise ValueError("features must not repeat")

    def _validate_x(self, X: Any, y: Any = None, *, reset: bool) -> Any:
        kinds = feature_kinds(self.features, 0)
        mixed = self.features is not None and any(k is FeatureKind.CATEGORICAL for k in kinds)
        if mixed:
            if y is None:
                X = validate_data(self, X, reset=reset, dtype=None, ensure_all_finite=False)
            else:
                X, y = validate_data(self, X, y, reset=reset, dtype=None, ensure_all_finite=False)
            X = np.asarray(X, dtype=object)
        elif y is None:
            X = validate_data(self, X, reset=reset, ensure_all_finite="allow-nan")
        else:
            X, y = validate_data(self, X, y, reset=reset, ensure_all_finite="allow-nan")
        if self.features is not None and X.shape[1] != len(self.features):
            raise ValueError(
                f"X has {X.shape[1]} columns but {len(self.features)} features are named"
            )
        return X if y is None else (X, y)

    def _pipeline(self, names: Sequence[str], kinds: Sequence[FeatureKind], C: float) -> Pipeline:
        return build_pipeline(
            names, kinds, C=C, class_weight=self.class_weight, max_iter=self.max_iter, tol=self.tol
        )

    def fit(self, X: Any, y: Any) -> Her2LowClassifier:
        """Select features (optionally) and fit the pipeline; returns ``self``."""
        self._check_params()
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None"
            )
        X, y = self._validate_x(X, y, reset=True)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y has only 1 class ({self.classes_[0]!r}); at least 2 are needed")
        names = (
            tuple(self.features)
            if self.features is not None
            else tuple(f"x{i}" for i in range(X.shape[1]))
        )
        kinds = feature_kinds(self.features, X.shape[1])
        self.input_features_ = names
        if self.select:
            chosen, self.selection_ = self._select(X, y_idx, names, kinds)
        else:
            chosen, self.selection_ = list(range(X.shape[1])), {}
        self._columns_ = np.asarray(chosen, dtype=int)
        self.selected_features_ = tuple(names[i] for i in chosen)
        sel_kinds = [kinds[i] for i in chosen]
        self.pipeline_ = self._pipeline(self.selected_features_, sel_kinds, self.C)
        self.pipeline_.fit(X[:, self._columns_], y)
        self.n_iter_ = np.asarray(self.pipeline_.named_steps["classifier"].n_iter_)
        return self

    def _select(
        self,
        X: np.ndarray,
        y_idx: np.ndarray,
        names: Sequence[str],
        kinds: Sequence[FeatureKind],
    ) -> tuple[list[int], dict[str, Any]]:
        """Univariable LRT screen, then backward elimination by drop-one LRT."""
        n_classes = len(self.classes_)
        blocks = [_design_block(X[:, j], kinds[j]) for j in range(X.shape[1])]
        onehot_y = np.eye(n_classes)[y_idx]

        def fit_ll(cols: Sequence[int]) -> float:
            return _baseline_logit_ll([blocks[c] for c in cols], onehot_y)

        def df_of(cols: Sequence[int]) -> int:
            return sum(blocks[c].shape[1] for c in cols) * (n_classes - 1)

        ll_null = fit_ll([])
        univariable: dict[str, float] = {}
        for j in range(X.shape[1]):
            df = df_of([j])
            stat = max(2.0 * (fit_ll([j]) - ll_null), 0.0)
            univariable[names[j]] = float(stats.chi2.sf(stat, df)) if df > 0 else 1.0
        kept = [j for j in range(X.shape[1]) if univariable[names[j]] < self.alpha_univariable]
        if not kept:
            # Nothing passes the screen: keep the single strongest feature so a model exists.
            kept = [int(np.argmin([univariable[n] for n in names]))]
        removed: list[str] = []
        while True:
            ll_full = fit_ll(kept)
            pvals: dict[int, float] = {}
            for j in kept:
                rest = [c for c in kept if c != j]
                df = df_of(kept) - df_of(rest)
                stat = max(2.0 * (ll_full - fit_ll(rest)), 0.0)
                pvals[j] = float(stats.chi2.sf(stat, df)) if df > 0 else 1.0
            worst = max(kept, key=lambda c: pvals[c])
            if pvals[worst] < self.alpha_multivariable or len(kept) == 1:
                break
            removed.append(names[worst])
            kept.remove(worst)
        return sorted(kept), {
            "method": "univariable likelihood-ratio screen, then backward elimination by "
            "drop-one likelihood-ratio test (baseline-category logit, ridge "
            f"{SELECTION_RIDGE:g} for stability)",
            "alpha_univariable": self.alpha_univariable,
            "alpha_multivariable": self.alpha_multivariable,
            "univariable_p": univariable,
            "multivariable_p": {names[c]: pvals[c] for c in sorted(kept)},
            "removed_in_multivariable": removed,
        }

    def _transform_input(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = self._validate_x(X, reset=False)
        return np.asarray(X[:, self._columns_])

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``."""
        X = self._transform_input(X)
        return np.asarray(self.pipeline_.predict_proba(X))

    def decision_function(self, X: Any) -> np.ndarray:
        X = self._transform_input(X)
        return np.asarray(self.pipeline_.decision_function(X))

    def predict(self, X: Any) -> np.ndarray:
        X = self._transform_input(X)
        return np.asarray(self.pipeline_.predict(X))

    def terms(self) -> list[Term]:
        """The design columns in the order of ``coef_`` (one-hot levels, then numbers)."""
        check_is_fitted(self)
        pre: ColumnTransformer = self.pipeline_.named_steps["preprocess"]
        out: list[Term] = []
        for name, transformer, cols in pre.transformers_:
            if name == "descriptors":
                for col, cats in zip(cols, transformer.categories_, strict=True):
                    feature = self.selected_features_[col]
                    out.extend(Term(feature, str(level)) for level in cats)
            elif name == "quantitative":
                imputer: SimpleImputer = transformer.steps[0][1]
                scaler: StandardScaler = transformer.steps[1][1]
                for k, col in enumerate(cols):
                    out.append(
                        Term(
                            self.selected_features_[col],
                            None,
                            mean=float(scaler.mean_[k]),
                            scale=float(scaler.scale_[k]),
                            impute=float(imputer.statistics_[k]),
                        )
                    )
        return out

    @property
    def coef_(self) -> np.ndarray:
        """Coefficients of the logistic model on the design columns of :meth:`terms`."""
        check_is_fitted(self)
        return np.asarray(self.pipeline_.named_steps["classifier"].coef_)

    @property
    def intercept_(self) -> np.ndarray:
        check_is_fitted(self)
        return np.asarray(self.pipeline_.named_steps["classifier"].intercept_)
