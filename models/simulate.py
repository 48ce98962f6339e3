"""Seeded generator of simulated cohorts: what the shipped reference model is trained on.

No patient data ships. The simulated cohort has the paper's group sizes (Shen et al., Tomography
2025;11(3):31: HER2-zero 60 / low 91 / over 81) and its directions of effect, with assumed
magnitudes (the paper's tables are not reproduced; the numbers below are this generator's):

* lesion type: NME more frequent in HER2-over (38 %) than in zero (12 %) and low (18 %);
* mass shape and margin: HER2-low masses mostly irregular and often spiculated, HER2-zero masses
  (triple-negative-like) more often oval/round and circumscribed, with rim enhancement;
* intratumoral T2 hyperintensity and peritumoral edema: common in zero and over, rarer in low;
* DKI histogram features: small differences in masses, larger in NME (HER2-low NME: lower Dapp,
  higher Kapp, more heterogeneous), on top of typical cancer values (Dapp 1.2e-3 mm2/s,
  Kapp ~0.9, ADC(0/800) 0.12-0.24e-3 below Dapp; Wu et al. 2014).

Histogram statistics are derived from a per-lesion location, spread and skew so they stay
mutually consistent (p5 < median < p95, entropy from the spread at the schema's bin widths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.schema import (
    BIN_WIDTH,
    DESCRIPTOR_NAMES,
    FEATURES,
    QUANTITATIVE_NAMES,
    Her2Group,
    InputValue,
    Map,
)

PAPER_GROUP_SIZES: dict[str, int] = {"zero": 60, "low": 91, "over": 81}

# Probabilities per HER2 group, in the order of the schema's controlled values.
_P_NME = {"zero": 0.12, "low": 0.18, "over": 0.38}
_DESCRIPTOR_P: dict[str, dict[str, tuple[float, ...]]] = {
    "mass_shape": {  # oval, round, irregular
        "zero": (0.30, 0.25, 0.45),
        "low": (0.10, 0.08, 0.82),
        "over": (0.15, 0.12, 0.73),
    },
    "mass_margin": {  # circumscribed, irregular, spiculated
        "zero": (0.40, 0.40, 0.20),
        "low": (0.12, 0.43, 0.45),
        "over": (0.20, 0.55, 0.25),
    },
    "mass_internal_enhancement": {  # homogeneous, heterogeneous, rim, dark septations
        "zero": (0.10, 0.45, 0.42, 0.03),
        "low": (0.15, 0.65, 0.17, 0.03),
        "over": (0.10, 0.65, 0.22, 0.03),
    },
    "nme_distribution": {  # focal, linear, segmental, regional, multiple regions, diffuse
        "zero": (0.25, 0.10, 0.35, 0.15, 0.10, 0.05),
        "low": (0.25, 0.10, 0.35, 0.15, 0.10, 0.05),
        "over": (0.10, 0.08, 0.50, 0.15, 0.10, 0.07),
    },
    "nme_internal_pattern": {  # homogeneous, heterogeneous, clumped, clustered ring
        "zero": (0.10, 0.50, 0.25, 0.15),
        "low": (0.10, 0.45, 0.30, 0.15),
        "over": (0.05, 0.40, 0.30, 0.25),
    },
    "t2_hyperintensity": {"zero": (0.55, 0.45), "low": (0.22, 0.78), "over": (0.45, 0.55)},
    "peritumoral_edema": {"zero": (0.55, 0.45), "low": (0.25, 0.75), "over": (0.60, 0.40)},
    "kinetic_curve": {  # persistent, plateau, washout: no effect reported, none simulated
        "zero": (0.20, 0.35, 0.45),
        "low": (0.20, 0.35, 0.45),
        "over": (0.20, 0.35, 0.45),
    },
}
# Location (mean of the ROI) and between-lesion SD, per (group, lesion type).
_DAPP_MEAN = {  # 10^-3 mm2/s
    ("zero", "mass"): 1.22, ("low", "mass"): 1.16, ("over", "mass"): 1.20,
    ("zero", "nme"): 1.40, ("low", "nme"): 1.16, ("over", "nme"): 1.32,
}  # fmt: skip
_KAPP_MEAN = {
    ("zero", "mass"): 0.88, ("low", "mass"): 0.91, ("over", "mass"): 0.88,
    ("zero", "nme"): 0.80, ("low", "nme"): 0.93, ("over", "nme"): 0.82,
}  # fmt: skip
_DAPP_SD, _KAPP_SD = 0.20, 0.11
_SPREAD_BOOST_LOW_NME = 1.25  # HER2-low NME: more heterogeneous histograms


@dataclass(frozen=True)
class SimulationSettings:
    """Knobs of the generator (the defaults build the reference cohort)."""

    group_sizes: tuple[tuple[str, int], ...] = tuple(PAPER_GROUP_SIZES.items())
    p_descriptor_missing: float = 0.03  # a descriptor left blank on the form
    p_kinetic_missing: float = 0.25  # the optional kinetic curve not entered
    p_quantitative_missing: float = 0.02  # DKI analysis failed: all 21 numbers missing

    def sizes(self) -> dict[str, int]:
        return dict(self.group_sizes)


def simulate_cohort(
    seed: int = 0, settings: SimulationSettings | None = None
) -> list[dict[str, InputValue]]:
    """Simulated lesions (schema features + ``her2_group``), shuffled, reproducible by seed."""
    settings = settings or SimulationSettings()
    rng = np.random.default_rng(seed)
    rows: list[dict[str, InputValue]] = []
    for group, n in settings.sizes().items():
        Her2Group(group)
        for _ in range(n):
            rows.append(_simulate_lesion(rng, group, settings))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def _choice(rng: np.random.Generator, name: str, group: str) -> str:
    values = FEATURES[name].values
    return str(values[rng.choice(len(values), p=_DESCRIPTOR_P[name][group])])


def _simulate_lesion(
    rng: np.random.Generator, group: str, settings: SimulationSettings
) -> dict[str, InputValue]:
    lesion = "nme" if rng.random() < _P_NME[group] else "mass"
    row: dict[str, InputValue] = {name: "" for name in DESCRIPTOR_NAMES}
    row["lesion_type"] = lesion
    for name in DESCRIPTOR_NAMES:
        if name == "lesion_type":
            continue
        spec = FEATURES[name]
        if lesion not in {t.value for t in spec.applies_to}:
            continue
        p_missing = settings.p_kinetic_missing if spec.optional else settings.p_descriptor_missing
        if rng.random() < p_missing:
            continue
        row[name] = _choice(rng, name, group)
    row.update(_quantitative(rng, group, lesion, settings))
    row["her2_group"] = group
    return row


def _histogram_stats(
    rng: np.random.Generator, location: float, spread: float, bin_width: float, floor: float
) -> dict[str, float]:
    """Mutually consistent first-order statistics of one ROI histogram."""
    skew = float(rng.normal(0.4, 0.35))
    kurt = max(float(0.3 + 1.2 * skew**2 + rng.normal(0.0, 0.5)), -1.2)
    median = location - 0.15 * skew * spread
    p5 = max(location - 1.645 * spread * (1 - 0.1 * skew), floor)
    p95 = location + 1.645 * spread * (1 + 0.1 * skew)
    # Differential entropy of a normal, discretised at ``bin_width``, in bits.
    entropy = max(math.log2(spread / bin_width) + 0.5 * math.log2(2 * math.pi * math.e), 0.0)
    entropy += float(rng.normal(0.0, 0.1))
    return {
        "mean": location,
        "median": median,
        "p5": p5,
        "p95": p95,
        "skewness": skew,
        "kurtosis": kurt,
        "entropy": max(entropy, 0.0),
    }


def _quantitative(
    rng: np.random.Generator, group: str, lesion: str, settings: SimulationSettings
) -> dict[str, InputValue]:
    if rng.random() < settings.p_quantitative_missing:
        return {name: math.nan for name in QUANTITATIVE_NAMES}
    key = (group, lesion)
    boost = _SPREAD_BOOST_LOW_NME if key == ("low", "nme") else 1.0
    dapp = float(np.clip(rng.normal(_DAPP_MEAN[key], _DAPP_SD), 0.55, 2.6)) * 1e-3
    kapp = float(np.clip(rng.normal(_KAPP_MEAN[key], _KAPP_SD), 0.35, 1.6))
    adc = max(dapp - float(rng.uniform(0.12, 0.24)) * 1e-3 + float(rng.normal(0, 0.03)) * 1e-3,
              0.3e-3)  # fmt: skip
    d_spread = 0.25e-3 * float(rng.lognormal(0.0, 0.25)) * boost
    k_spread = 0.15 * float(rng.lognormal(0.0, 0.25)) * boost
    out: dict[str, InputValue] = {}
    for map_, loc, spread in (
        (Map.ADC, adc, d_spread * 0.9),
        (Map.DAPP, dapp, d_spread),
        (Map.KAPP, kapp, k_spread),
    ):
        stats = _histogram_stats(rng, loc, spread, BIN_WIDTH[map_], floor=0.0 if map_ is Map.KAPP
                                 else 0.05e-3)  # fmt: skip
        for stat, value in stats.items():
            out[f"{map_.value}_{stat}"] = float(value)
    return out


def simulate_planted(
    n: int,
    *,
    seed: int = 0,
    intercept: float = 0.0,
    beta_dapp_mean: float = -1.0,
    beta_kapp_mean: float = 0.8,
    beta_edema_yes: float = -1.2,
) -> list[dict[str, InputValue]]:
    """A binary low-vs-zero cohort from a known logistic model, for checking the trainer.

    logit P(low) = intercept + beta_dapp_mean * z(dapp_mean) + beta_kapp_mean * z(kapp_mean)
    + beta_edema_yes * [peritumoral_edema == yes], with z the standardised value; the other
    features are drawn independently of the label (noise the model should leave near zero).
    """
    rng = np.random.default_rng(seed)
    rows: list[dict[str, InputValue]] = []
    for _ in range(n):
        lesion = "nme" if rng.random() < 0.2 else "mass"
        row: dict[str, InputValue] = {name: "" for name in DESCRIPTOR_NAMES}
        row["lesion_type"] = lesion
        row["peritumoral_edema"] = "yes" if rng.random() < 0.4 else "no"
        row["t2_hyperintensity"] = "yes" if rng.random() < 0.4 else "no"
        row.update(_quantitative(rng, "low", "mass", SimulationSettings(p_quantitative_missing=0)))
        z_d = (float(row["dapp_mean"]) - _DAPP_MEAN[("low", "mass")] * 1e-3) / (_DAPP_SD * 1e-3)
        z_k = (float(row["kapp_mean"]) - _KAPP_MEAN[("low", "mass")]) / _KAPP_SD
        edema = 1.0 if row["peritumoral_edema"] == "yes" else 0.0
        logit = intercept + beta_dapp_mean * z_d + beta_kapp_mean * z_k + beta_edema_yes * edema
        row["her2_group"] = "low" if rng.random() < 1 / (1 + math.exp(-logit)) else "zero"
        rows.append(row)
    return rows
