"""The worker's fit conventions come from settings, so a site can run its own model's conventions."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.processes import pipeline_settings
from her2low.core.settings import ConfigurationError, load_settings


def test_fit_method_and_denoising_reach_the_analysis(tmp_path: Path) -> None:
    default = pipeline_settings(load_settings(home=tmp_path)).analysis
    assert (default.method, default.denoise) == ("nls", "none")  # what the reference model used
    chosen = pipeline_settings(
        load_settings(home=tmp_path, worker_fit_method="nls_rician", worker_denoise="mppca")
    ).analysis
    assert (chosen.method, chosen.denoise) == ("nls_rician", "mppca")


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
