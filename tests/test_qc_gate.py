"""The QC gate: the node measures image quality per analysis, the service refuses to score a
result that fails a threshold, and says why and what to do on the card and the case page."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from prometheus_client import REGISTRY
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dki_phantom import axial_geometry, make_phantom
from test_cds_support import (
    FULL_FEATURES,
    RESULTS_TOKEN,
    ReviewClient,
    Service,
    her2_bundle,
    hook_body,
    patient_resource,
    result_payload,
    start_service,
    stop_service,
)

from cds_service.qc_gate import QcThresholds, evaluate
from dicom_node.analysis.series_analysis import AnalysisSettings, analyse
from dicom_node.series.volume import DwiVolume
from her2low.core.settings import Settings
from models.contract import Provenance, QcReport

AUTH = {"Authorization": f"Bearer {RESULTS_TOKEN}"}


def _analyse(snr: float, seed: int = 31) -> Provenance:
    ph = make_phantom((8, 64, 64), snr=snr, seed=seed)
    dwi = DwiVolume(
        data=ph.signal,
        bvals=ph.bvals.copy(),
        geometry=axial_geometry(ph.tissue.shape, frame_of_reference_uid=generate_uid()),
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
    )
    return analyse(dwi, settings=AnalysisSettings(previews=False)).provenance


def _not_scored(reason: str) -> float:
    value = REGISTRY.get_sample_value("her2low_results_not_scored_total", {"reason": reason})
    return value or 0.0


def _payload(patient_id: str, **qc: Any) -> dict[str, Any]:
    body = dict(result_payload(patient_id=patient_id), features=dict(FULL_FEATURES))
    body["provenance"] = copy.deepcopy(body["provenance"])
    body["provenance"]["qc"].update(qc)
    return body


# --- the node measures -------------------------------------------------------------------------


def test_node_measures_qc_on_the_phantom() -> None:
    good = _analyse(snr=30)
    noisy = _analyse(snr=8)
    for prov in (good, noisy):
        assert prov.qc.high_b == 2000.0
        assert prov.qc.snr_high_b is not None and prov.qc.fit_residual is not None
        assert prov.qc.fraction_at_bound is not None and 0 <= prov.qc.fraction_at_bound <= 1
        assert prov.roi.voxels > 0
    assert good.qc.snr_high_b is not None and noisy.qc.snr_high_b is not None
    # The phantom's S0 SNR 30 with tumour-like decay to b = 2000 gives an SNR of a few there.
    assert 3.0 < good.qc.snr_high_b < 15.0
    assert noisy.qc.snr_high_b < good.qc.snr_high_b / 2
    assert good.qc.fit_residual is not None and good.qc.fit_residual < 0.05
    assert noisy.qc.fit_residual is not None and noisy.qc.fit_residual > good.qc.fit_residual
    # The good series passes the default gate; the noisy one fails on SNR with its number.
    assert evaluate(good, QcThresholds()) == []
    failed = {f.check: f for f in evaluate(noisy, QcThresholds())}
    assert "snr_high_b" in failed
    assert f"SNR at b=2000 is {noisy.qc.snr_high_b:.1f}, below 3" in failed["snr_high_b"].reason
    assert "repeat the DWI" in failed["snr_high_b"].action
    # The metrics travel in the wire form and come back typed.
    again = Provenance.model_validate(good.model_dump(mode="json"))
    assert again.qc == good.qc


def test_noise_free_signal_has_no_residual() -> None:
    from dicom_node.analysis.dki import DkiModel
    from dicom_node.analysis.qc import fit_residual, snr_at_highest_b

    b = np.array([0.0, 50, 800, 1000, 1500, 2000])
    d, k = 1.2e-3, 0.8
    curve = 1000 * np.exp(-b * d + (b * d) ** 2 * k / 6)
    data = np.broadcast_to(curve, (2, 3, 3, b.size)).copy()
    roi = np.ones(data.shape[:-1], dtype=bool)
    fit = DkiModel(b).fit(data, mask=roi, sigma=10.0)
    residual = fit_residual(data, b, fit, roi)
    assert residual is not None and residual < 1e-3
    high_b, snr = snr_at_highest_b(data, b, roi, 10.0)
    assert high_b == 2000.0 and snr == pytest.approx(curve[-1] / 10.0)
    assert snr_at_highest_b(data, b, roi, None) == (2000.0, None)


def test_older_results_without_the_metrics_still_validate() -> None:
    qc = QcReport.model_validate({"flags": {"at_bound": 1}, "problems": []})
    assert qc.snr_high_b is None and qc.fit_residual is None and qc.high_b is None
    assert "snr_high_b" not in qc.model_dump(mode="json")  # hashes as before


# --- each threshold, with its reason -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "check", "words"),
    [
        ({"qc": {"snr_high_b": 2.04}}, "snr_high_b", "SNR at b=2000 is 2.0, below 3"),
        ({"roi": {"voxels": 12}}, "roi_voxels", "12 voxels, fewer than 20"),
        ({"qc": {"fraction_at_bound": 0.4}}, "fraction_at_bound", "40% of the ROI voxels"),
        ({"qc": {"fit_residual": 0.3}}, "fit_residual", "30.0% of S0, above 15%"),
        ({"b_values": [0, 800, 1000]}, "b_values", "3 distinct b-values"),
        ({"b_values": [0, 50, 400, 800]}, "high_b", "highest b-value is 800"),
    ],
)
def test_each_check_fails_with_its_reason(change: dict[str, Any], check: str, words: str) -> None:
    body = copy.deepcopy(result_payload()["provenance"])
    body["qc"].update({"snr_high_b": 6.0, "fit_residual": 0.02, "fraction_at_bound": 0.05})
    for key, value in change.items():
        if isinstance(value, dict):
            body[key].update(value)
        else:
            body[key] = value
    failures = evaluate(Provenance.model_validate(body), QcThresholds())
    assert [f.check for f in failures] == [check]
    assert words in failures[0].reason and failures[0].action


def test_thresholds_come_from_settings() -> None:
    limits = QcThresholds.from_settings(
        Settings(cds_qc_min_snr_high_b=8.0, cds_qc_min_roi_voxels=5)
    )
    assert limits.min_snr_high_b == 8.0 and limits.min_roi_voxels == 5
    assert QcThresholds.from_settings(Settings()) == QcThresholds()


# --- the service ---------------------------------------------------------------------------------


@pytest.fixture
def real_model_service(tmp_path: Path) -> Iterator[Service]:
    """The service scoring with the shipped reference model."""
    svc = start_service(tmp_path, predictor=None)
    yield svc
    stop_service(svc)


def test_failing_result_is_stored_but_not_scored(real_model_service: Service) -> None:
    svc = real_model_service
    before = _not_scored("qc")
    response = svc.publish(_payload("MRN-81", snr_high_b=2.04, fit_residual=0.02))
    assert response.status_code == 201, response.text
    rid = response.json()["result_id"]

    case = requests.get(f"{svc.url}/api/v1/cases/{rid}", headers=AUTH, timeout=10).json()
    prediction = case["prediction"]
    assert prediction["probability"] is None and prediction["variant"] is None
    assert "SNR at b=2000 is 2.0, below 3" in prediction["not_scored"]
    assert case["provenance"]["qc"]["snr_high_b"] == 2.04
    assert _not_scored("qc") == before + 1

    # One card: no likelihood, why and what to do.
    hook = hook_body("pat-81", prefetch={"patient": patient_resource("pat-81", "MRN-81")})
    answer = svc.post_hook(hook)
    assert answer.status_code == 200
    cards = answer.json()["cards"]
    assert len(cards) == 1
    card = cards[0]
    assert "No MRI HER2-low estimate" in card["summary"] and "QC failed" in card["summary"]
    assert "SNR at b=2000 is 2.0, below 3" in card["detail"]
    assert "repeat the DWI or check the coil" in card["detail"]
    assert "%" not in card["summary"] and "suggestions" not in card

    page = ReviewClient(svc, "radiologist").get(f"{svc.url}/review/cases/{rid}")
    assert page.status_code == 200
    assert "failed the QC gate" in page.text
    assert "SNR at b=2000 is 2.0, below 3" in page.text and "check the coil" in page.text


def test_passing_result_is_scored(real_model_service: Service) -> None:
    svc = real_model_service
    before = _not_scored("qc")
    body = _payload("MRN-82", snr_high_b=6.4, fit_residual=0.02, fraction_at_bound=0.03)
    response = svc.publish(body)
    assert response.status_code == 201, response.text
    rid = response.json()["result_id"]
    case = requests.get(f"{svc.url}/api/v1/cases/{rid}", headers=AUTH, timeout=10).json()
    assert 0 < case["prediction"]["probability"] < 1
    assert case["prediction"]["not_scored"] is None
    assert _not_scored("qc") == before
    prefetch = {
        "patient": patient_resource("pat-82", "MRN-82"),
        "her2": her2_bundle("pat-82", text="1+"),
    }
    cards = svc.post_hook(hook_body("pat-82", prefetch=prefetch)).json()["cards"]
    assert len(cards) == 1 and "likelihood" in cards[0]["summary"]


def test_a_site_can_relax_a_threshold(tmp_path: Path) -> None:
    svc = start_service(tmp_path, predictor=None, cds_qc_min_snr_high_b=0.0)
    try:
        response = svc.publish(_payload("MRN-83", snr_high_b=2.04))
        rid = response.json()["result_id"]
        case = requests.get(f"{svc.url}/api/v1/cases/{rid}", headers=AUTH, timeout=10).json()
        assert case["prediction"]["probability"] is not None
    finally:
        stop_service(svc)
