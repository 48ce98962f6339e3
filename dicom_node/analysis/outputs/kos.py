"""The key images for the tumour board as a Key Object Selection Document (PS3.3 A.35.4).

TID 2010 with the document title DCM 113005 "For Conference" (CID 7010: objects selected for a
conference, here the multidisciplinary tumour board). It flags, in the source study:

- the source DWI image(s) at the highest b-value through the slice where the ROI's
  cross-section is largest (every diffusion direction acquired there, when the series has
  several; for an enhanced multi-frame series, the frame(s) by Referenced Frame Number),
- the Measurement Report (:mod:`.sr`), and
- the ADC, Dapp and Kapp Parametric Maps at that slice (by Referenced Frame Number).

A Key Object Description says the selection comes from the her2low reference pipeline and is
not clinically validated. Like the other result objects it has its own series, UIDs derived
from the source (:meth:`~.context.OutputContext.uid`) and the node's equipment identity, so a
copy routed back to the node is recognised (:func:`.identification.is_own_object`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node.analysis.outputs.context import DISCLAIMER, OutputContext
from dicom_node.analysis.outputs.identification import (
    MANUFACTURER,
    MODEL_NAME,
    software_versions,
)
from dicom_node.series.bvalues import b_label
from dicom_node.series.frames import expand_frames
from dicom_node.series.volume import Geometry

__all__ = ["KEY_OBJECT_TITLE", "KeyImage", "build_key_objects", "key_images", "key_slice"]

#: CID 7010 Key Object Selection Document Title.
KEY_OBJECT_TITLE = hd.sr.CodedConcept("113005", "DCM", "For Conference")
#: Within this fraction of the highest b-value, a volume counts as acquired at it.
_B_TOLERANCE = 0.05
_SERIES_OFFSET = 96


@dataclass(frozen=True)
class KeyImage:
    """One flagged image: the dataset and, for a multi-frame one, its 1-based frame numbers."""

    dataset: Dataset
    frame_numbers: tuple[int, ...] = ()


def key_slice(ctx: OutputContext) -> int:
    """The slice (0-based, DWI order) where the ROI's cross-section has the most voxels."""
    mask = np.asarray(ctx.analysis.roi.mask, dtype=bool)
    if not mask.any():
        raise ValueError("the ROI is empty: no key slice")
    return int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))


def _elsewhere(ds: Dataset, geometry: Geometry, target: float, half: float) -> bool:
    """Whether a single-slice image (not enhanced, not tiled: the grid's own matrix) lies
    outside the key slice: skipping it saves reading its private headers."""
    if "PerFrameFunctionalGroupsSequence" in ds or "ImagePositionPatient" not in ds:
        return False
    if (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) != geometry.shape[1:]:
        return False
    try:
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
    except (TypeError, ValueError):
        return False
    return position.shape == (3,) and abs(float(position @ geometry.normal) - target) > half


def key_images(
    datasets: Sequence[pydicom.Dataset], k: int, *, b: float, geometry: Geometry
) -> list[KeyImage]:
    """The source images at b-value ``b`` through slice ``k`` of ``geometry`` (one per direction).

    Frames come from :func:`~dicom_node.series.frames.expand_frames`, as the volume was
    assembled: b-values in every vendor's convention, and each frame of an enhanced object and
    tile of a mosaic placed on its own. A multi-frame image holding several key frames is one
    :class:`KeyImage` with several frame numbers.
    """
    normal = geometry.normal
    target = float(np.asarray(geometry.slice_position(k)) @ normal)
    half = 0.5 * max(float(geometry.slice_spacing), 1e-3)
    candidates = [ds for ds in datasets if not _elsewhere(ds, geometry, target, half)]
    found: dict[str, tuple[Dataset, list[int]]] = {}
    for frame in expand_frames(candidates):
        fb = frame.diffusion.b
        if fb is None or abs(fb - b) > _B_TOLERANCE * max(b, 1.0):
            continue
        if abs(float(np.asarray(frame.position, dtype=float) @ normal) - target) > half:
            continue
        ds = candidates[frame.dataset_index]
        _, numbers = found.setdefault(str(ds.SOPInstanceUID), (ds, []))
        if frame.frame_index is not None and frame.frame_index + 1 not in numbers:
            numbers.append(frame.frame_index + 1)
    if not found:
        raise ValueError(f"no source image at b={b_label(b)} through slice {k + 1}")
    return [KeyImage(ds, tuple(sorted(numbers))) for ds, numbers in found.values()]


def _frame_at(image: Dataset, position: Sequence[float]) -> int | None:
    """1-based frame of a multi-frame ``image`` whose plane position is nearest ``position``."""
    frames = image.get("PerFrameFunctionalGroupsSequence")
    if not frames:
        return None
    distances = [
        float(
            np.linalg.norm(
                np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
                - np.asarray(position, float)
            )
        )
        for f in frames
    ]
    return int(np.argmin(distances)) + 1


def _frames_referenced(
    document: hd.ko.KeyObjectSelection, frames: dict[str, tuple[int, ...]]
) -> None:
    """Add Referenced Frame Number (PS3.3 C.18.4) to the IMAGE items of multi-frame images."""
    for item in document[0].ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        ref = item.ReferencedSOPSequence[0]
        numbers = frames.get(str(ref.ReferencedSOPInstanceUID))
        if numbers:
            ref.ReferencedFrameNumber = list(numbers) if len(numbers) > 1 else numbers[0]


def build_key_objects(
    ctx: OutputContext,
    datasets: Sequence[pydicom.Dataset],
    *,
    sr: Dataset,
    maps: Sequence[Dataset],
) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS flagging the key DWI image(s), the SR and the maps' frame at the key slice."""
    k = key_slice(ctx)
    b_max = float(np.max(ctx.dwi.bvals))
    images = key_images(datasets, k, b=b_max, geometry=ctx.dwi.geometry)
    position = ctx.dwi.geometry.slice_position(k)
    frames = {str(i.dataset.SOPInstanceUID): i.frame_numbers for i in images if i.frame_numbers}
    for pm in maps:
        number = _frame_at(pm, position)
        if number is not None:
            frames[str(pm.SOPInstanceUID)] = (number,)
    b = b_label(b_max)
    description = (
        f"Key images from the her2low reference pipeline ({DISCLAIMER}): "
        f"DWI b={b} s/mm2 through the ROI's largest cross-section (slice {k + 1} of "
        f"{ctx.dwi.geometry.shape[0]}), the measurement report and the "
        f"{', '.join(str(m.get('ContentLabel', '')) for m in maps)} maps there."
    )
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.uid("device"),
            name=MODEL_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    referenced = [*(i.dataset for i in images), sr, *maps]
    content = hd.ko.KeyObjectSelection(
        document_title=KEY_OBJECT_TITLE,
        referenced_objects=referenced,
        observer_device_context=observer,
        description=description,
    )
    _frames_referenced(content, frames)
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=ctx.uid("ko", "series"),
        series_number=ctx.series_number(_SERIES_OFFSET),
        sop_instance_uid=ctx.uid("ko", "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_versions(ctx.analysis.pipeline_version),
        device_serial_number="0",
        series_description=f"HER2low key images ({DISCLAIMER})"[:64],
    )
    return kos
