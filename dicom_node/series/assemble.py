"""From the DICOM images of one diffusion series to a :class:`~dicom_node.series.volume.DwiVolume`.

:func:`check_headers` first refuses headers pydicom cannot convert; the header-only
:func:`~dicom_node.series.layout.plan_layout` (over the frames of :mod:`.frames`) says where
every image belongs. :func:`assemble_dwi` then decodes pixels (pydicom + pylibjpeg, so
compressed transfer syntaxes work), applies the Modality LUT (Rescale Slope/Intercept, PS3.3
C.11.1) and forms the trace per b by geometric mean over directions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicom_node.series.bvalues import (
    B0_THRESHOLD,
    GROUP_REL_TOL,
    SEARCHED_CONVENTIONS,
    DirectionalityValues,
    group_bvalues,
)
from dicom_node.series.frames import FrameRef
from dicom_node.series.headers import number
from dicom_node.series.layout import Problem, ProblemKind, VolumePlan, direction_key, plan_layout
from dicom_node.series.volume import DwiVolume, Geometry

__all__ = ["AssemblyError", "PixelCache", "assemble_dwi", "check_headers"]


class AssemblyError(ValueError):
    """The datasets do not form one usable diffusion volume; ``problems`` says why."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    @property
    def kinds(self) -> set[ProblemKind]:
        return {p.kind for p in self.problems}


