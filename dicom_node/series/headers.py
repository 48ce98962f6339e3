"""Reading plain values out of DICOM headers the same way everywhere in the node.

Headers from the wild carry empty, absent, multi-valued or non-finite values; each reader here
turns them into one predictable Python value (``""``, ``None`` or a default) instead of raising,
so callers compare and format without guarding every attribute.
"""

from __future__ import annotations

import math
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from models.contract import ScannerInfo

__all__ = [
    "field_strength_t",
    "first_text",
    "floats",
    "number",
    "private_tag",
    "scanner_info",
    "software_versions",
    "text",
]


def text(ds: Dataset, *keywords: str) -> str:
    """The values of ``keywords`` as text, joined by a space; absent or empty values are ``""``."""
    return " ".join(str(ds.get(k, "") or "") for k in keywords)


def first_text(ds: Dataset, *keywords: str, default: str = "") -> str:
    """The first non-empty value among ``keywords`` as text (e.g. SeriesDate, then StudyDate)."""
    for keyword in keywords:
        value = ds.get(keyword, "")
        if value:
            return str(value)
    return default


def floats(value: Any, n: int) -> tuple[float, ...] | None:
    """Exactly ``n`` finite numbers (ImagePositionPatient, PixelSpacing …), else ``None``."""
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != n or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def number(value: Any, default: float) -> float:
    """One finite number (RescaleSlope, SliceThickness …), else ``default``."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def private_tag(ds: Dataset, group: int, creator: str, offset: int) -> int | None:
    """Tag of element ``offset`` in the block of private ``creator`` (PS3.5 §7.8.1), else None.

    Scans the dataset's tags directly: ``Dataset.private_block`` sorts every tag on each call,
    which dominated reading a 520-image series (about 20 private look-ups per image).
    """
    for tag in ds.keys():  # noqa: SIM118 - iterating ds would sort and convert every element
        if tag.group == group and 0x10 <= tag.element <= 0xFF:
            value = ds[tag].value
            if isinstance(value, str) and value.strip() == creator:
                return (group << 16) | (tag.element << 8) | offset
    return None


def field_strength_t(ds: Dataset) -> float | None:
    """MagneticFieldStrength (0018,0087) in tesla, else None (absent, empty, 0, implausible).

    The standard unit is tesla; some older systems wrote gauss (15000 for 1.5 T), so a value
    above 100 is read as gauss. Anything outside 0.05–12 T after that is not a clinical magnet.
    """
    value = number(ds.get("MagneticFieldStrength"), 0.0)
    if value > 100.0:
        value /= 10_000.0
    return value if 0.05 <= value <= 12.0 else None


def software_versions(ds: Dataset) -> str:
    """SoftwareVersions (0018,1020): its values, printable characters only, joined by ``\\``."""
    value = ds.get("SoftwareVersions")
    if value is None or value == "":
        return ""
    values = list(value) if isinstance(value, MultiValue) else [value]
    cleaned = ("".join(c for c in str(v) if c.isprintable()).strip() for v in values)
    return "\\".join(v for v in cleaned if v)[:128]


def scanner_info(ds: Dataset) -> ScannerInfo | None:
    """``provenance.scanner`` from one image: make, model, field strength and software.

    Only Manufacturer (0008,0070), ManufacturerModelName (0008,1090), MagneticFieldStrength
    (0018,0087) and SoftwareVersions (0018,1020) are read — what a site needs to watch drift and
    out-of-distribution cases per scanner type and software release. Nothing that names a
    particular device or place (DeviceSerialNumber, StationName, InstitutionName, its address or
    department) is read. None when the image states none of the four.
    """
    manufacturer = text(ds, "Manufacturer").strip()[:64]
    model = text(ds, "ManufacturerModelName").strip()[:64]
    strength = field_strength_t(ds)
    software = software_versions(ds)
    if not (manufacturer or model or strength is not None or software):
        return None
    return ScannerInfo(
        manufacturer=manufacturer,
        model=model,
        field_strength_t=strength,
        software_versions=software,
    )
