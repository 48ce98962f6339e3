"""The revised TID 1500 SR: what the service concluded, written for the PACS.

Built from the synthetic study's real objects: the revision keeps the original's series,
measurements, ROI and TID 4019, adds the coded BI-RADS descriptors and the likelihood with its
model, references the SR it replaces, passes ``dciodvfy`` and renders in ``dsrdump``.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from dicom_node.analysis.features import MAPS, STATISTICS, feature_key
from dicom_node.analysis.outputs import build_outputs
from dicom_node.analysis.outputs.codes import QUANTITY, STATISTIC
from dicom_node.analysis.outputs.descriptors import DESCRIPTOR_CODES
from dicom_node.analysis.outputs.revision import (
    AssessmentContent,
    revise_measurement_report,
    revision_uid,
)
from dicom_node.analysis.series_analysis import Analysis, analyse
from dicom_node.series.assemble import assemble_dwi
from dicom_node.series.volume import DwiVolume
from dicom_node.synth import write_study
from models.contract import Assessment
from models.schema import DESCRIPTORS
from tests.conftest import require_tool

pytestmark = pytest.mark.slow

DESCRIPTORS_ENTERED = {
    "lesion_type": "mass",
    "mass_shape": "irregular",
    "mass_margin": "spiculated",
    "mass_internal_enhancement": "rim",
    "t2_hyperintensity": "no",
    "peritumoral_edema": "yes",
    "kinetic_curve": "washout",
    "nme_distribution": "",  # not entered: not written
}
SCORED = AssessmentContent(
    descriptors=DESCRIPTORS_ENTERED,
    probability=0.37,
    model_name="her2low-reference",
    model_version="0.1.0",
    statement="Reference model, not clinically validated",
)


@dataclass
class Case:
    datasets: list[pydicom.Dataset]
    dwi: DwiVolume
    analysis: Analysis
    files: list[Path]

    @property
    def original(self) -> pydicom.Dataset:
        return pydicom.dcmread(self.files[0])


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("study")
    manifest = write_study(folder, seed=5)
    datasets = [pydicom.dcmread(folder / f) for f in manifest.dwi.files]
    dwi = assemble_dwi(datasets)
    analysis = analyse(dwi)
    files = build_outputs(analysis, dwi, datasets).write(tmp_path_factory.mktemp("objects"))
    return Case(datasets, dwi, analysis, files)


def _write(ds: pydicom.Dataset, folder: Path) -> Path:
    path = folder / f"SR_{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def _dsrdump(path: Path) -> str:
    result = subprocess.run(
        [require_tool("dsrdump"), "+Pl", "+Pu", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_schema_descriptor_value_has_a_code() -> None:
    """A descriptor the service may send is always coded (standard or declared private)."""
    for spec in DESCRIPTORS:
        concept, values = DESCRIPTOR_CODES[spec.name]
        assert set(values) == set(spec.values), spec.name
        for code in (concept, *values.values()):
            assert 0 < len(code.value) <= 16 and code.scheme_designator in {
                "DCM",
                "SCT",
                "RADLEX",
                "99HER2LOW",
            }


def test_revision_is_the_next_instance_of_the_same_sr_series(case: Case, tmp_path: Path) -> None:
    original = case.original
    sr = revise_measurement_report(original, original, SCORED, instance_number=2)
    assert sr.SeriesInstanceUID == original.SeriesInstanceUID
    assert sr.SeriesNumber == original.SeriesNumber and sr.InstanceNumber == 2
    assert sr.SOPInstanceUID == revision_uid(str(original.SOPInstanceUID), 2, SCORED)
    assert sr.SOPInstanceUID != original.SOPInstanceUID
    again = revise_measurement_report(original, original, SCORED, instance_number=2)
    assert again.SOPInstanceUID == sr.SOPInstanceUID  # a re-built revision is the same object
    assert sr.PatientID == original.PatientID and sr.StudyInstanceUID == original.StudyInstanceUID
    (pred,) = sr.PredecessorDocumentsSequence
    ref = pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.PreliminaryFlag == "PRELIMINARY"

    def evidence(ds: pydicom.Dataset) -> set[str]:
        return {
            r.ReferencedSOPInstanceUID
            for study in ds.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for r in series.ReferencedSOPSequence
        }

    assert evidence(sr) == evidence(original)
    path = _write(sr, tmp_path)
    assert _dciodvfy_errors(path) == []


def test_revised_sr_reads_back_with_highdicom(case: Case, tmp_path: Path) -> None:
    original = case.original
    path = _write(
        revise_measurement_report(original, original, SCORED, instance_number=2), tmp_path
    )
    sr = hd.sr.srread(path)
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    measurements = {
        (m.name.value, m.derivation.value if m.derivation else ""): m
        for m in group.get_measurements()
    }
    # the original's 21 statistics and the volume are all still there, with their values
    for m in MAPS:
        for stat in STATISTICS:
            value = measurements[(QUANTITY[m].value, STATISTIC[stat].value)].value
            assert value == pytest.approx(case.analysis.features[feature_key(m, stat)], rel=1e-12)
    assert group.referenced_segment is not None
    likelihood = measurements[("HER2LOWP", "")]
    assert likelihood.value == pytest.approx(0.37)
    assert likelihood.unit.value == "{probability}"
    # TID 4019 under the NUM: (111001, DCM, "Algorithm Name"), (111003, DCM, "Algorithm Version")
    algorithm = {
        item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
        for item in likelihood[0].ContentSequence
        if item.ValueType == "TEXT"
    }
    assert algorithm == {"111001": "her2low-reference", "111003": "0.1.0"}
    evaluations = {
        (e.name.value, e.value.value): e.value.scheme_designator
        for e in group.get_qualitative_evaluations()
    }
    assert evaluations == {
        ("LESIONTYPE", "4147007"): "SCT",  # lesion type = Mass
        ("300842002", "49608001"): "SCT",  # Shape = Irregular
        ("111037", "129742005"): "SCT",  # Margins = Spiculated lesion
        ("RID6058", "RIM"): "99HER2LOW",  # Enhancement pattern = rim (no standard code)
        ("RID39467", "272519000"): "SCT",  # T2 hyperintensity = Absent
        ("79654002", "52101004"): "SCT",  # Edema = Present
        ("KINETICCURVE", "130599"): "DCM",  # Washout delayed phase: Type 3 curve
    }
    schemes = [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence]
    assert schemes == ["99HER2LOW"]


def test_dsrdump_shows_descriptor_codes_likelihood_model_and_statement(
    case: Case, tmp_path: Path
) -> None:
    original = case.original
    path = _write(
        revise_measurement_report(original, original, SCORED, instance_number=2), tmp_path
    )
    dump = _dsrdump(path)
    assert "Completion Flag     : COMPLETE" in dump and "Predecessor Docs    : 1" in dump
    assert '<contains CODE:(,,"Shape")=(49608001,SCT,"Irregular")>' in dump
    assert '<contains CODE:(,,"Margins")=(129742005,SCT,"Spiculated lesion")>' in dump
    assert '<contains CODE:(,,"Edema")=(52101004,SCT,"Present")>' in dump
    assert '=(130599,DCM,"Washout delayed phase: Type 3 curve")>' in dump
    assert '<contains NUM:(,,"HER2-low likelihood")="0.37" ({probability},UCUM,' in dump
    assert '"Algorithm Name")="her2low-reference"' in dump
    assert '"Algorithm Version")="0.1.0"' in dump
    assert "Reference model, not clinically validated" in dump
    assert '"reference model, not clinically validated"' in dump  # the original's, kept
    assert '"Algorithm Version")="' + case.analysis.pipeline_version + '"' in dump  # TID 4019
    assert "fit method=" in dump  # the pipeline's algorithm parameters, kept


def test_not_scored_writes_the_reasons_and_no_number(case: Case, tmp_path: Path) -> None:
    original = case.original
    scored = revise_measurement_report(original, original, SCORED, instance_number=2)
    content = AssessmentContent(
        descriptors={"lesion_type": "nme", "nme_distribution": "multiple_regions"},
        model_name="her2low-reference",
        model_version="0.1.0",
        not_scored=("descriptors missing: nme_internal_pattern", "QC: σ\x1b[31m estimate failed"),
    )
    sr = revise_measurement_report(original, scored, content, instance_number=3)
    assert sr.CompletionFlag == "PARTIAL" and sr.InstanceNumber == 3
    pred = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == scored.SOPInstanceUID
    path = _write(sr, tmp_path)
    assert _dciodvfy_errors(path) == []
    dump = _dsrdump(path)
    assert 'NUM:(,,"HER2-low likelihood")' not in dump  # not scored: no number
    assert '"HER2-low likelihood not scored")="descriptors missing: nme_internal_pattern"' in dump
    assert "\x1b" not in dump  # a control character from the service never reaches the SR
    assert '(NME,99HER2LOW,"Non-mass enhancement")' in dump
    assert '(MULTIREGION,99HER2LOW,"Multiple regions")' in dump
    # the revision is built from the original: the previous revision's descriptors are gone
    assert "Spiculated lesion" not in dump
    read = hd.sr.srread(path)
    (group,) = read.content.get_volumetric_roi_measurement_groups()
    assert all(m.name.value != "HER2LOWP" for m in group.get_measurements())


def test_parametric_maps_carry_the_source_modality(case: Case) -> None:
    """PS3.3 C.8.32.1: a single-modality map takes the acquisition modality (MR), not OT."""
    maps = [pydicom.dcmread(p, stop_before_pixels=True) for p in case.files]
    pms = [ds for ds in maps if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"]
    assert len(pms) == 3 and {ds.Modality for ds in pms} == {"MR"}
    assert case.datasets[0].Modality == "MR"
    pm_path = next(p for p, ds in zip(case.files, maps, strict=True) if ds in pms)
    assert _dciodvfy_errors(pm_path) == []


# --- through the node database: record, revise, queue, no duplicates -------------------------


def _assessment(case: Case, **fields: Any) -> Assessment:
    base: dict[str, Any] = {
        "result_id": "r-1",
        "series_instance_uid": str(case.dwi.series_instance_uid),
        "pipeline_version": case.analysis.pipeline_version,
        "revision": 1,
        "descriptors": {"lesion_type": "mass", "mass_shape": "oval"},
        "descriptors_version": 1,
        "probability": 0.61,
        "model_name": "her2low-reference",
        "model_version": "0.1.0",
        "statement": "Reference model, not clinically validated",
        "computed_at": dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC),
    }
    base.update(fields)
    return Assessment.model_validate(base)


def test_an_assessment_revises_the_sr_once_and_queues_it_to_the_same_destinations(
    case: Case, home: Path
) -> None:
    from dicom_node.jobs import export, results_sync
    from dicom_node.jobs.export import Destination, Export, ExportConfig, ExportPolicy
    from her2low.core.database import make_engine, session_factory
    from her2low.core.settings import load_settings

    sessions = session_factory(make_engine(load_settings().node_database_url))
    pacs = Destination("pacs", "PACS", "127.0.0.1", 11112)
    other = Destination("other", "OTHER", "127.0.0.1", 11113, calling_aets=("NOBODY",))
    config = ExportConfig((pacs, other), home / "outputs", ExportPolicy(calling_aet="HER2LOW"))
    (first,) = export.export_results(
        sessions, config, analysis=case.analysis, dwi=case.dwi, datasets=case.datasets
    )
    # nothing entered and nothing scored: the original already says all there is
    unscored = _assessment(case, descriptors={}, probability=None, not_scored=("no descriptors",))
    assert results_sync.apply_assessment(sessions, config, unscored) is None
    assessment = _assessment(case)
    uid = results_sync.apply_assessment(sessions, config, assessment)
    assert uid is not None
    # the same assessment again (a re-poll, a second worker): nothing new is written or sent
    assert results_sync.apply_assessment(sessions, config, assessment) is None
    # an assessment of a series this node never wrote an SR for is not ours to revise
    stranger = _assessment(case, series_instance_uid="1.2.3.4")
    assert results_sync.apply_assessment(sessions, config, stranger) is None
    with sessions() as session:
        rows = list(session.query(Export).order_by(Export.id))
        session.expunge_all()
    assert [(r.destination, len(r.file_paths()) > 1) for r in rows] == [
        ("pacs", True),  # the analysis' objects (SR, SEG, maps, ...)
        ("pacs", False),  # the revised SR alone
    ]
    assert rows[0].id == first and rows[1].batch_key == uid
    revised = pydicom.dcmread(rows[1].file_paths()[0])
    assert revised.SOPInstanceUID == uid and revised.InstanceNumber == 2
    assert rows[1].file_paths()[0].parent == rows[0].file_paths()[0].parent

    # new descriptors: instance 3, replacing instance 2
    later = _assessment(
        case, revision=2, descriptors={"lesion_type": "mass", "mass_shape": "round"}
    )
    third = results_sync.apply_assessment(sessions, config, later)
    assert third is not None and third != uid
    ds = pydicom.dcmread(next((home / "outputs").rglob(f"SR_{third}.dcm")), stop_before_pixels=True)
    assert ds.InstanceNumber == 3
    pred = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid

    # the series' export report covers the analysis: one status per destination, all objects
    report, seen = results_sync.export_report(sessions, str(case.dwi.series_instance_uid))
    assert report is not None and len(seen) == 3
    (status,) = report.exports
    assert status.destination == "pacs" and status.objects == len(rows[0].file_paths()) + 2
    assert report.pipeline_version == case.analysis.pipeline_version