class PixelCache:
    """Decode each dataset's pixels once (pydicom handles compressed transfer syntaxes), and cut
    out one placed frame (:class:`FrameRef`) with its rescale applied."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        self._datasets = datasets
        self._arrays: dict[int, NDArray[Any]] = {}

    def frame(self, f: FrameRef) -> NDArray[np.float64]:
        if f.dataset_index not in self._arrays:
            ds = self._datasets[f.dataset_index]
            if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
                raise AssemblyError(
                    [Problem(ProblemKind.UNSUPPORTED_PIXELS, "colour images are not read")]
                )
            try:
                self._arrays[f.dataset_index] = ds.pixel_array
            except Exception as exc:
                raise AssemblyError(
                    [
                        Problem(
                            ProblemKind.UNSUPPORTED_PIXELS,
                            f"cannot decode pixel data of {ds.get('SOPInstanceUID', '?')}: {exc}",
                        )
                    ]
                ) from exc
        arr = self._arrays[f.dataset_index]
        if f.frame_index is not None:
            img = arr[f.frame_index] if arr.ndim == 3 else arr
        elif f.tile_index is not None:
            r, c = divmod(f.tile_index, f.tiles_per_row)
            img = arr[r * f.rows : (r + 1) * f.rows, c * f.columns : (c + 1) * f.columns]
        else:
            img = arr
        if img.shape != (f.rows, f.columns):
            raise AssemblyError(
                [
                    Problem(
                        ProblemKind.UNSUPPORTED_PIXELS,
                        f"pixel matrix {img.shape} does not match "
                        f"Rows/Columns {(f.rows, f.columns)}",
                    )
                ]
            )
        slope, intercept = f.rescale
        return img.astype(np.float64) * slope + intercept


def _geometric_mean(stack: NDArray[np.float64]) -> NDArray[np.float64]:
    """Geometric mean over axis 0; non-positive signal gives 0 (log of 0 is -inf)."""
    with np.errstate(divide="ignore"):
        logs = np.log(np.clip(stack, 0.0, None))
    out: NDArray[np.float64] = np.exp(np.mean(logs, axis=0))
    return out


def _combine_shell(
    vols: list[tuple[VolumePlan, NDArray[np.float64]]], notes: list[str], b: float
) -> NDArray[np.float64]:
    directional = [
        (v, a)
        for v, a in vols
        if v.direction is not None and v.directionality is not DirectionalityValues.ISOTROPIC
    ]
    if directional and len(directional) < len(vols) and b >= B0_THRESHOLD:
        notes.append(
            f"b={b:g}: scanner trace image(s) ignored, trace recomputed from "
            f"{len(directional)} directional volume(s)"
        )
        vols = directional
    by_dir: dict[tuple[float, ...] | None, list[NDArray[np.float64]]] = defaultdict(list)
    for v, a in vols:
        by_dir[direction_key(v.direction)].append(a)
    # Repeats of one direction are averaged; distinct directions form the trace.
    per_dir = [np.mean(arrs, axis=0) for arrs in by_dir.values()]
    if len(per_dir) > 1 and b >= B0_THRESHOLD:
        notes.append(
            f"b={b:g}: {len(per_dir)} directions combined into the trace by geometric mean"
        )
        return _geometric_mean(np.stack(per_dir))
    if len(vols) > 1:
        notes.append(f"b={b:g}: {len(vols)} volumes averaged")
    return np.asarray(np.mean(np.stack(per_dir), axis=0), dtype=np.float64)


_SHAPE_KEYWORDS = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "SamplesPerPixel")


def check_headers(datasets: Sequence[Dataset]) -> None:
    """Raise :class:`AssemblyError` naming every instance whose header pydicom cannot convert
    (unknown VR, wrong value length) or whose image shape attributes are not single integers;
    later steps may then read any attribute without guarding it."""
    problems = []
    for index, ds in enumerate(datasets):
        try:
            for _ in ds.iterall():  # converts every raw element, nested ones too
                pass
            for keyword in _SHAPE_KEYWORDS:
                value = ds.get(keyword)
                if value is not None:
                    int(value)
        except Exception as exc:  # pydicom raises many types on corrupt input
            problems.append(
                Problem(
                    ProblemKind.UNREADABLE_HEADER,
                    f"instance {index}: {type(exc).__name__}: {exc}"[:300],
                )
            )
    if problems:
        raise AssemblyError(problems)


def assemble_dwi(
    datasets: Sequence[Dataset],
    *,
    b0_threshold: float = B0_THRESHOLD,
    rel_tol: float = GROUP_REL_TOL,
) -> DwiVolume:
    """Assemble one diffusion series into a trace-weighted ``(slice, row, col, b)`` volume.

    Raises :class:`AssemblyError` naming every problem found (missing b-values, several series
    or stacks, inconsistent geometry, missing slices, undecodable pixels).
    """
    if not datasets:
        raise AssemblyError([Problem(ProblemKind.NO_IMAGES, "no datasets given")])
    check_headers(datasets)
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise AssemblyError(
            [Problem(ProblemKind.MIXED_SERIES, f"{len(uids)} SeriesInstanceUIDs in the input")]
        )
    layout = plan_layout(datasets, b0_threshold=b0_threshold, rel_tol=rel_tol)
    problems = list(layout.problems)
    if layout.frames_without_b:
        problems.insert(
            0,
            Problem(
                ProblemKind.MISSING_B_VALUES,
                f"{layout.frames_without_b} of {len(layout.frames)} images carry no b-value in any "
                f"known convention ({SEARCHED_CONVENTIONS})",
            ),
        )
    if problems:
        raise AssemblyError(problems)
    if not layout.volumes:
        raise AssemblyError([Problem(ProblemKind.NO_IMAGES, "no complete volume found")])

    pixels = PixelCache(datasets)
    frames = layout.frames
    loaded = [(v, np.stack([pixels.frame(frames[i]) for i in v.frames])) for v in layout.volumes]
    vol_b = [v.b if v.b is not None else 0.0 for v in layout.volumes]
    notes: list[str] = []
    trace: list[NDArray[np.float64]] = []
    bvals: list[float] = []
    for members in group_bvalues(vol_b, rel_tol=rel_tol, b0_threshold=b0_threshold):
        exact = sorted({vol_b[i] for i in members})
        b = exact[0] if len(exact) == 1 else float(np.mean([vol_b[i] for i in members]))
        if len(exact) > 1:
            notes.append(
                f"b-values {[format(x, 'g') for x in exact]} grouped as one shell (mean {b:g})"
            )
        trace.append(_combine_shell([loaded[i] for i in members], notes, b))
        bvals.append(b)

    first = frames[layout.volumes[0].frames[0]]
    lowest = min(range(len(layout.volumes)), key=lambda i: (vol_b[i], layout.volumes[i].order))
    ds0 = datasets[first.dataset_index]
    positions = layout.slice_positions
    if len(positions) > 1:
        spacing = float(np.mean(np.diff(positions)))
    else:
        spacing = number(ds0.get("SpacingBetweenSlices"), 0.0) or number(
            ds0.get("SliceThickness"), 1.0
        )
    geometry = Geometry(
        shape=(len(positions), first.rows, first.columns),
        origin=first.position,
        row_dir=(first.orientation[0], first.orientation[1], first.orientation[2]),
        col_dir=(first.orientation[3], first.orientation[4], first.orientation[5]),
        row_spacing=first.pixel_spacing[0],
        col_spacing=first.pixel_spacing[1],
        slice_spacing=spacing,
        frame_of_reference_uid=str(ds0.get("FrameOfReferenceUID", "")),
    )
    if len(bvals) < 2:
        notes.append("only one b-value: the series alone cannot be fitted")
    return DwiVolume(
        data=np.stack(trace, axis=-1).astype(np.float32),
        bvals=np.asarray(bvals, dtype=np.float64),
        geometry=geometry,
        study_instance_uid=str(ds0.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds0.get("SeriesInstanceUID", "")),
        slice_sop_instance_uids=[frames[i].sop_instance_uid for i in layout.volumes[lowest].frames],
        vendor=str(ds0.get("Manufacturer", "")),
        notes=notes,
    )
