"""The worker's fit conventions come from settings, so a site can run its own model's conventions."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.processes import pipeline_settings
from her2low.core.settings import ConfigurationError, load_settings
from models.contract import DEFAULT_FIT


def test_fit_method_and_denoising_reach_the_analysis(tmp_path: Path) -> None:
    default = pipeline_settings(load_settings(home=tmp_path)).analysis
    # the contract's default (what the reference model assumes), not a copy in the settings
    assert (default.method, default.denoise) == ("nls_rician", "mppca")
    assert (default.method, default.denoise) == (DEFAULT_FIT.method, DEFAULT_FIT.denoise)
    assert default.fallback is True  # nls without denoising where sigma cannot be estimated
    chosen = pipeline_settings(
        load_settings(home=tmp_path, worker_fit_method="nls", worker_denoise="none")
    ).analysis
    assert (chosen.method, chosen.denoise) == ("nls", "none")
    only_method = pipeline_settings(load_settings(home=tmp_path, worker_fit_method="wls")).analysis
    assert (only_method.method, only_method.denoise) == ("wls", "mppca")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("HER2LOW_WORKER_FIT_METHOD", "ols"), ("HER2LOW_WORKER_DENOISE", "gaussian")],
)
def test_unknown_conventions_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=variable):
        load_settings()
