"""The synthetic study generator: determinism, vendor b-value conventions, signal, geometry, SEG."""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from dicom_node.synth import (
    LesionType,
    StudyManifest,
    TissueLabel,
    Vendor,
    add_subcommand,
    cmd_synth,
    dki_signal,
    write_study,
)
from dicom_node.synth.dicom_writer import quantise
from dicom_node.synth.vendors import GE_B_OFFSET

SMALL = {"matrix": (48, 96), "slices": 10}

Writer = Callable[..., tuple[Path, StudyManifest]]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Writer:
    """Write (and cache per module) small studies keyed by their arguments."""
    cache: dict[tuple[object, ...], tuple[Path, StudyManifest]] = {}

    def write(**kwargs: object) -> tuple[Path, StudyManifest]:
        args = {**SMALL, **kwargs}
        key = tuple(sorted((k, repr(v)) for k, v in args.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("study")
            cache[key] = (out, write_study(out, **args))  # type: ignore[arg-type]
        return cache[key]

    return write


def _dwi(out: Path, m: StudyManifest) -> list[Dataset]:
    return [pydicom.dcmread(out / f) for f in m.dwi.files]


def _truth(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "truth.npz") as z:
        return {k: z[k] for k in z.files}


def _volume(out: Path, m: StudyManifest) -> np.ndarray:
    """(slices, rows, cols, b) real-valued DWI read back through the Modality LUT."""
    n_b, n_k = len(m.b_values), m.geometry["shape"][0]
    data = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in _dwi(out, m)])
    return np.moveaxis(data.reshape(n_b, n_k, *data.shape[1:]), 0, -1)


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_dicom(tmp_path: Path) -> None:
    a = write_study(tmp_path / "a", seed=3, **SMALL)  # type: ignore[arg-type]
    b = write_study(tmp_path / "b", seed=3, **SMALL)  # type: ignore[arg-type]
    assert a == b
    for entry in (a.dwi, a.t2, a.seg):
        for rel in entry.files:
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a/manifest.json").read_text() == (tmp_path / "b/manifest.json").read_text()


def test_different_seeds_give_different_patients_uids_and_pixels(studies: Writer) -> None:
    (out1, m1), (out2, m2) = studies(seed=1), studies(seed=2)
    assert m1.patient_id != m2.patient_id
    assert m1.study_instance_uid != m2.study_instance_uid
    assert m1.frame_of_reference_uid != m2.frame_of_reference_uid
    assert not set(m1.dwi.sop_instance_uids) & set(m2.dwi.sop_instance_uids)
    p1 = pydicom.dcmread(out1 / m1.dwi.files[0]).PixelData
    p2 = pydicom.dcmread(out2 / m2.dwi.files[0]).PixelData
    assert p1 != p2


def test_same_seed_other_vendor_is_same_patient_other_study(studies: Writer) -> None:
    (out_s, ms), (out_g, mg) = studies(seed=1), studies(seed=1, vendor="ge")
    assert ms.patient_id == mg.patient_id and ms.laterality == mg.laterality
    assert ms.study_instance_uid != mg.study_instance_uid
    np.testing.assert_array_equal(_volume(out_s, ms), _volume(out_g, mg))


def test_uids_are_valid(studies: Writer) -> None:
    _, m = studies(seed=1)
    uids = [m.study_instance_uid, m.frame_of_reference_uid, *m.dwi.sop_instance_uids]
    uids += [m.dwi.series_instance_uid, m.t2.series_instance_uid, m.seg.series_instance_uid]
    assert len(set(uids)) == len(uids)
    assert all(pydicom.uid.UID(u).is_valid and u.startswith("2.25.") for u in uids)


# --- vendor conventions (notes/dicom.md) -------------------------------------------------------


