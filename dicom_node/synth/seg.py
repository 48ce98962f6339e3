"""DICOM Segmentation (PS3.3 A.51) of the phantom tumour, as a viewer would send the node.

Binary SEG referencing the b = 0 images of the DWI series, one segment "Tumour" coded SCT
108369006 Neoplasm in category SCT 49755003 Morphologically abnormal structure (CID 7150/7151),
anatomic region SCT 76752008 Breast. The ROI comes from the phantom, so the segment declares a
SEMIAUTOMATIC algorithm named after the generator (Segmentation Image Module, PS3.3 C.8.20.2).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, DT, TM

__all__ = ["ALGORITHM_NAME", "SEGMENT_LABEL", "tumour_segmentation"]

SEGMENT_LABEL = "Tumour"
ALGORITHM_NAME = "her2low-synth phantom ground truth"


def tumour_segmentation(
    source_images: Sequence[Dataset],
    mask: NDArray[np.bool_],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    date: str,
    time: str,
    software_version: str,
) -> hd.seg.Segmentation:
    """Binary SEG of ``mask`` (``(slices, rows, cols)``, slice order = ``source_images`` order).

    Dates, times (including the Contributing Equipment's) and the Dimension Organization UID
    are fixed from the inputs instead of the
    clock or a random UID, so the same study writes the same SEG.
    """
    if mask.shape[0] != len(source_images):
        raise ValueError("mask must have one slice per source image")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME,
            family=codes.cid7162.ManualProcessing,
            version=software_version,
            source="her2low-cds",
        ),
        anatomic_regions=[codes.SCT.Breast],
    )
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=np.asarray(mask, dtype=bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer="her2low-cds",
        manufacturer_model_name="her2low-synth",
        software_versions=software_version,
        device_serial_number="SYNTH-0001",
        content_label="TUMOUR",
        content_description="Synthetic ground-truth tumour ROI",
        content_creator_name="SYNTHETIC^GROUNDTRUTH",
        series_description="Tumour ROI (synthetic ground truth)",
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
    )
    seg.InstanceCreationDate = DA(date)
    seg.InstanceCreationTime = TM(time)
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(date + time)
    dim_uid = f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, sop_instance_uid + '.dim').int}"
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in seg.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = dim_uid
    return seg
