"""Result objects (SR, SEG, Parametric Maps) written from an analysis of the synthetic study.

Every object passes dicom3tools ``dciodvfy`` without errors, DCMTK ``dsrdump`` renders the SR
with the expected codes and values, and highdicom reads each object back to the numbers the
analysis computed.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.analysis.features import MAPS, STATISTICS, feature_key
from dicom_node.analysis.outputs import ResultObjects, build_outputs, is_own_object
from dicom_node.analysis.outputs.codes import QUANTITY, STATISTIC
from dicom_node.analysis.series_analysis import Analysis, analyse
from dicom_node.series.assemble import assemble_dwi
from dicom_node.series.volume import DwiVolume
from dicom_node.synth import StudyManifest, write_study
from tests.conftest import require_tool

pytestmark = pytest.mark.slow

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
PM_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"  # the key images (tests/test_kos.py)


@dataclass
class Case:
    manifest: StudyManifest
    datasets: list[pydicom.Dataset]
    dwi: DwiVolume
    seg: pydicom.Dataset
    auto: Analysis  # automatic ROI (no SEG given)
    from_seg: Analysis  # ROI from the study's SEG


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("study")
    manifest = write_study(folder, seed=5)
    datasets = [pydicom.dcmread(folder / f) for f in manifest.dwi.files]
    seg = pydicom.dcmread(folder / manifest.seg.files[0])
    dwi = assemble_dwi(datasets)
    return Case(
        manifest=manifest,
        datasets=datasets,
        dwi=dwi,
        seg=seg,
        auto=analyse(dwi),
        from_seg=analyse(dwi, segs=[seg]),
    )


@pytest.fixture(scope="module")
def auto_files(case: Case, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_outputs(case.auto, case.dwi, case.datasets).write(tmp_path_factory.mktemp("auto"))


@pytest.fixture(scope="module")
def seg_files(case: Case, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    objects = build_outputs(case.from_seg, case.dwi, case.datasets, segs=[case.seg])
    return objects.write(tmp_path_factory.mktemp("seg"))


def _errors(path: Path) -> list[str]:
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def test_automatic_roi_gives_sr_seg_and_three_maps(auto_files: list[Path]) -> None:
    classes = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in auto_files]
    assert classes == [SR_STORAGE, SEG_STORAGE, PM_STORAGE, PM_STORAGE, PM_STORAGE, KOS_STORAGE]


def test_incoming_seg_is_referenced_not_copied(case: Case, seg_files: list[Path]) -> None:
    classes = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in seg_files]
    assert classes == [SR_STORAGE, PM_STORAGE, PM_STORAGE, PM_STORAGE, KOS_STORAGE]
    tool = require_tool("dsrdump")
    dump = subprocess.run(
        [tool, "+Pu", str(seg_files[0])], capture_output=True, text=True, check=True
    ).stdout
    assert f'"{case.seg.SOPInstanceUID}",1)' in dump


def test_dciodvfy_reports_no_errors(auto_files: list[Path], seg_files: list[Path]) -> None:
    problems = {p.name: _errors(p) for p in [*auto_files, *seg_files]}
    assert problems == {p.name: [] for p in [*auto_files, *seg_files]}


def test_dsrdump_renders_codes_and_values(case: Case, auto_files: list[Path]) -> None:
    tool = require_tool("dsrdump")
    result = subprocess.run(
        [tool, "+Pl", "+Pu", str(auto_files[0])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    dump = result.stdout
    assert "Imaging Measurement Report" in dump
    assert '(241615005,SCT,"MRI of breast")' in dump
    assert '(113252,DCM,"Kurtosis diffusion model")' in dump
    assert '"reference model, not clinically validated"' in dump
    assert '"Algorithm Version")="dki-2"' in dump
    assert "fit method=nls_rician" in dump and "denoising=mppca" in dump
    assert "b-values=0 50 800 1000 1500 2000 s/mm2" in dump
    assert "kurtosis convention=excess" in dump and "discretisation=fixed bin size" in dump
    sigma = case.auto.sigma
    assert sigma is not None and f"sigma={sigma:.6g}" in dump
    # one NUM per statistic: (quantity, derivation) → printed value
    nums = re.findall(
        r'<contains NUM:\(,,"([^"]+)"\)="([^"]+)" \(([^,]+),UCUM,[^)]*\)>\n'
        r'(?:\s+<has concept mod CODE:\(,,"Measurement Method"\)=[^\n]*\n)?'
        r'\s+<has concept mod CODE:\(,,"Derivation"\)=\(([^,]+),(\w+),',
        dump,
    )
    assert len(nums) == 21
    printed = {(name, code): (float(value), unit) for name, value, unit, code, _ in nums}
    for m in MAPS:
        for stat in STATISTICS:
            value, unit = printed[(QUANTITY[m].meaning, STATISTIC[stat].value)]
            expected = case.auto.features[feature_key(m, stat)]
            assert value == pytest.approx(expected, rel=1e-9, abs=1e-15)
            if stat in ("skewness", "kurtosis"):
                assert unit == "1"
            elif stat == "entropy":
                assert unit == "bit"
            else:
                assert unit == ("{ratio}" if m == "kapp" else "mm2/s")
    volume = re.search(r'NUM:\(,,"Volume"\)="([^"]+)" \(cm3,UCUM', dump)
    assert volume is not None
    assert float(volume.group(1)) == pytest.approx(case.auto.roi.volume_ml, rel=1e-9)


def test_highdicom_reads_back_the_computed_values(case: Case, auto_files: list[Path]) -> None:
    sr = hd.sr.srread(auto_files[0])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    read = {
        (m.name.value, m.derivation.value if m.derivation else ""): m.value
        for m in groups[0].get_measurements()
    }
    for m in MAPS:
        for stat in STATISTICS:
            assert read[(QUANTITY[m].value, STATISTIC[stat].value)] == pytest.approx(
                case.auto.features[feature_key(m, stat)], rel=1e-12
            )
    assert groups[0].referenced_segment is not None

    seg = hd.seg.segread(auto_files[1])
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert "unconfirmed" in seg.SegmentSequence[0].SegmentLabel
    grid = hd.Volume(
        np.zeros(case.dwi.geometry.shape, dtype=np.float32),
        affine=case.dwi.geometry.affine,
        coordinate_system="PATIENT",
    )
    mask = np.asarray(seg.get_volume(combine_segments=True).match_geometry(grid).array) > 0
    np.testing.assert_array_equal(mask, case.auto.roi.mask)

    for path in auto_files[2:5]:  # the maps (the KOS is last: tests/test_kos.py)
        pm = hd.imread(path)
        name = {"ADC": "adc", "DAPP": "dapp", "KAPP": "kapp"}[pm.ContentLabel]
        values = np.asarray(pm.get_volume().match_geometry(grid).array, dtype=np.float32)
        expected = np.nan_to_num(np.asarray(case.auto.maps[name], dtype=np.float32))
        assert values.shape == expected.shape
        np.testing.assert_array_equal(values, expected)
        mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        unit = mapping.MeasurementUnitsCodeSequence[0].CodeValue
        assert unit == ("{ratio}" if name == "kapp" else "mm2/s")


def test_same_patient_study_and_frame_of_reference(case: Case, auto_files: list[Path]) -> None:
    src = case.datasets[0]
    series = set()
    for path in auto_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PatientID == src.PatientID and ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SeriesDescription
        if ds.Modality not in ("SR", "KO"):  # documents have no frame of reference
            assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        series.add(ds.SeriesInstanceUID)
        assert is_own_object(ds)
    assert len(series) == len(auto_files)
    assert not any(is_own_object(ds) for ds in case.datasets)


def test_uids_are_derived_so_a_retry_resends_the_same_objects(case: Case) -> None:
    def uids(objects: ResultObjects) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in objects.datasets]

    first = build_outputs(case.auto, case.dwi, case.datasets)
    again = build_outputs(case.auto, case.dwi, case.datasets)
    other_roi = build_outputs(case.from_seg, case.dwi, case.datasets, segs=[case.seg])
    assert uids(first) == uids(again)
    assert not set(uids(first)) & set(uids(other_roi))


def test_fit_writes_the_objects_and_never_reanalyses_them(tmp_path: Path, case: Case) -> None:
    from her2low.cli import main

    study = tmp_path / "study"
    write_study(study, seed=5)
    out = tmp_path / "out"
    assert main(["fit", str(study), "--out", str(out)]) == 0
    written = sorted((out / "dicom").rglob("*.dcm"))
    assert len(written) == 5  # SR + 3 maps + KOS: the study's own SEG is referenced
    assert all(is_own_object(pydicom.dcmread(p, stop_before_pixels=True)) for p in written)
    # the objects beside the study are recognised as ours: still one analysed series
    again = tmp_path / "again"
    assert main(["fit", str(study), str(out / "dicom"), "--out", str(again)]) == 0
    rows = (again / "features.csv").read_text().splitlines()
    assert len(rows) == 2


def test_likelihood_when_known_is_a_privately_coded_measurement(case: Case, tmp_path: Path) -> None:
    from dicom_node.analysis.outputs import Likelihood

    objects = build_outputs(
        case.auto,
        case.dwi,
        case.datasets,
        likelihood=Likelihood(value=0.42, model_name="her2low-lr", model_version="3"),
    )
    (sr_path,) = [p for p in objects.write(tmp_path) if p.name.startswith("SR_")]
    assert _errors(sr_path) == []
    dump = subprocess.run(
        [require_tool("dsrdump"), "+Pl", str(sr_path)], capture_output=True, text=True, check=True
    ).stdout
    assert '<contains NUM:(,,"HER2-low likelihood")="0.42" ({probability},UCUM,' in dump
    assert '"Algorithm Name")="her2low-lr"' in dump and '"Algorithm Version")="3"' in dump
    scheme = pydicom.dcmread(sr_path).CodingSchemeIdentificationSequence[0]
    assert scheme.CodingSchemeDesignator == "99HER2LOW"