def test_siemens_private_b_value_and_no_standard_tag(studies: Writer) -> None:
    out, m = studies(seed=1, vendor="siemens")
    n_k = m.geometry["shape"][0]
    for idx, ds in enumerate(_dwi(out, m)):
        b = m.b_values[idx // n_k]
        assert ds[0x0019, 0x0010].value == "SIEMENS MR HEADER"
        elem = ds[0x0019, 0x100C]
        assert elem.VR == "IS" and int(elem.value) == b
        assert ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value == b
        assert ds.SequenceName == ("*ep_b0" if b == 0 else f"*ep_b{int(b)}t")
        assert "DiffusionBValue" not in ds and "DiffusionDirectionality" not in ds
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"]
        assert ds.Manufacturer == "SIEMENS"


@pytest.mark.parametrize("offset", [False, True])
def test_ge_private_b_value_and_standard_tag_only_above_zero(studies: Writer, offset: bool) -> None:
    out, m = studies(seed=1, vendor="ge", ge_b_offset=offset)
    n_k = m.geometry["shape"][0]
    for idx, ds in enumerate(_dwi(out, m)):
        b = m.b_values[idx // n_k]
        assert ds[0x0043, 0x0010].value == "GEMS_PARM_01"
        elem = ds[0x0043, 0x1039]
        assert elem.VR == "IS" and len(elem.value) == 4
        first = int(elem.value[0])
        assert first == (b + GE_B_OFFSET if offset else b)
        assert first % GE_B_OFFSET == b
        if b > 0:
            assert ds.DiffusionBValue == b and ds.DiffusionDirectionality == "ISOTROPIC"
        else:
            assert "DiffusionBValue" not in ds
        assert ds.Manufacturer == "GE MEDICAL SYSTEMS"


def test_philips_private_and_standard_b_value_volume_keys_and_shuffled_numbers(
    studies: Writer,
) -> None:
    out, m = studies(seed=1, vendor="philips")
    n_k = m.geometry["shape"][0]
    datasets = _dwi(out, m)
    keys = set()
    for idx, ds in enumerate(datasets):
        ib = idx // n_k
        b = m.b_values[ib]
        assert ds[0x2001, 0x0010].value == "Philips Imaging DD 001"
        assert ds[0x2001, 0x1003].VR == "FL" and ds[0x2001, 0x1003].value == b
        assert ds.DiffusionBValue == b  # on every image, b = 0 included
        assert ds[0x2005, 0x0014].value == "Philips MR Imaging DD 005"
        assert int(ds[0x2005, 0x1412].value) == ib + 1
        keys.add((int(ds[0x2005, 0x1412].value), int(ds[0x2005, 0x1413].value)))
    assert len(keys) == len(m.b_values)
    numbers = [int(ds.InstanceNumber) for ds in datasets]
    assert sorted(numbers) == list(range(1, len(numbers) + 1))
    assert numbers != sorted(numbers)  # not in volume order


def test_near_zero_first_b_is_kept_where_the_tag_can_hold_it(studies: Writer) -> None:
    bvals = (0.002, 50.0, 1000.0, 2000.0)
    out, m = studies(seed=1, vendor="philips", b_values=bvals)
    assert m.b_values[0] == 0.002
    ds = pydicom.dcmread(out / m.dwi.files[0])
    assert ds.DiffusionBValue == 0.002 and ds.DiffusionDirectionality == "NONE"
    assert ds[0x2001, 0x1003].value == pytest.approx(0.002)
    out, m = studies(seed=1, vendor="ge", b_values=bvals)
    ds = pydicom.dcmread(out / m.dwi.files[0])
    assert int(ds[0x0043, 0x1039].value[0]) == 0 and "DiffusionBValue" not in ds
    with pytest.raises(ValueError, match="b≈0"):
        write_study(out / "bad", b_values=(50.0, 1000.0), **SMALL)  # type: ignore[arg-type]


def test_t2_has_no_diffusion_attributes(studies: Writer) -> None:
    for vendor in Vendor:
        out, m = studies(seed=1, vendor=vendor.value)
        ds = pydicom.dcmread(out / m.t2.files[0])
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M"]
        assert list(ds.ScanningSequence) == ["SE"] or ds.ScanningSequence == "SE"
        for tag in ((0x0018, 0x9087), (0x0018, 0x9075), (0x0019, 0x100C), (0x0043, 0x1039)):
            assert tag not in ds
        assert (0x2001, 0x1003) not in ds
        assert ds.SeriesInstanceUID != m.dwi.series_instance_uid
        assert ds.FrameOfReferenceUID == m.frame_of_reference_uid


def test_patient_study_series_headers(studies: Writer) -> None:
    out, m = studies(seed=4, vendor="siemens")
    ds = pydicom.dcmread(out / m.dwi.files[0])
    assert ds.PatientID == m.patient_id and ds.IssuerOfPatientID == "HER2LOW-DEMO"
    assert "SYNTHETIC" in str(ds.PatientName) and ds.PatientSex == "F"
    assert len(ds.PatientBirthDate) == 8 and ds.PatientAge.endswith("Y")
    assert ds.StudyInstanceUID == m.study_instance_uid and ds.AccessionNumber
    assert ds.StudyDescription == "MRI BREAST BILATERAL W/WO CONTRAST"
    assert ds.Modality == "MR" and ds.BodyPartExamined == "BREAST"
    assert ds.Laterality == "" and ds.ProtocolName
    assert ds.ScanningSequence == "EP" and ds.MRAcquisitionType == "2D"
    assert float(ds.EchoTime) > 0 and float(ds.RepetitionTime) > 0
    assert float(ds.MagneticFieldStrength) == 3.0 and float(ds.ImagingFrequency) > 100
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0


# --- signal model and pixel round trip ---------------------------------------------------------


def test_quantise_round_trips_exactly() -> None:
    values = np.array([0.0, 0.4, 17.3, 1234.56, 2000.0])
    stored, slope = quantise(values)
    assert stored.dtype == np.uint16 and stored.max() <= 65535
    assert math.log2(slope).is_integer()
    np.testing.assert_allclose(stored * slope, values, atol=slope / 2)
    assert float(pydicom.valuerep.DSfloat(slope, auto_format=True)) == slope


def test_noise_free_pixels_match_model_and_fit_recovers_truth(studies: Writer) -> None:
    out, m = studies(seed=5, snr=math.inf)
    assert m.snr is None and m.sigma == 0.0
    truth = _truth(out)
    data = _volume(out, m)
    slope = m.dwi.rescale_slope
    assert slope is not None
    model = dki_signal(truth["s0"], truth["dapp"], truth["kapp"], m.b_values)
    # float32 truth maps vs float64 generation: allow quantisation plus a relative 1e-5
    np.testing.assert_allclose(data, model, atol=slope / 2 + 1e-5 * model.max())
    # Log-linear DKI fit (ln S quadratic in b) on tumour voxels recovers Dapp and Kapp.
    tumour = truth["tumour_mask"]
    assert tumour.sum() >= 10
    b = np.asarray(m.b_values)
    design = np.stack([np.ones_like(b), -b, b**2 / 6.0], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.log(data[tumour]).T, rcond=None)
    d_fit = coef[1]
    k_fit = coef[2] / d_fit**2
    np.testing.assert_allclose(d_fit, truth["dapp"][tumour], rtol=0.01)
    np.testing.assert_allclose(k_fit, truth["kapp"][tumour], atol=0.03)
    assert 0.8e-3 < d_fit.mean() < 1.6e-3 and 0.6 < k_fit.mean() < 1.2


def test_high_snr_fit_is_close_to_truth(studies: Writer) -> None:
    out, m = studies(seed=5, snr=300.0)
    truth = _truth(out)
    data = _volume(out, m)
    tumour = truth["tumour_mask"]
    b = np.asarray(m.b_values)
    design = np.stack([np.ones_like(b), -b, b**2 / 6.0], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.log(data[tumour]).T, rcond=None)
    d_fit, k_fit = coef[1], coef[2] / coef[1] ** 2
    assert np.median(d_fit) == pytest.approx(np.median(truth["dapp"][tumour]), rel=0.03)
    assert np.median(k_fit) == pytest.approx(np.median(truth["kapp"][tumour]), abs=0.06)


def test_noise_level_matches_sigma(studies: Writer) -> None:
    out, m = studies(seed=5, snr=20.0)
    truth = _truth(out)
    data = _volume(out, m)
    air = truth["labels"] == TissueLabel.BACKGROUND
    # Rician background is Rayleigh: mean = σ·sqrt(π/2)
    assert m.sigma == pytest.approx(1000.0 / 20.0)
    assert data[air][:, 0].mean() == pytest.approx(m.sigma * math.sqrt(math.pi / 2), rel=0.05)


def test_tissue_values_are_in_documented_ranges(studies: Writer) -> None:
    out, _ = studies(seed=6)
    t = _truth(out)
    tumour, fgt = t["tumour_mask"], t["labels"] == TissueLabel.FGT
    assert 0.9e-3 < t["dapp"][tumour].mean() < 1.5e-3 and 0.7 < t["kapp"][tumour].mean() < 1.1
    assert 1.9e-3 < t["dapp"][fgt].mean() < 2.3e-3 and 0.3 < t["kapp"][fgt].mean() < 0.5
    assert np.all(t["dapp"] * t["kapp"] * 2000.0 < 3.0)  # S(b) still falling at b = 2000
    fat = t["labels"] == TissueLabel.FAT
    assert t["s0"][fat].mean() < 0.05 * t["s0"][fgt].mean()  # fat suppressed
    assert t["t2w"][fat].mean() > t["t2w"][fgt].mean()  # T2 without fat suppression


@pytest.mark.parametrize("lesion", list(LesionType))
def test_lesion_shape_and_laterality(studies: Writer, lesion: LesionType) -> None:
    for seed in (7, 8):
        out, m = studies(seed=seed, lesion=lesion.value)
        t = _truth(out)
        mask = t["tumour_mask"]
        assert mask.any()
        _, n = ndimage.label(mask)
        xyz = np.argwhere(mask) @ m.geometry_object().affine[:3, :3].T
        xyz += np.asarray(m.geometry["origin"])
        side_x = xyz[:, 0].mean()
        assert (side_x < 0) == (m.laterality == "R")  # LPS: patient right is -x
        extent = np.ptp(xyz, axis=0).max()
        if lesion is LesionType.MASS:
            assert n == 1 and extent <= 35.0
        else:
            assert mask.sum() >= 20
        assert m.lesion == lesion.value


# --- geometry and SEG --------------------------------------------------------------------------


def test_positions_advance_along_normal(studies: Writer) -> None:
    out, m = studies(seed=1)
    g = m.geometry_object()
    n_k = g.shape[0]
    b0 = _dwi(out, m)[:n_k]
    for k, ds in enumerate(b0):
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], g.slice_position(k), atol=1e-4
        )
        assert [float(v) for v in ds.PixelSpacing] == [g.row_spacing, g.col_spacing]
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == g.slice_spacing
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in b0])
    along = pos @ g.normal
    np.testing.assert_allclose(np.diff(along), g.slice_spacing, atol=1e-4)
    np.testing.assert_allclose(g.normal, [0, 0, 1])


