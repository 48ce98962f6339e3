"""models.schema: the listing other components derive from, and validation with named features."""

from __future__ import annotations

import json
import math

import pytest

from models import schema
from models.schema import FeatureValidationError, validate_inputs, validate_value


def test_listing_has_every_feature_with_kind_units_ranges_and_applicability() -> None:
    listing = schema.list_features()
    json.dumps(listing)  # JSON-serialisable as printed by `her2low model schema --json`
    by_name = {f["name"]: f for f in listing["features"]}
    assert len(by_name) == 9 + 21
    assert by_name["lesion_type"]["values"] == ["mass", "nme"]
    assert by_name["mass_shape"]["applies_to"] == ["mass"]
    assert by_name["nme_distribution"]["applies_to"] == ["nme"]
    assert by_name["kinetic_curve"]["optional"] is True
    assert by_name["dapp_mean"]["unit"] == "mm2/s"
    assert by_name["kapp_mean"]["unit"] == "1"
    assert by_name["adc_entropy"]["unit"] == "bit"
    assert by_name["dapp_kurtosis"]["kind"] == "numeric"
    lo, hi = by_name["dapp_mean"]["range"]
    assert lo <= 1.2e-3 <= hi and hi < 0.1
    assert by_name["dapp_entropy"]["discretisation"]["bin_width"] == 2.5e-5
    assert by_name["kapp_entropy"]["discretisation"]["bin_width"] == 0.025
    fs = listing["fit_settings"]
    assert fs["method"] == "nls_rician" and fs["denoise"] == "mppca" and fs["dki_bmin"] == 0
    assert fs["b_values"] == [0, 50, 800, 1000, 1500, 2000] and fs["adc_b_values"] == [0, 800]
    for name in (f"{m}_{s}" for m in ("adc", "dapp", "kapp") for s in schema.Statistic):
        assert name in by_name


def test_enums_match_controlled_values() -> None:
    assert schema.FEATURES["mass_margin"].values == tuple(m.value for m in schema.MassMargin)
    assert validate_value("mass_shape", schema.MassShape.IRREGULAR) == "irregular"


def test_valid_inputs_are_coerced_and_missing_filled() -> None:
    row = validate_inputs({"lesion_type": "Mass", "mass_shape": " oval ", "dapp_mean": "0.0012"})
    assert row["lesion_type"] == "mass" and row["mass_shape"] == "oval"
    assert row["dapp_mean"] == pytest.approx(1.2e-3)
    assert row["nme_distribution"] == "" and math.isnan(float(row["kapp_mean"]))
    assert set(row) == set(schema.FEATURE_NAMES)
    assert validate_inputs({"kapp_mean": None, "kapp_p5": float("nan")})["kapp_p5"] != 0


@pytest.mark.parametrize(
    ("inputs", "feature", "fragment"),
    [
        ({"mass_shape": "lobulated"}, "mass_shape", "unknown value"),
        ({"lesion_type": "focus"}, "lesion_type", "unknown value"),
        ({"dapp_mean": 1.2}, "dapp_mean", "10^-3"),
        ({"kapp_mean": -0.5}, "kapp_mean", "plausible range"),
        ({"adc_entropy": 40.0}, "adc_entropy", "plausible range"),
        ({"dapp_mean": "abc"}, "dapp_mean", "expected a number"),
        ({"dapp_mean": [1e-3]}, "dapp_mean", "expected a number"),
        ({"dapp_mean": True}, "dapp_mean", "expected a number"),
        ({"kapp_mean": float("inf")}, "kapp_mean", "finite"),
        ({"mass_shape": 3}, "mass_shape", "expected a string"),
        ({"dapp_mean_x": 1e-3}, "dapp_mean_x", "unknown feature"),
        ({"lesion_type": "nme", "mass_shape": "oval"}, "mass_shape", "applies only"),
        ({"lesion_type": "mass", "nme_distribution": "linear"}, "nme_distribution", "applies only"),
    ],
)
def test_invalid_inputs_name_the_feature(inputs: dict, feature: str, fragment: str) -> None:
    with pytest.raises(FeatureValidationError) as info:
        validate_inputs(inputs)
    assert info.value.feature == feature
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_keys_can_be_allowed_and_feature_subset_returned() -> None:
    row = validate_inputs(
        {"laterality": "L", "kapp_mean": 0.9}, allow_unknown=True, features=["kapp_mean"]
    )
    assert row == {"kapp_mean": 0.9}


def test_descriptor_without_lesion_type_is_accepted() -> None:
    assert validate_inputs({"mass_shape": "oval"})["mass_shape"] == "oval"
