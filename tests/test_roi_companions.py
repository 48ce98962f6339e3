"""The automatic ROI uses what the study holds (issue 12): DCE subtraction and T2w on the DWI grid.

DCE changes (improves) the NME candidate; a study with nothing else behaves as before; a series
in another frame of reference or shifted against the DWI is not used, and the provenance says
which inputs the candidate used and which series were left out (why). The DICOM path: the study
writer's DCE series are recognised as DCE, read into volumes on their own grid, and a dynamic
pre/post pair gives the same subtraction as the stored subtraction series.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.analysis.companions import (
    CompanionKind,
    CompanionSeries,
    companion_from_datasets,
    on_dwi_grid,
)
from dicom_node.analysis.noise import background_mask, estimate_sigma
from dicom_node.analysis.roi import Roi, _fluid, auto_roi
from dicom_node.analysis.series_analysis import AnalysisSettings, analyse
from dicom_node.series.roles import SeriesRole, classify_series
from dicom_node.series.volume import DwiVolume, Geometry, ScalarVolume
from dicom_node.synth import write_study
from dicom_node.synth.dce import dce_series
from dicom_node.synth.phantom import (
    S0_FGT_NOMINAL,
    LesionType,
    add_rician_noise,
    dki_signal,
    make_phantom,
    rng_stream,
)
from dicom_node.synth.study import DEFAULT_B_VALUES, study_geometry
from tests import dicom_builders as b

GEOMETRY: Geometry = study_geometry((80, 160), 16, 4.0, "2.25.12")
BVALS = np.asarray(DEFAULT_B_VALUES, dtype=np.float64)
SNR = 15.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(max(a.sum() + b.sum(), 1))


def _study(seed: int, lesion: LesionType) -> tuple[DwiVolume, list[CompanionSeries], np.ndarray]:
    ph = make_phantom(GEOMETRY, seed=seed, lesion=lesion)
    data = add_rician_noise(
        dki_signal(ph.s0, ph.dapp, ph.kapp, BVALS), S0_FGT_NOMINAL / SNR, rng_stream(seed, 5)
    )
    dwi = DwiVolume(data.astype(np.float32), BVALS, GEOMETRY, "2.25.20", "2.25.21")
    dce = dce_series(ph, seed=seed, snr=SNR)
    t2 = add_rician_noise(ph.t2w, 300.0 / SNR, rng_stream(seed, 6))
    companions = [
        CompanionSeries(CompanionKind.T2W, ScalarVolume(t2, GEOMETRY, "2.25.22")),
        CompanionSeries(
            CompanionKind.DCE_SUBTRACTION, ScalarVolume(dce.subtraction, dce.geometry, "2.25.23")
        ),
    ]
    return dwi, companions, ph.tumour_mask


def _roi(dwi: DwiVolume, companions: list[CompanionSeries]) -> Roi:
    sigma = estimate_sigma(dwi.data, bvals=dwi.bvals)
    grid = on_dwi_grid(companions, dwi, ~background_mask(dwi.data, sigma, bvals=dwi.bvals))
    return auto_roi(
        dwi.data, dwi.bvals, dwi.geometry, sigma=sigma,
        enhancement=grid.enhancement, t2w=grid.t2w, ignored=grid.ignored,
    )  # fmt: skip


def test_dce_improves_the_nme_candidate() -> None:
    """Kinetics delineate clumped NME: with the DCE subtraction the candidate covers the
    segment's faint foci the DWI half-maximum rule misses."""
    gains = []
    for seed in (3, 9, 14):
        dwi, companions, truth = _study(seed, LesionType.NME)
        alone = _roi(dwi, [])
        both = _roi(dwi, companions)
        assert both.inputs == ("dwi_high_b", "adc", "t2w", "dce_subtraction")
        assert alone.inputs == ()  # nothing offered: provenance as before
        assert both.provenance().inputs == both.inputs
        gains.append(_dice(both.mask, truth) - _dice(alone.mask, truth))
        assert _dice(both.mask, truth) >= 0.6, seed
    assert np.median(gains) > 0.1, gains


def test_dce_keeps_a_mass_candidate_good() -> None:
    dwi, companions, truth = _study(5, LesionType.MASS)
    assert _dice(_roi(dwi, companions).mask, truth) >= 0.8


def test_a_study_without_companions_behaves_as_before() -> None:
    """No T2w or DCE: the same candidate as the DWI-only call and the provenance of before."""
    dwi, _, _ = _study(3, LesionType.NME)
    sigma = estimate_sigma(dwi.data, bvals=dwi.bvals)
    plain = auto_roi(dwi.data, dwi.bvals, dwi.geometry, sigma=sigma)
    via_grid = _roi(dwi, [])
    assert np.array_equal(plain.mask, via_grid.mask)
    a = analyse(dwi, settings=AnalysisSettings(previews=False))
    assert a.provenance.roi.inputs is None and a.provenance.roi.inputs_ignored is None
    assert not {"inputs", "inputs_ignored"} & set(a.provenance.roi.model_dump(mode="json"))