def test_seg_references_b0_images_and_matches_mask(studies: Writer) -> None:
    out, m = studies(seed=1)
    seg = pydicom.dcmread(out / m.seg.files[0])
    n_k = m.geometry["shape"][0]
    b0_uids = m.dwi.sop_instance_uids[:n_k]
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == m.frame_of_reference_uid
    assert seg.StudyInstanceUID == m.study_instance_uid and seg.PatientID == m.patient_id
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Tumour"
    prop = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("108369006", "SCT")
    assert segment.SegmentAlgorithmType in ("MANUAL", "SEMIAUTOMATIC")
    ref_series = seg.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == m.dwi.series_instance_uid
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} <= set(
        b0_uids
    )
    truth = _truth(out)["tumour_mask"]
    frames = seg.pixel_array.reshape(-1, *truth.shape[1:])
    rebuilt = np.zeros_like(truth)
    for frame, fg in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        src = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = b0_uids.index(src)
        pos = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(pos, m.geometry_object().slice_position(k), atol=1e-4)
        rebuilt[k] |= frame.astype(bool)
    np.testing.assert_array_equal(rebuilt, truth)


def test_manifest_round_trips_and_truth_file(studies: Writer) -> None:
    out, m = studies(seed=1)
    assert StudyManifest.load(out) == m
    truth = _truth(out)
    shape = tuple(m.geometry["shape"])
    for key in ("s0", "dapp", "kapp", "t2w", "labels", "tumour_mask"):
        assert truth[key].shape == shape
    np.testing.assert_array_equal(truth["bvals"], m.b_values)
    np.testing.assert_allclose(truth["affine"], m.geometry_object().affine)
    assert m.b_values == [0.0, 50.0, 800.0, 1000.0, 1500.0, 2000.0]
    assert all((out / f).is_file() for f in m.dwi.files + m.t2.files + m.seg.files)
    assert len(m.dwi.files) == len(m.b_values) * shape[0] and len(m.t2.files) == shape[0]


