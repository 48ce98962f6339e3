"""The four real vendor series against dcm2niix's b-values and the manifest.

Data: ../shared/data/dwi (README.md, manifest.json). Skipped with a visible reason when absent.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.series.assemble import assemble_dwi
from dicom_node.series.dicomio import read_datasets
from dicom_node.series.inspection import inspect_series
from dicom_node.series.layout import plan_layout
from dicom_node.series.roles import SeriesRole, classify_series

DWI = Path(__file__).resolve().parents[2] / "shared" / "data" / "dwi"
NAMES = [
    "ge_signa_classic",
    "philips_ingenia_classic",
    "siemens_xa30_enhanced",
    "siemens_xa30_classic_trace",
]
ROLES = {
    "ge_signa_classic": SeriesRole.DWI_DIRECTIONAL,
    "philips_ingenia_classic": SeriesRole.DWI_DIRECTIONAL,
    "siemens_xa30_enhanced": SeriesRole.DWI_DIRECTIONAL,
    "siemens_xa30_classic_trace": SeriesRole.DWI_TRACE,  # derived TRACEW, still fit input
}

pytestmark = [
    pytest.mark.needs_shared,
    pytest.mark.skipif(
        not (DWI / "manifest.json").is_file(), reason=f"shared vendor data not found at {DWI}"
    ),
]


@cache
def manifest() -> dict[str, dict[str, Any]]:
    entries = json.loads((DWI / "manifest.json").read_text())["series"]
    return {e["name"]: e for e in entries}


@cache
def load(name: str, pixels: bool = False) -> tuple[Dataset, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vendor VR length violations
        result = read_datasets([DWI / name / "dicom"], stop_before_pixels=not pixels)
    assert not result.problems, result.problems
    return tuple(result.datasets)


def ref_bvals(name: str) -> list[float]:
    (path,) = (DWI / name / "ref").glob("*.bval")
    return [float(x) for x in path.read_text().split()]


@pytest.mark.parametrize("name", NAMES)
def test_role_and_not_breast(name: str) -> None:
    c = classify_series(load(name))
    assert c.role is ROLES[name], c.reasons
    assert c.is_breast is False and any("BRAIN" in r for r in c.reasons)


@pytest.mark.parametrize("name", NAMES)
def test_bvalues_per_volume_match_dcm2niix(name: str) -> None:
    layout = plan_layout(load(name))
    assert layout.problems == [] and layout.frames_without_b == 0
    assert all(v.b is not None for v in layout.volumes)
    ours = [float(v.b or 0.0) for v in layout.volumes]
    np.testing.assert_allclose(ours, ref_bvals(name), rtol=1e-4, atol=0)
    distinct = sorted(set(ours))
    np.testing.assert_allclose(distinct, sorted(set(ref_bvals(name))), rtol=1e-4, atol=0)
    np.testing.assert_allclose(distinct, manifest()[name]["ref_distinct_b"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_inspect_entry_matches_manifest(name: str) -> None:
    entry = inspect_series(load(name))
    m = manifest()[name]
    assert entry["storage"] == m["storage_style"]
    assert entry["volumes_per_b"] == {b: v["volumes"] for b, v in m["ref_per_b"].items()}
    assert [entry["rows"], entry["columns"]] == m["dicom_rows_cols"][0]
    assert entry["problems"] == []
    directions: dict[float, set[Any]] = defaultdict(set)
    for vol in plan_layout(load(name)).volumes:
        assert vol.b is not None
        directions[vol.b].add(
            None if vol.direction is None else tuple(round(x, 3) for x in vol.direction)
        )
    assert {format(b, "g"): len(d) for b, d in directions.items()} == {
        b: v["unique_directions"] for b, v in m["ref_per_b"].items()
    }


@pytest.mark.parametrize("name", NAMES)
def test_slices_ordered_by_geometry(name: str) -> None:
    datasets = load(name)
    layout = plan_layout(datasets)
    positions = np.asarray(layout.slice_positions)
    assert np.all(np.diff(positions) > 0)
    iop = np.asarray(layout.frames[0].orientation)
    normal = np.cross(iop[:3], iop[3:])
    for vol in layout.volumes:
        along = [float(np.dot(layout.frames[i].position, normal)) for i in vol.frames]
        np.testing.assert_allclose(along, positions, atol=0.06)
    if name == "philips_ingenia_classic":
        # Instance numbers are not in volume order: sorting by them would interleave volumes.
        first = sorted(datasets, key=lambda ds: int(ds.InstanceNumber))[:17]
        assert len({float(ds.DiffusionBValue) for ds in first}) > 2


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n == "philips_ingenia_classic" else n
        for n in NAMES
    ],
)
def test_assemble_real_series(name: str) -> None:
    datasets = load(name, pixels=True)
    dwi = assemble_dwi(datasets)
    layout = plan_layout(datasets)
    n_shells = (1 if any(b < 5.0 for b in ref_bvals(name)) else 0) + len(
        {b for b in ref_bvals(name) if b >= 5.0}
    )
    assert dwi.data.shape == (len(layout.slice_positions), layout.rows, layout.columns, n_shells)
    assert dwi.data.dtype == np.float32 and np.all(np.isfinite(dwi.data))
    assert float(dwi.data.mean()) > 0
    assert np.all(np.diff(dwi.bvals) > 0)
    assert dwi.geometry.slice_spacing == pytest.approx(
        float(np.mean(np.diff(layout.slice_positions)))
    )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    if manifest()[name]["storage_style"] == "classic":
        for k, uid in enumerate(dwi.slice_sop_instance_uids):
            ipp = [float(x) for x in by_uid[uid].ImagePositionPatient]
            np.testing.assert_allclose(ipp, dwi.geometry.slice_position(k), atol=0.05)
    if name == "ge_signa_classic":
        # Upstream trimmed this sample to identical pixels in every volume, so the geometric
        # mean over the six directions must reproduce the b=0 image exactly.
        np.testing.assert_allclose(dwi.data[..., 1], dwi.data[..., 0], rtol=1e-6)
    elif n_shells > 1:
        # Diffusion weighting attenuates the signal: mean trace at high b below b≈0.
        assert dwi.data[..., -1].mean() < dwi.data[..., 0].mean()
