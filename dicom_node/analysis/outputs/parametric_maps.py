"""ADC, Dapp and Kapp as float Parametric Map objects on the DWI grid (PS3.3 A.75).

Values are stored as 32-bit float in their physical unit with a Real World Value Mapping (identity
slope/intercept) in UCUM mm2/s or {ratio}, so any viewer reads the numbers the features were
computed from. Windows below 1 need an explicit LINEAR_EXACT VOI LUT (notes/dicom.md). The
Modality is the source's (MR), as PS3.3 C.8.32.1 expects of a single-modality map.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np

from dicom_node.analysis.outputs.codes import QUANTITY, UNIT
from dicom_node.analysis.outputs.context import DISCLAIMER, OutputContext
from dicom_node.analysis.outputs.identification import (
    MANUFACTURER,
    MODEL_NAME,
    software_versions,
)

__all__ = ["MAP_LABELS", "build_parametric_map"]

MAP_LABELS = {"adc": "ADC", "dapp": "Dapp", "kapp": "Kapp"}
#: (window centre, window width) per map, in its unit (the preview colour ranges).
_WINDOWS = {"adc": (1.5e-3, 3.0e-3), "dapp": (1.75e-3, 3.5e-3), "kapp": (1.0, 2.0)}
_OFFSETS = {"adc": 92, "dapp": 93, "kapp": 94}


class _Mapping(hd.pm.RealWorldValueMapping):
    """A mapping whose ``repr`` is its label: highdicom formats the channel (this mapping) into
    a debug message for every frame, eagerly, and a full dataset dump costs ~5 ms each time."""

    def __repr__(self) -> str:
        return f"RealWorldValueMapping({self.LUTLabel})"

    __str__ = __repr__


def build_parametric_map(ctx: OutputContext, name: str) -> hd.pm.ParametricMap:
    """One map (``adc``, ``dapp`` or ``kapp``) as a Parametric Map in the source's study."""
    label = MAP_LABELS[name]
    values = np.nan_to_num(np.asarray(ctx.analysis.maps[name], dtype=np.float32), nan=0.0)
    lo, hi = float(values.min()), float(values.max())
    mapping = _Mapping(
        lut_label=label,
        lut_explanation=f"{label} ({UNIT[name].meaning})",
        unit=UNIT[name],
        value_range=(lo, hi if hi > lo else lo + 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=QUANTITY[name],
    )
    center, width = _WINDOWS[name]
    voi = hd.content.VOILUTTransformation(
        window_center=center,
        window_width=width,
        window_explanation=label,
        voi_lut_function="LINEAR_EXACT",
    )
    pm = hd.pm.ParametricMap(
        source_images=ctx.sources,
        pixel_array=ctx.volume(values),
        series_instance_uid=ctx.uid(name, "series"),
        series_number=ctx.series_number(_OFFSETS[name]),
        sop_instance_uid=ctx.uid(name, "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_versions(ctx.analysis.pipeline_version),
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        content_label=label.upper(),
        content_description=f"{label} map, {DISCLAIMER}"[:64],
        voi_lut_transformations=[voi],
    )
    # PS3.3 C.8.32.1: "the appropriate value for the acquisition modality, e.g., MR" (highdicom
    # writes OT, which the standard keeps for maps derived from several modalities).
    pm.Modality = str(ctx.source.get("Modality") or "OT")
    if "Laterality" not in pm:  # Type 2C for a paired body part (BREAST); the ROI's side
        pm.Laterality = ctx.laterality or None
    pm.SeriesDescription = f"HER2low {label} map ({DISCLAIMER})"[:64]
    return pm
