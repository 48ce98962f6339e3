"""The noise-floor-aware fit is the default where σ is known, and the fallback says why (issue 12).

Where the noise σ is estimated the analysis denoises with MP-PCA and fits ``nls_rician``
(``models.contract.DEFAULT_FIT``); where it is not (no air background, no repeats) or the series is
too thin for MP-PCA's patch it fits ``nls`` without denoising (``FALLBACK_FIT``), and both the
provenance and the QC problems say so: such a result must never pass for a default one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dki_phantom import Phantom, Tissue, axial_geometry, make_phantom

from dicom_node.analysis.cohort import add_arguments
from dicom_node.analysis.dki import DkiMethod
from dicom_node.analysis.series_analysis import (
    AnalysisError,
    AnalysisSettings,
    analyse,
    analysis_settings,
)
from dicom_node.series.volume import DwiVolume
from models.contract import (
    DEFAULT_CONVENTIONS,
    DEFAULT_FIT,
    FALLBACK_FIT,
    LEGACY_FIT,
    PIPELINE_VERSION,
    Provenance,
)


def _dwi(data: np.ndarray, ph: Phantom) -> DwiVolume:
    return DwiVolume(
        data=data,
        bvals=ph.bvals.copy(),
        geometry=axial_geometry(ph.tissue.shape, frame_of_reference_uid=generate_uid()),
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
    )


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom((8, 64, 64), snr=30, seed=31)


def _masked_background(ph: Phantom) -> np.ndarray:
    """The phantom as a scanner that zeroes the air writes it: no noise left to measure σ on."""
    data = ph.signal.copy()
    data[ph.tissue == Tissue.BACKGROUND] = 0.0
    return data


def test_default_path_records_nls_rician_and_mppca(phantom: Phantom) -> None:
    a = analyse(_dwi(phantom.signal, phantom), settings=AnalysisSettings(previews=False))
    assert a.provenance.noise is not None and a.sigma is not None  # σ known: the default runs
    assert (a.provenance.fit.method, a.provenance.fit.denoise) == ("nls_rician", "mppca")
    assert a.provenance.fit == DEFAULT_FIT
    assert a.provenance.conventions == DEFAULT_CONVENTIONS  # what the reference model assumes
    assert a.fit.settings.method is DkiMethod.NLS_RICIAN and a.fit.settings.sigma == a.sigma
    assert a.fit_fallback is None
    assert not any("instead of" in p for p in a.provenance.qc.problems)
    assert a.pipeline_version == PIPELINE_VERSION == "dki-2"


def test_without_sigma_the_fit_falls_back_to_nls_without_denoising_and_says_why(
    phantom: Phantom,
) -> None:
    dwi = _dwi(_masked_background(phantom), phantom)
    a = analyse(dwi, settings=AnalysisSettings(previews=False))
    assert a.sigma is None and a.provenance.noise is None
    # provenance.fit says what ran, in the dki-1 wire form (no denoise key)
    assert a.provenance.fit == FALLBACK_FIT == LEGACY_FIT
    body = a.provenance.model_dump(mode="json")
    assert body["fit"]["method"] == "nls" and "denoise" not in body["fit"]
    assert Provenance.model_validate(body).fit == FALLBACK_FIT
    assert a.settings.method is DkiMethod.NLS and a.settings.denoise == "none"
    assert a.fit.settings.method is DkiMethod.NLS
    # ... and the QC report says why, so a reader never takes it for the default
    assert a.fit_fallback is not None
    assert "instead of nls_rician + mppca" in a.fit_fallback
    assert "noise sigma" in a.fit_fallback
    assert a.fit_fallback in a.provenance.qc.problems
    assert any("could not be estimated" in p for p in a.provenance.qc.problems)
    # the model trained on the default does not score it
    assert DEFAULT_CONVENTIONS.differences(a.provenance.conventions) == [
        "fit.denoise: result None, model 'mppca'",
        "fit.method: result 'nls', model 'nls_rician'",
    ]
    assert all(np.isfinite(v) for v in a.features.values())


def test_fallback_can_be_refused(phantom: Phantom) -> None:
    dwi = _dwi(_masked_background(phantom), phantom)
    with pytest.raises(AnalysisError, match="nls_rician needs the noise sigma"):
        analyse(dwi, settings=AnalysisSettings(previews=False, fallback=False))


def test_a_given_sigma_keeps_the_default(phantom: Phantom) -> None:
    dwi = _dwi(_masked_background(phantom), phantom)
    a = analyse(dwi, settings=AnalysisSettings(previews=False, sigma=phantom.sigma))
    assert a.provenance.fit == DEFAULT_FIT and a.fit_fallback is None
    assert a.provenance.noise is not None and a.provenance.noise.method == "given"


def test_a_series_too_thin_for_mppca_falls_back_and_says_why() -> None:
    ph = make_phantom((4, 64, 64), snr=30, seed=7, lesion_radius_frac=0.12)
    a = analyse(_dwi(ph.signal, ph), settings=AnalysisSettings(previews=False))
    assert a.sigma is not None  # σ is known: only the patch does not fit
    assert a.provenance.fit == FALLBACK_FIT
    assert a.fit_fallback is not None and "MP-PCA needs at least 5" in a.fit_fallback
    assert a.fit_fallback in a.provenance.qc.problems


def test_operator_choices_leave_the_rest_to_the_one_default() -> None:
    default = analysis_settings()
    assert (default.method.value, default.denoise) == (DEFAULT_FIT.method, DEFAULT_FIT.denoise)
    assert analysis_settings("", "") == default
    chosen = analysis_settings("nls", "none")
    assert (chosen.method, chosen.denoise) == (DkiMethod.NLS, "none")
    with pytest.raises(ValueError):
        analysis_settings("ols")
    with pytest.raises(ValueError, match="denoise"):
        analysis_settings(None, "gaussian")


def test_her2low_fit_defaults_to_the_contract() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["x", "--out", "y"])
    assert args.method is None and args.denoise is None  # "not chosen": the contract decides
    settings = analysis_settings(args.method, args.denoise)
    assert settings.fit_settings == DEFAULT_FIT
    args = parser.parse_args(["x", "--out", "y", "--method", "nls", "--denoise", "none"])
    assert analysis_settings(args.method, args.denoise).fit_settings == LEGACY_FIT
