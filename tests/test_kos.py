"""The Key Object Selection written with the result objects: the tumour board's key images.

dciodvfy finds no error; highdicom and pydicom read it back; it references, in the source study,
the highest-b DWI image(s) through the ROI's largest cross-section, the SR and the maps' frame
at that slice; and it is recognised as the node's own object.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.analysis.outputs import ResultObjects, build_outputs, is_own_object
from dicom_node.analysis.outputs.context import OutputContext, source_images
from dicom_node.analysis.outputs.kos import KEY_OBJECT_TITLE, key_images, key_slice
from dicom_node.analysis.series_analysis import Analysis, analyse
from dicom_node.series.assemble import assemble_dwi
from dicom_node.series.bvalues import diffusion_info
from dicom_node.series.volume import DwiVolume
from dicom_node.synth import write_study
from tests.conftest import require_tool
from tests.dicom_builders import (
    Grid,
    classic_series,
    enhanced_series,
    siemens_mosaic_series,
    volumes,
)

pytestmark = pytest.mark.slow

KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass
class Case:
    datasets: list[pydicom.Dataset]
    dwi: DwiVolume
    analysis: Analysis
    objects: ResultObjects
    path: Path


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("study")
    manifest = write_study(folder, seed=5)
    datasets: list[pydicom.Dataset] = [pydicom.dcmread(folder / f) for f in manifest.dwi.files]
    dwi = assemble_dwi(datasets)
    analysis = analyse(dwi)
    objects = build_outputs(analysis, dwi, datasets)
    paths = objects.write(tmp_path_factory.mktemp("out"))
    (path,) = [p for p in paths if p.name.startswith("KO_")]
    return Case(datasets, dwi, analysis, objects, path)


def _plane_distance(position: object, expected: tuple[float, float, float]) -> float:
    return float(np.linalg.norm(np.asarray(position, float) - np.asarray(expected)))


def test_kos_is_written_last_and_dciodvfy_finds_no_error(case: Case) -> None:
    assert case.objects.kos is not None and case.objects.problems == []
    assert case.objects.datasets[-1] is case.objects.kos
    ds = pydicom.dcmread(case.path)
    assert ds.SOPClassUID == KOS_STORAGE and ds.Modality == "KO"
    result = subprocess.run(
        [require_tool("dciodvfy"), str(case.path)], capture_output=True, text=True, timeout=60
    )
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert errors == []


def test_title_description_and_identity(case: Case) -> None:
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(case.path))
    root = kos.content[0]
    assert root.ConceptNameCodeSequence[0].CodeValue == KEY_OBJECT_TITLE.value == "113005"
    assert root.ConceptNameCodeSequence[0].CodingSchemeDesignator == "DCM"
    (text,) = [i for i in root.ContentSequence if i.ValueType == "TEXT" and "113012" in str(i)]
    assert "her2low reference pipeline" in text.TextValue
    assert "not clinically validated" in text.TextValue
    src = case.datasets[0]
    assert kos.StudyInstanceUID == src.StudyInstanceUID and kos.PatientID == src.PatientID
    own_series = {str(d.SeriesInstanceUID) for d in case.objects.datasets}
    assert len(own_series) == len(case.objects.datasets)  # its own series, like every object
    assert kos.SeriesInstanceUID != src.SeriesInstanceUID and kos.SeriesDescription
    assert is_own_object(kos) and is_own_object(pydicom.dcmread(case.path))
    (device,) = kos.content.get_observer_contexts()  # the device that selected the images
    assert device.observer_type.value == "121007"


def test_references_the_key_images_the_sr_and_the_maps_frame(case: Case) -> None:
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(case.path))
    items = [i for i in kos.content[0].ContentSequence if i.ValueType in ("IMAGE", "COMPOSITE")]
    refs = {
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID): i.ReferencedSOPSequence[0]
        for i in items
    }
    # every reference resolves to this study, through the evidence sequence
    for uid in refs:
        assert kos.resolve_reference(uid)[0] == case.datasets[0].StudyInstanceUID

    # the slice with the ROI's largest cross-section, worked out here independently
    mask = case.analysis.roi.mask
    k = int(np.argmax([mask[i].sum() for i in range(mask.shape[0])]))
    assert mask[k].sum() > 0
    ctx = OutputContext(case.analysis, case.dwi, source_images(case.dwi, case.datasets))
    assert key_slice(ctx) == k
    position = case.dwi.geometry.slice_position(k)
    b_max = float(case.dwi.bvals.max())
    by_uid = {str(ds.SOPInstanceUID): ds for ds in case.datasets}
    expected_images = {
        uid
        for uid, ds in by_uid.items()
        if abs((diffusion_info(ds).b or 0.0) - b_max) < 1.0
        and _plane_distance(ds.ImagePositionPatient, position) < 0.5
    }
    assert expected_images  # the synthetic study stores one trace image per slice and b
    source_refs = {uid for uid in refs if uid in by_uid}
    assert source_refs == expected_images

    assert str(case.objects.sr.SOPInstanceUID) in refs
    assert refs[str(case.objects.sr.SOPInstanceUID)].ReferencedSOPClassUID == (
        case.objects.sr.SOPClassUID
    )
    for pm in case.objects.maps.values():
        ref = refs[str(pm.SOPInstanceUID)]
        frame = int(ref.ReferencedFrameNumber)
        plane = pm.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0]
        assert _plane_distance(plane.ImagePositionPatient, position) < 0.01
    assert len(refs) == len(expected_images) + 1 + len(case.objects.maps)


def test_uids_are_deterministic(case: Case) -> None:
    again = build_outputs(case.analysis, case.dwi, case.datasets)
    assert again.kos is not None and case.objects.kos is not None
    assert again.kos.SOPInstanceUID == case.objects.kos.SOPInstanceUID
    assert again.kos.SeriesInstanceUID == case.objects.kos.SeriesInstanceUID


GRID = Grid(rows=4, cols=6, n_slices=3)
DIRECTIONS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]


def test_every_direction_at_the_highest_b_is_a_key_image() -> None:
    vols = volumes(GRID, [(0.0, [None]), (800.0, DIRECTIONS)])
    datasets = classic_series(GRID, vols)
    geometry = assemble_dwi(datasets).geometry
    images = key_images(datasets, 1, b=800.0, geometry=geometry)
    assert len(images) == 3 and all(i.frame_numbers == () for i in images)
    for image in images:
        assert diffusion_info(image.dataset).b == 800.0
        assert _plane_distance(image.dataset.ImagePositionPatient, GRID.position(1)) < 1e-3
    directions = {diffusion_info(i.dataset).direction for i in images}
    assert len(directions) == 3


def test_an_enhanced_series_is_referenced_by_frame() -> None:
    vols = volumes(GRID, [(0.0, [None]), (800.0, DIRECTIONS)])
    ds = enhanced_series(GRID, vols)
    geometry = assemble_dwi([ds]).geometry
    (image,) = key_images([ds], 2, b=800.0, geometry=geometry)
    assert len(image.frame_numbers) == 3
    for number in image.frame_numbers:
        frame = ds.PerFrameFunctionalGroupsSequence[number - 1]
        assert frame.MRDiffusionSequence[0].DiffusionBValue == 800.0
        plane = frame.PlanePositionSequence[0]
        assert _plane_distance(plane.ImagePositionPatient, GRID.position(2)) < 1e-3
    with pytest.raises(ValueError, match="no source image"):
        key_images([ds], 2, b=1500.0, geometry=geometry)


def test_a_mosaic_is_one_key_image_per_direction() -> None:
    vols = volumes(GRID, [(0.0, [None]), (800.0, DIRECTIONS)])
    datasets = siemens_mosaic_series(GRID, vols)
    geometry = assemble_dwi(datasets).geometry
    images = key_images(datasets, 1, b=800.0, geometry=geometry)
    assert len(images) == 3 and all(i.frame_numbers == () for i in images)
    assert {diffusion_info(i.dataset).b for i in images} == {800.0}
