"""The automatic ROI as a binary SEG on the DWI grid (PS3.3 A.51), marked unconfirmed.

Only an ROI the node proposed is written: an incoming SEG is referenced by the SR, not copied.
The segment is AUTOMATIC (Segment Algorithm Type) and its label says it awaits a radiologist's
confirmation; the series description says so too.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from dicom_node.analysis.outputs.codes import TISSUE, TUMOR
from dicom_node.analysis.outputs.context import DISCLAIMER, OutputContext
from dicom_node.analysis.outputs.identification import (
    MANUFACTURER,
    MODEL_NAME,
    software_versions,
)

__all__ = ["ROI_SEGMENT_NUMBER", "build_roi_seg"]

ROI_SEGMENT_NUMBER = 1


def build_roi_seg(ctx: OutputContext) -> hd.seg.Segmentation:
    """The ROI mask as a one-segment BINARY SEG in the source's study and frame of reference."""
    version = ctx.analysis.pipeline_version
    algorithm = hd.AlgorithmIdentificationSequence(
        name="her2low automatic lesion candidate",
        family=codes.cid7162.HistogramAnalysis,
        version=version,
    )
    segment = hd.seg.SegmentDescription(
        segment_number=ROI_SEGMENT_NUMBER,
        segment_label="lesion (automatic, unconfirmed)",
        segmented_property_category=TISSUE,
        segmented_property_type=TUMOR,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=ctx.uid("tracking"),
        tracking_id="lesion 1",
    )
    mask = np.asarray(ctx.analysis.roi.mask, dtype=np.uint8)
    seg = hd.seg.Segmentation(
        source_images=ctx.sources,
        pixel_array=ctx.volume(mask),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=ctx.uid("seg", "series"),
        series_number=ctx.series_number(91),
        sop_instance_uid=ctx.uid("seg", "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_versions(version),
        device_serial_number="0",
        content_label="ROI",
        content_description=f"automatic ROI, unconfirmed; {DISCLAIMER}"[:64],
        omit_empty_frames=True,
    )
    seg.SeriesDescription = "HER2low ROI (automatic, unconfirmed)"
    return seg