def test_another_frame_of_reference_is_not_used() -> None:
    dwi, companions, _ = _study(9, LesionType.NME)
    other = [
        dataclasses.replace(
            c,
            volume=ScalarVolume(
                c.volume.data,
                dataclasses.replace(c.volume.geometry, frame_of_reference_uid="2.25.999"),
                c.volume.series_instance_uid,
            ),
        )
        for c in companions
    ]
    roi = _roi(dwi, other)
    assert roi.inputs == ("dwi_high_b", "adc")
    assert np.array_equal(roi.mask, _roi(dwi, []).mask)
    assert len(roi.ignored) == 2
    assert all("other frame of reference" in why for why in roi.ignored)
    assert roi.provenance().inputs_ignored == roi.ignored


@pytest.mark.parametrize("shift_mm", [8.0, 15.0])
def test_a_misregistered_series_is_not_used(shift_mm: float) -> None:
    """Same frame of reference but displaced (patient motion, a wrong header): left out."""
    dwi, companions, _ = _study(9, LesionType.NME)
    dce = companions[1]
    g = dce.volume.geometry
    moved = dataclasses.replace(g, origin=(g.origin[0] + shift_mm, g.origin[1], g.origin[2]))
    shifted = CompanionSeries(
        dce.kind, ScalarVolume(dce.volume.data, moved, dce.volume.series_instance_uid)
    )
    roi = _roi(dwi, [companions[0], shifted])
    assert "dce_subtraction" not in roi.inputs
    assert "t2w" in roi.inputs
    assert any("misregistered" in why and "2.25.23" in why for why in roi.ignored), roi.ignored


def test_t2_bright_free_water_is_fluid() -> None:
    """A cyst (bright T2, high ADC) is excluded; bright T2 with restricted diffusion is not."""
    t2 = np.full((3, 4, 4), 400.0)
    adc = np.full((3, 4, 4), 1.0e-3)
    seed = np.zeros((3, 4, 4), dtype=bool)
    seed[1, 1, 1] = True
    t2[0] = 1200.0
    adc[0, :2] = 2.8e-3  # cyst: bright and free water
    fluid = _fluid(t2, adc, seed, factor=1.8, adc_min=1.5e-3)
    assert fluid[0, :2].all()
    assert not fluid[0, 2:].any()  # bright T2 but restricted: tissue (e.g. mucinous cancer)
    assert not fluid[1:].any()


def test_study_writer_dce_series_read_back_on_their_own_grid(tmp_path: Path) -> None:
    """The DICOM path: roles, volumes on the DCE grid, the pair's subtraction = the stored one."""
    m = write_study(tmp_path, seed=4, lesion="nme", snr=30.0, matrix=(48, 96), slices=6, dce=True)
    assert m.dce is not None and m.dce_subtraction is not None
    assert m.dce_pattern == "clumped"
    read = {
        name: [pydicom.dcmread(tmp_path / f) for f in entry.files]
        for name, entry in (("dce", m.dce), ("sub", m.dce_subtraction), ("t2", m.t2))
    }
    assert classify_series(read["dce"]).role is SeriesRole.DCE
    assert classify_series(read["sub"]).role is SeriesRole.DCE
    single = [pydicom.dcmread(tmp_path / f) for f in m.dce_subtraction.files]
    for ds in single:  # a subtraction stored alone, with no temporal attributes
        del ds.NumberOfTemporalPositions, ds.TemporalPositionIdentifier
    verdict = classify_series(single)
    assert verdict.role is SeriesRole.DCE
    assert any("SUBTRACTION" in r for r in verdict.reasons)
    pair = companion_from_datasets("dce", read["dce"])
    stored = companion_from_datasets("dce", read["sub"])
    t2 = companion_from_datasets("t2w", read["t2"])
    assert pair.kind is stored.kind is CompanionKind.DCE_SUBTRACTION
    assert stored.stored_subtraction and not pair.stored_subtraction  # stored one preferred
    assert t2.kind is CompanionKind.T2W and not t2.stored_subtraction
    dwi_geometry = m.geometry_object()
    g = stored.volume.geometry
    assert g.shape != dwi_geometry.shape and g.slice_spacing < dwi_geometry.slice_spacing
    assert g.frame_of_reference_uid == dwi_geometry.frame_of_reference_uid
    assert t2.volume.geometry.shape == dwi_geometry.shape
    # both quantised to 16 bits with their own slope: equal to within the coarser step
    step = max(float(m.dce.rescale_slope or 1.0), float(m.dce_subtraction.rescale_slope or 1.0))
    assert np.abs(pair.volume.data - stored.volume.data).max() <= 2 * step
    with pytest.raises(ValueError, match="not used"):
        companion_from_datasets("other", read["t2"])


