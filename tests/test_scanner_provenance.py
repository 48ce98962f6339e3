"""``provenance.scanner`` from the headers, and the out-of-distribution check it feeds (issue 12).

The node now fills the scanner's make, model and field strength from every analysed series, so
the service's training-domain check (``models.domain.outside``) and the drift-per-scanner table
see real studies. Nothing naming a particular device or site (serial number, station,
institution) leaves the node with it.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from test_cds_support import (
    PATIENT_ISSUER,
    ReviewClient,
    Service,
    her2_bundle,
    hook_body,
    patient_resource,
    start_service,
    stop_service,
)

from dicom_node.analysis.series_analysis import AnalysisSettings, analyse
from dicom_node.jobs.pipeline import build_payload
from dicom_node.series.assemble import assemble_dwi
from dicom_node.series.headers import field_strength_t, scanner_info
from dicom_node.synth import write_study
from models.card import read_card
from models.contract import PatientKey, Provenance, ResultPayload, ScannerInfo
from models.domain import TrainingDomain, outside
from models.prediction import ModelVariant
from models.registry import reference_root

DWI_DIR = Path("/work/shared/data/dwi")
REFERENCE = reference_root() / "her2low-reference" / "0.1.0"


# --- reading the headers -----------------------------------------------------------------------


def _first_image(folder: Path) -> Dataset:
    path = sorted(p for p in (folder / "dicom").rglob("*") if p.is_file())[0]
    if path.suffix == ".gz":
        with gzip.open(path) as fh:
            return pydicom.dcmread(fh, stop_before_pixels=True)
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.mark.parametrize(
    ("name", "manufacturer", "model", "software"),
    [
        ("ge_signa_classic", "GE MEDICAL SYSTEMS", "SIGNA Pioneer", "28\\LX\\MR29.1_EA_2039.g"),
        ("philips_ingenia_classic", "Philips", "Ingenia Elition X", "5.7.1\\5.7.1.2"),
        ("siemens_xa30_enhanced", "Siemens Healthineers", "MAGNETOM Prisma Fit", "syngo MR XA30"),
        (
            "siemens_xa30_classic_trace",
            "Siemens Healthineers",
            "MAGNETOM Prisma Fit",
            "syngo MR XA30",
        ),
    ],
)
def test_scanner_of_real_vendor_series(
    name: str, manufacturer: str, model: str, software: str
) -> None:
    if not DWI_DIR.is_dir():
        pytest.skip(f"shared data folder absent: {DWI_DIR}")
    ds = _first_image(DWI_DIR / name)
    info = scanner_info(ds)
    assert info == ScannerInfo(
        manufacturer=manufacturer, model=model, field_strength_t=3.0, software_versions=software
    )
    # The same images carry a serial number, an institution (and station): none goes along.
    dumped = info.model_dump_json()
    for keyword in ("DeviceSerialNumber", "InstitutionName", "StationName"):
        value = str(ds.get(keyword, "") or "")
        if value:
            assert value not in dumped, keyword


@pytest.mark.parametrize(
    ("value", "tesla"),
    [("3", 3.0), ("2.89", 2.89), ("1.5", 1.5), ("15000", 1.5), ("0", None), ("", None)],
)
def test_field_strength_in_tesla(value: str, tesla: float | None) -> None:
    """DICOM says tesla; older systems wrote gauss (15000 = 1.5 T); 0 or empty is unknown."""
    ds = Dataset()
    ds.MagneticFieldStrength = value
    assert field_strength_t(ds) == tesla


def test_no_equipment_headers_give_no_scanner() -> None:
    assert scanner_info(Dataset()) is None
    partial = Dataset()
    partial.Manufacturer = "  Canon_MEC "
    assert scanner_info(partial) == ScannerInfo(manufacturer="Canon_MEC")
    assert "software_versions" not in ScannerInfo(manufacturer="Canon_MEC").model_dump()


def test_software_versions_keep_their_values_and_only_printable_text() -> None:
    ds = Dataset()
    ds.SoftwareVersions = ["VE11C\x07", " ", "N4_VE11C_LATEST_20160120"]
    info = scanner_info(ds)
    assert info is not None
    assert info.software_versions == "VE11C\\N4_VE11C_LATEST_20160120"
    assert info.description == "scanner not stated, software VE11C\\N4_VE11C_LATEST_20160120"
    ds.SoftwareVersions = "x" * 300  # LO is 64 per value; a hostile header is cut, not refused
    assert len(scanner_info(ds).software_versions) == 128  # type: ignore[union-attr]


# --- the node's payload ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ge_payload(tmp_path_factory: pytest.TempPathFactory) -> ResultPayload:
    """A synthetic GE study at 1.5 T analysed as the pipeline does, with the reference's fit."""
    out = tmp_path_factory.mktemp("ge") / "study"
    manifest = write_study(out, seed=2, vendor="ge", matrix=(64, 128), slices=12)
    datasets = [pydicom.dcmread(out / f) for f in manifest.dwi.files]
    for ds in datasets:  # the same scanner family on a 1.5 T magnet
        ds.MagneticFieldStrength = "1.5"
    fit = read_card(REFERENCE / ModelVariant.QUANTITATIVE.value)["fit_settings"]
    settings = AnalysisSettings(
        method=fit["method"], denoise=fit.get("denoise", "none"), previews=False
    )
    segs = [pydicom.dcmread(out / f) for f in manifest.seg.files]
    analysis = analyse(assemble_dwi(datasets), segs=segs, settings=settings)
    return build_payload(datasets[0], analysis, manifest.dwi.series_instance_uid)


