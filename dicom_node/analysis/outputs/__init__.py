"""Results as standard DICOM objects (IHE AI Results style), written with highdicom.

For one analysed DWI series: a TID 1500 Measurement Report (:mod:`.sr`), the automatic ROI as a
SEG (:mod:`.seg`, only when the node proposed the ROI), float Parametric Maps of ADC, Dapp
and Kapp (:mod:`.parametric_maps`) and a Key Object Selection flagging the key images for the
tumour board (:mod:`.kos`), all in the source's patient, study and frame of reference, each in a
new series, with UIDs derived from the source (:mod:`.identification`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_node.analysis.features import MAPS
from dicom_node.analysis.outputs.context import OutputContext, memoise_iod_lookups, source_images
from dicom_node.analysis.outputs.identification import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    is_own_object,
)
from dicom_node.analysis.outputs.kos import build_key_objects
from dicom_node.analysis.outputs.parametric_maps import build_parametric_map
from dicom_node.analysis.outputs.seg import ROI_SEGMENT_NUMBER, build_roi_seg
from dicom_node.analysis.outputs.sr import Likelihood, build_measurement_report
from dicom_node.analysis.roi import RoiSource
from dicom_node.analysis.series_analysis import Analysis
from dicom_node.series.volume import DwiVolume
from her2low.core.private_files import FILE_MODE, ensure_private_dir

__all__ = [
    "Likelihood",
    "ResultObjects",
    "build_outputs",
    "is_own_object",
    "write_outputs",
]


@dataclass
class ResultObjects:
    """The objects of one analysed series: SR first, then the SEG (if written), the maps and
    the Key Object Selection (if it could be made)."""

    sr: Dataset
    maps: dict[str, Dataset]
    seg: Dataset | None = None
    problems: list[str] = field(default_factory=list)
    kos: Dataset | None = None

    @property
    def datasets(self) -> list[Dataset]:
        optional_seg = [self.seg] if self.seg is not None else []
        optional_kos = [self.kos] if self.kos is not None else []
        return [self.sr, *optional_seg, *self.maps.values(), *optional_kos]

    def write(self, folder: Path) -> list[Path]:
        """Write every object as ``<Modality>_<SOPInstanceUID>.dcm`` (atomic rename each)."""
        ensure_private_dir(folder)
        paths = []
        for ds in self.datasets:
            ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
            ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
            path = folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
            _save_replacing(ds, path)
            paths.append(path)
        return paths


def _save_replacing(ds: Dataset, path: Path) -> None:
    """Save ``ds`` to a temporary file of its own beside ``path``, then rename it onto ``path``.

    Two workers writing the same object (an SR revision has one SOPInstanceUID) each rename
    their own complete file, never the other's half-written one; readers see the old file or a
    whole new one. The temporary file is private from its creation (patient data) and is
    removed if the save fails. Its name, ``.<name>.<random>.tmp``, is the store's pattern for
    unfinished files.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)  # 0600 from mkstemp; the group reads results too
            ds.save_as(fh, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def _roi_seg(analysis: Analysis, segs: Sequence[Dataset]) -> Dataset | None:
    """The incoming SEG the ROI came from (same series UID), if any."""
    if analysis.roi.source is not RoiSource.SEG:
        return None
    for ds in segs:
        if str(ds.get("SeriesInstanceUID", "")) == analysis.roi.seg_series_uid:
            return ds
    return None


def build_outputs(
    analysis: Analysis,
    dwi: DwiVolume,
    datasets: Sequence[pydicom.Dataset],
    *,
    segs: Sequence[pydicom.Dataset] = (),
    likelihood: Likelihood | None = None,
) -> ResultObjects:
    """SR, SEG (automatic ROI only), the three Parametric Maps and the KOS of one series.

    ``datasets`` are the DWI series' instances (the source images are picked from them);
    ``segs`` the SEGs the analysis was given, so an incoming SEG is referenced rather than
    re-written.
    """
    memoise_iod_lookups()
    ctx = OutputContext(
        analysis=analysis,
        dwi=dwi,
        sources=source_images(dwi, datasets),
        roi_seg=_roi_seg(analysis, segs),
    )
    maps: dict[str, Dataset] = {name: build_parametric_map(ctx, name) for name in MAPS}
    problems: list[str] = []
    own_seg: Dataset | None = None
    if ctx.roi_seg is not None:
        seg, number = ctx.roi_seg, int(analysis.roi.segment_number or 1)
    else:
        if analysis.roi.source is RoiSource.SEG:
            problems.append("the ROI's SEG was not among the datasets: an automatic SEG is written")
        own_seg = build_roi_seg(ctx)
        seg, number = own_seg, ROI_SEGMENT_NUMBER
    sr = build_measurement_report(
        ctx,
        seg=seg,
        segment_number=number,
        maps=list(maps.values()),
        likelihood=likelihood,
    )
    kos: Dataset | None = None
    try:
        kos = build_key_objects(ctx, datasets, sr=sr, maps=list(maps.values()))
    except ValueError as exc:  # no key slice or image: the other objects still stand
        problems.append(f"no Key Object Selection: {exc}")
    return ResultObjects(sr=sr, maps=maps, seg=own_seg, problems=problems, kos=kos)


def write_outputs(
    analysis: Analysis,
    dwi: DwiVolume,
    datasets: Sequence[pydicom.Dataset],
    folder: Path,
    *,
    segs: Sequence[pydicom.Dataset] = (),
) -> list[Path]:
    """:func:`build_outputs` and write them to ``folder``; returns the paths (SR first)."""
    return build_outputs(analysis, dwi, datasets, segs=segs).write(folder)