def test_enhanced_multi_frame_companions_read_as_their_classic_images(tmp_path: Path) -> None:
    """T2w, dynamic DCE and a stored subtraction each as ONE Enhanced MR Image (frames shuffled,
    geometry and temporal position in the functional groups) give the volumes, roles and
    subtraction of the same images stored classic."""
    m = write_study(tmp_path, seed=4, lesion="nme", snr=30.0, matrix=(48, 96), slices=6, dce=True)
    assert m.dce is not None and m.dce_subtraction is not None
    classic = {
        name: [pydicom.dcmread(tmp_path / f) for f in entry.files]
        for name, entry in (("dce", m.dce), ("sub", m.dce_subtraction), ("t2", m.t2))
    }
    enhanced = {name: [b.as_enhanced(images)] for name, images in classic.items()}
    for name, role in (("dce", SeriesRole.DCE), ("sub", SeriesRole.DCE), ("t2", SeriesRole.T2W)):
        assert classify_series(enhanced[name]).role is role, name
        kind = "t2w" if role is SeriesRole.T2W else "dce"
        want = companion_from_datasets(kind, classic[name])
        got = companion_from_datasets(kind, enhanced[name])
        assert got.kind is want.kind
        assert got.stored_subtraction is want.stored_subtraction is (name == "sub"), name
        assert got.volume.geometry == want.volume.geometry, name
        np.testing.assert_array_equal(got.volume.data, want.volume.data)
    # the dynamic one really was two phases in one object
    assert int(enhanced["dce"][0].NumberOfFrames) == 2 * int(enhanced["sub"][0].NumberOfFrames)
    # a frame without its place is named, not guessed
    broken = b.as_enhanced(classic["t2"])
    del broken.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    with pytest.raises(ValueError, match="lack ImagePositionPatient"):
        companion_from_datasets("t2w", [broken])
    # nor is a pixel spacing (frame placement assumes 1 mm, which would misplace the voxels)
    unmeasured = b.as_enhanced(classic["t2"])
    del unmeasured.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    classic_unmeasured = [pydicom.dcmread(tmp_path / f) for f in m.t2.files]
    del classic_unmeasured[0].PixelSpacing
    for images in ([unmeasured], classic_unmeasured):
        with pytest.raises(ValueError, match="PixelSpacing"):
            companion_from_datasets("t2w", images)


def test_study_without_dce_writes_no_dce_keys(tmp_path: Path) -> None:
    m = write_study(tmp_path, seed=4, matrix=(32, 64), slices=4)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert m.dce is None
    assert not {"dce", "dce_subtraction", "dce_pattern"} & set(data)
    assert not (tmp_path / "dce").exists()


def test_pipeline_finds_the_study_companions(home: Path, tmp_path: Path) -> None:
    """The DWI job reads the study's T2w and DCE series (stored subtraction first); a series
    still arriving is named, not read; other series of the study are not companions."""
    from pydicom.uid import ExplicitVRLittleEndian
    from sqlalchemy import select

    from dicom_node.db import Series, SeriesState
    from dicom_node.jobs.pipeline import _companions
    from dicom_node.receiving.ingest import Ingestor
    from dicom_node.receiving.storage import FileStore
    from her2low.core.database import make_engine, session_factory
    from her2low.core.settings import load_settings

    settings = load_settings()
    ingestor = Ingestor(
        FileStore(settings.storage_dir), session_factory(make_engine(settings.node_database_url))
    )
    out = tmp_path / "s"
    m = write_study(out, seed=4, lesion="nme", matrix=(32, 64), slices=4, dce=True)
    assert m.dce is not None and m.dce_subtraction is not None
    for entry in (m.dwi, m.t2, m.seg, m.dce, m.dce_subtraction):
        for rel in entry.files:
            ds = pydicom.dcmread(out / rel, stop_before_pixels=True)
            ingestor.ingest(
                (out / rel).read_bytes(),
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax_uid=ExplicitVRLittleEndian,
            )
    with ingestor.sessions() as s:
        for uid in (m.t2.series_instance_uid, m.dce_subtraction.series_instance_uid):
            row = s.get(Series, uid)
            assert row is not None
            row.state = SeriesState.DONE
        s.commit()
        siblings = list(s.scalars(select(Series)))
        s.expunge_all()
    found, left_out = _companions(ingestor.sessions, siblings, m.dwi.series_instance_uid)
    assert [c.kind for c in found] == [CompanionKind.DCE_SUBTRACTION, CompanionKind.T2W]
    assert found[0].volume.series_instance_uid == m.dce_subtraction.series_instance_uid
    assert left_out == [f"{m.dce.series_instance_uid}: still arriving"]
