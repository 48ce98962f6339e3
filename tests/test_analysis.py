"""The whole quantitative pipeline on a synthetic DWI series: ROI, fits, features, provenance."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dki_phantom import (
    BVALS,
    Phantom,
    Tissue,
    axial_geometry,
    make_phantom,
    make_seg,
    mr_series,
)

from dicom_node.analysis.dki import DkiMethod
from dicom_node.analysis.features import FEATURE_NAMES
from dicom_node.analysis.series_analysis import (
    PIPELINE_VERSION,
    AnalysisError,
    AnalysisSettings,
    FitRegion,
    analyse,
)
from dicom_node.series.volume import DwiVolume
from models.contract import DEFAULT_CONVENTIONS, Laterality, Provenance

PNG = b"\x89PNG\r\n\x1a\n"


def _png_text(png: bytes) -> dict[str, str]:
    return dict(Image.open(io.BytesIO(png)).text)


def _dwi(ph: Phantom) -> DwiVolume:
    geom = axial_geometry(ph.tissue.shape, frame_of_reference_uid=generate_uid())
    return DwiVolume(
        data=ph.signal,
        bvals=ph.bvals.copy(),
        geometry=geom,
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
    )


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom((8, 64, 64), snr=30, seed=31)


def test_provenance_has_exactly_the_results_api_shape(phantom: Phantom) -> None:
    a = analyse(_dwi(phantom))
    p = a.provenance.model_dump(mode="json")  # the results API's own class, in its wire form
    assert Provenance.model_validate(p) == a.provenance
    assert set(p) == {
        "b_values",
        "fit",
        "adc_b_values",
        "discretisation",
        "statistics",
        "roi",
        "qc",
        "noise",
    }
    assert set(p["noise"]) == {"sigma", "method", "effective_coils"}
    assert p["noise"]["method"] == "background" and p["noise"]["effective_coils"] == 1.0
    assert p["b_values"] == [0.0, 50.0, 800.0, 1000.0, 1500.0, 2000.0]
    assert p["fit"] == {  # the default where sigma is known: MP-PCA, then the Rician fit
        "method": "nls_rician",
        "dki_bmin": 0.0,
        "bounds": {"dapp": [0.0, 0.0035], "kapp": [0.0, 3.0]},
        "denoise": "mppca",
    }
    assert p["adc_b_values"] == [0.0, 800.0]
    assert p["discretisation"] == {
        "method": "fixed_bin_size",
        "bin_width": {"adc": 2.5e-05, "dapp": 2.5e-05, "kapp": 0.025},
        "bin_min": 0.0,
    }
    assert p["statistics"] == {"kurtosis": "excess", "percentile_rule": "linear", "entropy_base": 2}
    assert a.provenance.conventions == DEFAULT_CONVENTIONS  # what the reference model assumes
    assert set(p["roi"]) == {"source", "confirmed", "voxels", "volume_ml", "seg_series_uid"}
    assert set(p["qc"]) == {
        "flags",
        "problems",
        "fraction_at_bound",
        "high_b",
        "snr_high_b",
        "fit_residual",
    }
    assert 0.0 <= p["qc"]["fraction_at_bound"] <= 1.0
    assert set(p["qc"]["flags"]) == {"at_bound", "dk_bmax", "low_signal", "background"}
    json.dumps({"features": a.features, "provenance": p}, allow_nan=False)
    assert PIPELINE_VERSION == "dki-2" == a.pipeline_version  # dki-1 was nls, no denoising


def test_auto_roi_pipeline(phantom: Phantom) -> None:
    a = analyse(_dwi(phantom))
    assert tuple(a.features) == FEATURE_NAMES
    assert all(np.isfinite(v) for v in a.features.values())
    assert a.roi.source.value == "auto" and a.provenance.roi.confirmed is False
    assert a.laterality is Laterality.LEFT
    assert any("automatic" in s for s in a.provenance.qc.problems)
    assert set(a.maps) == {"adc", "dapp", "kapp"}
    assert {
        f"{m}_{kind}.png" for m in ("adc", "dapp", "kapp") for kind in ("slice", "histogram")
    } <= set(a.previews)
    # and the slices through the ROI (high-b DWI and each map) for the case page's navigation
    crossed = [int(k) for k in np.flatnonzero(a.roi.mask.sum(axis=(1, 2)))]
    for m in ("dwi", "adc", "dapp", "kapp"):
        assert f"{m}_slice_{crossed[0]:03d}.png" in a.previews or len(crossed) > 5
    assert all(png.startswith(PNG) for png in a.previews.values())
    # Map slices: the largest ROI cross-section, flagged as an unconfirmed automatic ROI.
    largest = int(np.argmax(a.roi.mask.sum(axis=(1, 2))))
    for m in ("adc", "dapp", "kapp"):
        text = _png_text(a.previews[f"{m}_slice.png"])
        assert "ROI unconfirmed" in text["Title"] and text["ROI"] == "unconfirmed"
        assert text["Slice"] == str(largest)


def test_seg_pipeline_recovers_tumour_values(phantom: Phantom) -> None:
    dwi = _dwi(phantom)
    truth = phantom.tissue == Tissue.TUMOUR
    source = mr_series(
        dwi.geometry, study_uid=dwi.study_instance_uid, series_uid=dwi.series_instance_uid
    )
    seg = make_seg(source, truth)
    a = analyse(dwi, segs=[seg])
    assert a.roi.source.value == "seg" and a.roi.confirmed
    title = _png_text(a.previews["kapp_slice.png"])["Title"]
    assert title.startswith("Kapp — slice") and "unconfirmed" not in title
    assert a.provenance.roi.seg_series_uid == seg.SeriesInstanceUID
    assert a.provenance.roi.voxels == int(truth.sum())
    f = a.features
    assert f["dapp_mean"] == pytest.approx(phantom.dapp[truth].mean(), abs=0.05e-3)
    assert f["kapp_median"] == pytest.approx(np.median(phantom.kapp[truth]), abs=0.08)
    assert f["adc_mean"] < f["dapp_mean"]  # ADC(0/800) sits below Dapp
    assert 0.5e-3 < f["adc_p5"] < f["adc_median"] < f["adc_p95"] < 2e-3
    assert f["kapp_entropy"] > 0 and f["dapp_entropy"] > 0
    assert a.provenance.qc.flags.background == 0
    # Only the ROI plus its margin was fitted (fast path); far-away tissue is untouched.
    fgt = phantom.tissue == Tissue.FGT
    assert np.count_nonzero(a.maps["dapp"][fgt]) < fgt.sum()


def test_seg_in_other_frame_of_reference_is_ignored(phantom: Phantom) -> None:
    dwi = _dwi(phantom)
    other = dataclasses.replace(dwi.geometry, frame_of_reference_uid=generate_uid())
    seg = make_seg(mr_series(other), phantom.tissue == Tissue.TUMOUR)
    a = analyse(dwi, segs=[seg], settings=AnalysisSettings(previews=False))
    assert a.roi.source.value == "auto"
    assert any("frame of reference" in s for s in a.provenance.qc.problems)
    assert a.previews == {}


def test_settings_are_frozen_recorded_and_coerced(phantom: Phantom) -> None:
    s = AnalysisSettings(method="wls", dki_bmin=100.0, adc_b_values=(50.0, 1000.0))  # type: ignore[arg-type]
    assert s.method is DkiMethod.WLS
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.dki_bmin = 0.0  # type: ignore[misc]
    a = analyse(_dwi(phantom), settings=dataclasses.replace(s, previews=False))
    assert a.provenance.fit.method == "wls"
    assert a.provenance.fit.dki_bmin == 100.0
    assert a.provenance.adc_b_values == (50.0, 1000.0)
    assert DEFAULT_CONVENTIONS.differences(a.provenance.conventions) == [
        "fit.dki_bmin: result 100.0, model 0.0",
        "fit.method: result 'wls', model 'nls_rician'",
    ]
    assert a.fit.settings.bvals == (800.0, 1000.0, 1500.0, 2000.0)
    with pytest.raises(ValueError):
        AnalysisSettings(bin_width_kapp=0.0)


def test_whole_volume_fit_region(phantom: Phantom) -> None:
    s = AnalysisSettings(fit_region=FitRegion.NON_BACKGROUND, previews=False)
    a = analyse(_dwi(phantom), settings=s)
    fgt = phantom.tissue == Tissue.FGT
    assert np.count_nonzero(a.maps["dapp"][fgt]) == fgt.sum()


def test_unanalysable_series_raise_clear_errors(phantom: Phantom) -> None:
    two_b = _dwi(phantom)
    two_b = DwiVolume(
        data=phantom.signal[..., [0, 3]],
        bvals=np.array([0.0, 1000.0]),
        geometry=two_b.geometry,
        study_instance_uid=two_b.study_instance_uid,
        series_instance_uid=two_b.series_instance_uid,
    )
    with pytest.raises(AnalysisError, match="3 distinct b-values"):
        analyse(two_b)
    no_lesion = make_phantom((6, 48, 48), snr=30, seed=2, lesion_radius_frac=0.0)
    dwi = _dwi(no_lesion)
    try:
        a = analyse(dwi, settings=AnalysisSettings(previews=False))
    except AnalysisError as exc:
        assert "ROI" in str(exc)
    else:  # a noise speck may qualify; it must then be flagged as tiny and unconfirmed
        assert a.roi.confirmed is False and a.roi.voxels < 10
        assert any("only" in s for s in a.provenance.qc.problems)
    assert BVALS.size == 6
