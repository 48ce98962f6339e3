"""Which scanner family wrote a series, from Manufacturer (0008,0070) or its private creators.

Several header conventions are family-specific (docs/vendors.md): Toshiba/Canon omit every
b-value tag on b=0 images, Canon classic exports write the b-value and gradient only into
Image Comments (0020,4000) as ``b=1500(0.445,0.000,0.895)``, UIH keeps per-slice positions in
its MR VFrame Sequence (0065,xx51). De-identification often blanks Manufacturer but keeps the
private blocks, so the private creators (PS3.5 §7.8.1) are the fallback evidence.
"""

from __future__ import annotations

import math
import re
from enum import Enum

from pydicom.datadict import add_private_dict_entries
from pydicom.dataset import Dataset

from dicom_node.series.headers import text

__all__ = [
    "UIH_PRIVATE_DICTIONARY",
    "VendorFamily",
    "canon_comment_diffusion",
    "private_creators",
    "vendor_family",
]


class VendorFamily(Enum):
    """Scanner families whose diffusion exports differ (names as dcm2niix documents them)."""

    SIEMENS = "Siemens"
    GE = "GE"
    PHILIPS = "Philips"
    CANON = "Canon/Toshiba"
    UIH = "UIH"
    BRUKER = "Bruker"
    HITACHI = "Hitachi"
    UNKNOWN = "unknown"


#: Manufacturer (0008,0070) substrings, upper case, per family.
_MANUFACTURER = (
    ("SIEMENS", VendorFamily.SIEMENS),
    ("GE ", VendorFamily.GE),
    ("GE MEDICAL", VendorFamily.GE),
    ("GEMS", VendorFamily.GE),
    ("PHILIPS", VendorFamily.PHILIPS),
    ("TOSHIBA", VendorFamily.CANON),
    ("CANON", VendorFamily.CANON),
    ("UIH", VendorFamily.UIH),
    ("UNITED IMAGING", VendorFamily.UIH),
    ("BRUKER", VendorFamily.BRUKER),
    ("HITACHI", VendorFamily.HITACHI),
)
#: Private creator prefixes, upper case, per family (used when Manufacturer is blank).
_CREATORS = (
    ("SIEMENS", VendorFamily.SIEMENS),
    ("GEMS_", VendorFamily.GE),
    ("PHILIPS", VendorFamily.PHILIPS),
    ("TOSHIBA", VendorFamily.CANON),
    ("CANON", VendorFamily.CANON),
    ("IMAGE PRIVATE HEADER", VendorFamily.UIH),
    ("BRUKER", VendorFamily.BRUKER),
    ("HITACHI", VendorFamily.HITACHI),
)

#: UIH "Image Private Header" (0065,xx..) elements the node reads, with the VRs UIH documents
#: (dcm2niix UIH/README.md). pydicom ships no UIH dictionary, so in an Implicit VR export every
#: one of them would otherwise stay undecoded bytes: no effective b, no grid size, no VFrame
#: positions. Registering them lets pydicom decode them whatever the transfer syntax.
UIH_PRIVATE_DICTIONARY: dict[int, tuple[str, str, str, str]] = {
    0x00651005: ("SH", "1", "PE Direction Displayed", ""),
    0x00651009: ("FD", "1", "BActualValue", ""),
    0x0065100A: ("FD", "1", "BUserValue", ""),
    0x00651013: ("FD", "1", "InPlaneRotAngle", ""),
    0x00651014: ("DS", "3", "SliceNormalVector", ""),
    0x00651015: ("DS", "3", "SliceCenterPosition", ""),
    0x0065102D: ("ST", "1", "SequenceDisplayName", ""),
    0x00651037: ("FD", "3", "MRDiffusionGradOrientation", ""),
    0x00651050: ("DS", "1", "MRNumberOfSliceInVolume", ""),
    0x00651051: ("SQ", "1", "MRVFrameSequence", ""),
}
add_private_dict_entries("Image Private Header", UIH_PRIVATE_DICTIONARY)

_CANON_COMMENT = re.compile(
    r"\bb\s*=\s*(\d+(?:\.\d+)?)\s*\(\s*([-+]?[\d.]+)\s*,\s*([-+]?[\d.]+)\s*,\s*([-+]?[\d.]+)\s*\)"
)


def private_creators(ds: Dataset) -> list[str]:
    """Private Creator values (gggg,0010-00FF) of the odd groups in ``ds`` (top level only)."""
    out = []
    for elem in ds:
        tag = elem.tag
        if tag.group % 2 == 1 and 0x10 <= tag.element <= 0xFF and isinstance(elem.value, str):
            out.append(elem.value.strip())
    return out


def vendor_family(ds: Dataset) -> VendorFamily:
    """The scanner family of ``ds``: Manufacturer first, then its private creators."""
    manufacturer = f"{text(ds, 'Manufacturer').strip().upper()} "
    for needle, family in _MANUFACTURER:
        if manufacturer.startswith(needle) or (len(needle) > 3 and needle in manufacturer):
            return family
    for creator in private_creators(ds):
        upper = creator.upper()
        for prefix, family in _CREATORS:
            if upper.startswith(prefix):
                return family
    return VendorFamily.UNKNOWN


def canon_comment_diffusion(
    ds: Dataset,
) -> tuple[float, tuple[float, float, float] | None] | None:
    """b-value and gradient of a Canon classic image from Image Comments (0020,4000).

    Canon classic exports write ``b=1500(0.445,0.000,0.895)`` there instead of the standard
    tags (dcm2niix Canon/README.md). The gradient is in image space, not patient space; the node
    only uses it to tell directions apart. ``None`` unless the family is Canon/Toshiba and the
    comment has that form.
    """
    comment = text(ds, "ImageComments")
    if "b" not in comment or vendor_family(ds) is not VendorFamily.CANON:
        return None
    match = _CANON_COMMENT.search(comment)
    if match is None:
        return None
    try:
        b = float(match.group(1))
        vec = (float(match.group(2)), float(match.group(3)), float(match.group(4)))
    except ValueError:
        return None
    norm = math.sqrt(sum(v * v for v in vec))
    return b, (vec if norm > 1e-6 and all(math.isfinite(v) for v in vec) else None)
