"""What every result object is built from: the analysis, its DWI grid and the source images."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray

from dicom_node.analysis.outputs.identification import derived_uid
from dicom_node.analysis.series_analysis import Analysis
from dicom_node.series.volume import DwiVolume

__all__ = ["OutputContext", "memoise_iod_lookups", "source_images"]

#: Shown in every object's descriptions (and as a TEXT item of the SR).
DISCLAIMER = "reference model, not clinically validated"


def memoise_iod_lookups() -> None:
    """Memoise highdicom's IOD-table lookup (idempotent).

    highdicom asks "is this attribute in this IOD?" for every source image of every object it
    builds (about 200 lookups of ~1.5 ms for one series: a third of the build time). The answer
    depends only on the arguments, so it is cached per process. If highdicom changes the
    private function, nothing is patched and objects are built as before, only slower.
    """
    from highdicom import _standard_utils as su

    original = getattr(su, "is_attribute_in_iod", None)
    if original is None or hasattr(original, "cache_info"):
        return

    @functools.lru_cache(maxsize=4096)
    def cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return bool(original(attribute, sop_class_uid, list(exclude) if exclude else None))

    def lookup(
        attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
    ) -> bool:
        exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
        return cached(attribute, str(sop_class_uid), exclude)

    lookup.cache_info = cached.cache_info  # type: ignore[attr-defined]
    su.is_attribute_in_iod = lookup


def source_images(dwi: DwiVolume, datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The source image of each DWI slice (lowest b), in slice order; one per distinct UID."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    out: list[pydicom.Dataset] = []
    seen: set[str] = set()
    for uid in dwi.slice_sop_instance_uids:
        if uid in by_uid and uid not in seen:
            out.append(by_uid[uid])
            seen.add(uid)
    if not out:
        raise ValueError("none of the DWI's slice source images is among the datasets")
    return out


@dataclass(frozen=True)
class OutputContext:
    """The inputs of one set of result objects, and the UIDs derived from them."""

    analysis: Analysis
    dwi: DwiVolume
    sources: list[pydicom.Dataset]
    #: The incoming SEG the ROI was read from (referenced by the SR, never copied).
    roi_seg: pydicom.Dataset | None = None

    @property
    def source(self) -> pydicom.Dataset:
        return self.sources[0]

    @property
    def roi_key(self) -> str:
        """What the ROI came from: part of every UID so that a new ROI makes new objects."""
        if self.roi_seg is not None:
            return f"seg:{self.roi_seg.SOPInstanceUID}:{self.analysis.roi.segment_number}"
        return "auto"

    @property
    def laterality(self) -> str:
        """``L``, ``R`` or ``""``: the ROI's side (str or enum in the analysis)."""
        side = self.analysis.laterality
        return str(getattr(side, "value", side) or "")

    def uid(self, *parts: str) -> str:
        return derived_uid(
            self.dwi.series_instance_uid, self.analysis.pipeline_version, self.roi_key, *parts
        )

    def series_number(self, offset: int) -> int:
        """Source Series Number × 100 + ``offset`` (stays within IS's 2³¹ − 1)."""
        base = int(self.source.get("SeriesNumber", 0) or 0)
        return (base * 100 + offset) % 2_147_483_647 or offset

    def volume(self, array: NDArray[np.generic]) -> hd.Volume:
        """``array`` (slices, rows, columns) on the DWI grid as a highdicom patient volume."""
        g = self.dwi.geometry
        return hd.Volume(
            array,
            affine=g.affine,
            coordinate_system="PATIENT",
            frame_of_reference_uid=g.frame_of_reference_uid or None,
        )