def test_payload_carries_the_scanner_and_no_device_or_site_identity(
    ge_payload: ResultPayload,
) -> None:
    assert ge_payload.provenance.scanner == ScannerInfo(
        manufacturer="GE MEDICAL SYSTEMS",
        model="SIGNA Premier",
        field_strength_t=1.5,
        software_versions="29\\LX\\MR29.1_EA_2138.a",
    )
    body = ge_payload.model_dump(mode="json")
    assert body["provenance"]["scanner"] == {
        "manufacturer": "GE MEDICAL SYSTEMS",
        "model": "SIGNA Premier",
        "field_strength_t": 1.5,
        "software_versions": "29\\LX\\MR29.1_EA_2138.a",
    }
    text = json.dumps(body)
    # What the synthetic writer puts in DeviceSerialNumber, StationName and InstitutionName.
    for identity in ("SYN0001", "SYNMR02"):
        assert identity not in text
    assert "Institution" not in text and "Hospital" not in text
    assert Provenance.model_validate(body["provenance"]) == ge_payload.provenance


# --- the service's training-domain check -------------------------------------------------------


def test_a_case_with_unstated_scanner_is_not_called_outside() -> None:
    """Unknown is not outside: a result without scanner fields (older node) is not flagged."""
    domain = TrainingDomain(
        b_values=(0, 50, 800, 1000, 1500, 2000), field_strengths_t=(3.0,), vendors=("Siemens",)
    )
    for scanner in (None, {}, {"model": "Unknown"}):
        body = _provenance_body()
        if scanner is not None:
            body["scanner"] = scanner
        assert outside(domain, Provenance.model_validate(body), {}) == []
    known = Provenance.model_validate({**_provenance_body(), "scanner": {"field_strength_t": 1.5}})
    assert outside(domain, known, {}) == ["field strength 1.5 T is not in the training data (3 T)"]


def _provenance_body() -> dict[str, Any]:
    from test_cds_support import result_payload

    return dict(result_payload()["provenance"])


def _service_with_domain(tmp_path: Path, **domain: Any) -> Service:
    """The shipped reference model, its cards' training domain recording ``domain``."""
    models = tmp_path / "models"
    shutil.copytree(REFERENCE, models)
    for variant in ModelVariant:
        path = models / variant.value / "card.json"
        card = json.loads(path.read_text())
        card["training_domain"].update(domain)
        path.write_text(json.dumps(card))
    return start_service(tmp_path, predictor=None, model_dir=models)