# --- CLI and errors ----------------------------------------------------------------------------


def test_cli_subcommand_writes_study(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="her2low")
    add_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["synth", "--out", str(tmp_path / "s"), "--seed", "2", "--lesion", "nme", "--vendor", "ge"]
    )
    assert args.func(args) == 0
    m = StudyManifest.load(tmp_path / "s")
    assert (m.vendor, m.lesion, m.seed) == ("ge", "nme", 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", "--out", "x", "--vendor", "toshiba"])


def test_cmd_synth_refuses_non_empty_folder_and_bad_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    assert cmd_synth(tmp_path / "busy", 0, "mass", 30.0, "siemens") == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").exists()
    assert cmd_synth(tmp_path / "x", 0, "mass", -1.0, "siemens") == 2
    assert cmd_synth(tmp_path / "y", 0, "cyst", 30.0, "siemens") == 2


def test_overwrite_replaces_only_previous_study(tmp_path: Path) -> None:
    out = tmp_path / "s"
    write_study(out, seed=1, vendor="siemens", **SMALL)  # type: ignore[arg-type]
    (out / "notes.txt").write_text("mine")
    m = write_study(out, seed=1, vendor="philips", overwrite=True, **SMALL)  # type: ignore[arg-type]
    assert (out / "notes.txt").exists()
    assert sorted(p.relative_to(out).as_posix() for p in (out / "dwi").iterdir()) == sorted(
        m.dwi.files
    )


@pytest.mark.slow
def test_default_study_is_small(tmp_path: Path) -> None:
    m = write_study(tmp_path / "s", seed=0)
    assert m.geometry["shape"] == [24, 96, 192]
    assert len(m.dwi.files) == 144 and len(m.t2.files) == 24
    size = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert size < 20 * 2**20
    assert 0.5 < m.truth_summary["tumour_volume_ml"] < 6.0


# --- dciodvfy (dicom3tools) --------------------------------------------------------------------


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not on PATH")
@pytest.mark.parametrize("vendor", list(Vendor))
def test_dciodvfy_reports_no_errors(studies: Writer, vendor: Vendor) -> None:
    out, m = studies(seed=1, vendor=vendor.value)
    n_k = m.geometry["shape"][0]
    targets = [m.dwi.files[0], m.dwi.files[3 * n_k], m.t2.files[0], m.seg.files[0]]
    for rel in targets:
        assert _dciodvfy_errors(out / rel) == [], rel