@pytest.fixture
def siemens_3t_service(tmp_path: Path) -> Iterator[Service]:
    svc = _service_with_domain(tmp_path, vendors=["Siemens"], field_strength_t=[3.0])
    yield svc
    stop_service(svc)


@pytest.fixture
def reference_service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path, predictor=None)
    yield svc
    stop_service(svc)


def _card_for(svc: Service, payload: ResultPayload, mrn: str) -> dict[str, Any]:
    """Publish the node's payload (as the given patient) and call the hook for that patient."""
    body = payload.model_copy(update={"patient": PatientKey(id=mrn, issuer=PATIENT_ISSUER)})
    response = svc.publish(body.model_dump(mode="json"))
    assert response.status_code == 201, response.text
    pid = f"pat-{mrn}"
    prefetch = {"patient": patient_resource(pid, mrn), "her2": her2_bundle(pid, text="1+")}
    cards = svc.post_hook(hook_body(pid, prefetch=prefetch)).json()["cards"]
    assert len(cards) == 1
    card = dict(cards[0])
    # Scored (an estimate with its Observation), so the domain check has run on it.
    observation = card["suggestions"][0]["actions"][0]["resource"]
    assert observation["resourceType"] == "Observation", card
    return card


def test_a_scanner_outside_the_card_domain_is_scored_with_a_warning(
    siemens_3t_service: Service, ge_payload: ResultPayload
) -> None:
    card = _card_for(siemens_3t_service, ge_payload, "MRN-GE15")
    assert "outside training data" in card["summary"], card["detail"]
    assert "field strength 1.5 T is not in the training data (3 T)" in card["detail"]
    assert "vendor GE MEDICAL SYSTEMS is not in the training data (Siemens)" in card["detail"]
    observation = card["suggestions"][0]["actions"][0]["resource"]
    notes = " ".join(n["text"] for n in observation["note"])
    assert "vendor GE MEDICAL SYSTEMS" in notes


def test_the_case_page_names_the_scanner_and_its_software(
    reference_service: Service, ge_payload: ResultPayload
) -> None:
    svc = reference_service
    body = ge_payload.model_copy(update={"patient": PatientKey(id="MRN-SW", issuer=PATIENT_ISSUER)})
    response = svc.publish(body.model_dump(mode="json"))
    assert response.status_code == 201, response.text
    rid = response.json()["result_id"]
    page = ReviewClient(svc, "radiologist").get(f"{svc.url}/review/cases/{rid}")
    assert page.status_code == 200
    shown = (
        '<dd id="scanner">GE MEDICAL SYSTEMS SIGNA Premier, 1.5 T, '
        "software 29\\LX\\MR29.1_EA_2138.a</dd>"
    )
    assert shown in page.text


def test_a_scanner_inside_the_card_domain_has_no_scanner_warning(
    siemens_3t_service: Service, ge_payload: ResultPayload
) -> None:
    siemens = ScannerInfo(
        manufacturer="Siemens Healthineers", model="MAGNETOM Prisma Fit", field_strength_t=2.89
    )
    provenance = ge_payload.provenance.model_copy(update={"scanner": siemens})
    card = _card_for(
        siemens_3t_service, ge_payload.model_copy(update={"provenance": provenance}), "MRN-S3"
    )
    assert "vendor" not in card["detail"] and "field strength" not in card["detail"]


def test_the_reference_card_records_no_scanner_so_does_not_judge_one(
    reference_service: Service, ge_payload: ResultPayload
) -> None:
    """Simulated training data has no scanner ("not recorded" on the card): nothing to compare
    a real scanner with, so the card states no scanner warning rather than a false one."""
    card = _card_for(reference_service, ge_payload, "MRN-REF")
    assert "vendor" not in card["detail"] and "field strength" not in card["detail"]
    reference = read_card(REFERENCE / ModelVariant.QUANTITATIVE.value)
    assert reference["training_domain"]["vendors"] == []
