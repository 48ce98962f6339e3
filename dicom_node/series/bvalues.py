"""Diffusion b-values and gradient directions from every header convention we know.

notes/dicom.md lists where scanners put b: the standard Diffusion b-value (0018,9087) (PS3.3
C.8.13.5.9 MR Diffusion Macro, per frame in enhanced objects), Siemens (0019,xx0C) and the CSA
header, GE (0043,xx39) first value (with a +n·10⁹ offset on older software), Philips (2001,xx03),
UIH (0065,xx09) (effective b), Canon classic Image Comments ``b=1500(x,y,z)`` and the standard
b-matrix (0018,9602-9607) of Directionality BMATRIX (Bruker). Toshiba/Canon omit the b tag on
b=0 images: with an MR Diffusion Sequence that is decided here per image, without one it is a
series-level rule (:func:`dicom_node.series.frames.expand_frames`). Private tags are looked up through their private creator
(PS3.5 §7.8.1), never by a fixed element number. Exact header values are kept; grouping of
nearly equal b (relative tolerance) and the b≈0 threshold are separate, explicit steps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from dicom_node.series.csa import csa_float, csa_floats
from dicom_node.series.headers import floats, private_tag, text
from dicom_node.series.vendors import canon_comment_diffusion

__all__ = [
    "B0_THRESHOLD",
    "GE_B_OFFSET",
    "GROUP_REL_TOL",
    "SEARCHED_CONVENTIONS",
    "BValueSource",
    "DiffusionInfo",
    "DirectionalityValues",
    "b_label",
    "bvalue_levels",
    "diffusion_info",
    "ge_bvalue",
    "group_bvalues",
    "is_b0",
    "private_value",
]

#: b below this (s/mm²) is treated as b≈0 (Philips writes 0.001…0.004, UIH 1.25).
B0_THRESHOLD = 5.0
#: Nearly equal b-values belong to one shell within this relative tolerance: the one rule for
#: series assembly, the DKI levels (:func:`bvalue_levels`) and the ADC b subset. Vendors that
#: write an effective b per volume differ by fractions of a percent within a shell (UIH 929.75
#: vs 928.29: 0.16 %), while distinct shells of a breast protocol are ≥ 20 % apart (800/1000),
#: so 2 % merges the first with margin and never the second; the tests and the four real vendor
#: series (tests/test_vendor_data.py) pass with it. The fit used 1 % before this was shared, but
#: in the node it saw volumes that assembly had already grouped at 2 %.
GROUP_REL_TOL = 0.02

#: Every place a b-value is looked for, for messages that say what was searched.
SEARCHED_CONVENTIONS = (
    "(0018,9087), MR Diffusion Sequence (0018,9117), b-matrix (0018,9602-9607), Siemens "
    "(0019,xx0C)/CSA B_value/SequenceName, GE (0043,xx39), Philips (2001,xx03), UIH (0065,xx09), "
    "Canon Image Comments (0020,4000); b=0 implied only for Toshiba/Canon"
)

SIEMENS_MR = "SIEMENS MR HEADER"
GE_PARM = "GEMS_PARM_01"
GE_ACQU = "GEMS_ACQU_01"
PHILIPS_IMAGING = "Philips Imaging DD 001"
PHILIPS_MR_001 = "Philips MR Imaging DD 001"
PHILIPS_MR_005 = "Philips MR Imaging DD 005"
PHILIPS_MR_006 = "Philips MR Imaging DD 006"
UIH_IMAGE = "Image Private Header"

_SEQNAME_B = re.compile(r"_b(\d+(?:\.\d+)?)")
#: Offset that some GE software versions add to the first value of (0043,xx39).
GE_B_OFFSET = 1_000_000_000


class BValueSource(Enum):
    """Where a b-value was found (reported so a reader can check the convention used)."""

    ENHANCED = "per-frame MR Diffusion Sequence (0018,9117)"
    STANDARD = "Diffusion b-value (0018,9087)"
    SIEMENS_PRIVATE = "Siemens (0019,xx0C) B_value"
    SIEMENS_CSA = "Siemens CSA header B_value"
    GE_PRIVATE = "GE (0043,xx39) first value"
    PHILIPS_PRIVATE = "Philips (2001,xx03) Diffusion B-Factor"
    UIH_PRIVATE = "UIH (0065,xx09) effective b"
    CANON_COMMENTS = "Canon Image Comments (0020,4000) b=<value>(x,y,z)"
    BMATRIX = "b-matrix (0018,9602-9607) trace"
    SIEMENS_SEQUENCE_NAME = "Siemens SequenceName ep_b<value>"
    IMPLIED_B0 = "MR Diffusion Sequence without b-value: b=0 (Toshiba/Canon)"
    IMPLIED_B0_SERIES = "no b-value on a Toshiba/Canon image of a diffusion series: b=0"


class DirectionalityValues(Enum):
    """Diffusion Directionality (0018,9075) defined terms (PS3.3 C.8.13.5.9)."""

    DIRECTIONAL = "DIRECTIONAL"
    BMATRIX = "BMATRIX"
    ISOTROPIC = "ISOTROPIC"
    NONE = "NONE"


@dataclass(frozen=True)
class DiffusionInfo:
    """Diffusion description of one image frame."""

    b: float | None
    source: BValueSource | None
    direction: tuple[float, float, float] | None = None
    directionality: DirectionalityValues | None = None
    #: Vendor volume identity, e.g. Philips (2005,xx12) b number and (2005,xx13) gradient number.
    volume_id: tuple[int, ...] | None = None
    #: Vendor acquisition order of the volume, e.g. Philips (2005,xx96).
    volume_order: int | None = None


def is_b0(b: float, threshold: float = B0_THRESHOLD) -> bool:
    """True for b≈0 (below ``threshold`` s/mm²)."""
    return b < threshold


def b_label(b: float) -> str:
    """The key used for a b-value in reports: ``format(b, "g")`` of the exact header value."""
    return format(b, "g")


def group_bvalues(
    bvals: Sequence[float],
    *,
    rel_tol: float = GROUP_REL_TOL,
    b0_threshold: float = B0_THRESHOLD,
) -> list[list[int]]:
    """Indices of ``bvals`` grouped into shells, ascending.

    All b below ``b0_threshold`` form one b≈0 shell; above it a value joins the current shell
    while it is within ``rel_tol`` of the shell's smallest member (no chaining drift).
    """
    order = sorted(range(len(bvals)), key=lambda i: bvals[i])
    groups: list[list[int]] = []
    first = math.nan
    for i in order:
        b = float(bvals[i])
        if groups and (
            (is_b0(first, b0_threshold) and is_b0(b, b0_threshold))
            or (not is_b0(first, b0_threshold) and b <= first * (1.0 + rel_tol))
        ):
            groups[-1].append(i)
        else:
            groups.append([i])
            first = b
    return groups


def bvalue_levels(
    bvals: ArrayLike,
    *,
    rel_tol: float = GROUP_REL_TOL,
    b0_threshold: float = B0_THRESHOLD,
) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """The shells of :func:`group_bvalues` as ``(levels, labels)`` arrays, for the fits.

    ``levels`` holds the mean exact b of each shell (ascending; the b≈0 shell is exactly 0) and
    ``labels`` per input b the index of its shell. Raises ``ValueError`` unless the b-values are
    finite, ≥ 0 and at least one.
    """
    b = np.asarray(bvals, dtype=np.float64).ravel()
    if b.size == 0 or not np.all(np.isfinite(b)) or np.any(b < 0):
        raise ValueError(f"b-values must be finite and ≥ 0, got {b.tolist()}")
    effective = np.where(b < b0_threshold, 0.0, b)
    labels = np.empty(b.size, dtype=np.intp)
    groups = group_bvalues(b.tolist(), rel_tol=rel_tol, b0_threshold=b0_threshold)
    for level, members in enumerate(groups):  # a handful of shells, not voxels
        labels[members] = level
    levels = np.array([effective[members].mean() for members in groups])
    return levels, labels


def ge_bvalue(raw: float) -> float:
    """GE (0043,xx39) first value without the +n·10⁹ offset some software versions add."""
    return math.fmod(raw, GE_B_OFFSET) if raw >= GE_B_OFFSET else raw


def private_value(ds: Dataset, group: int, creator: str, offset: int) -> Any:
    """Value of a private element found through its creator, or None when absent/empty."""
    tag = private_tag(ds, group, creator, offset)
    elem: DataElement | None = None if tag is None else ds.get(tag)
    if elem is None:
        return None
    value = elem.value
    if value is None or value == "" or (isinstance(value, bytes | list) and not value):
        return None
    return value


def _first(value: Any) -> Any:
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


def _as_float(value: Any) -> float | None:
    v = _first(value)
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _as_vector(value: Any) -> tuple[float, float, float] | None:
    vals = floats(value, 3)
    if vals is None or math.sqrt(sum(v * v for v in vals)) < 1e-6:
        return None
    return (vals[0], vals[1], vals[2])


def _diffusion_item(ds: Dataset | None) -> Dataset | None:
    """First item of the MR Diffusion Sequence (0018,9117) in ``ds`` (frame, shared or top)."""
    if ds is None:
        return None
    seq = ds.get("MRDiffusionSequence")
    return seq[0] if seq else None


def _directionality(value: Any) -> DirectionalityValues | None:
    t = str(_first(value) or "").strip().upper()
    if not t:
        return None
    philips = {
        "I": "ISOTROPIC",
        "O": "DIRECTIONAL",
        "R": "DIRECTIONAL",
        "A": "DIRECTIONAL",
        "F": "DIRECTIONAL",
        "P": "DIRECTIONAL",
        "S": "DIRECTIONAL",
        "N": "NONE",
    }
    t = philips.get(t, t)
    try:
        return DirectionalityValues(t)
    except ValueError:
        return None


def _b_from_private(
    ds: Dataset, csa: Mapping[str, list[str]] | None
) -> tuple[float | None, BValueSource | None]:
    candidates: list[tuple[Any, BValueSource]] = [
        (private_value(ds, 0x0019, SIEMENS_MR, 0x0C), BValueSource.SIEMENS_PRIVATE),
        (csa_float(csa, "B_value"), BValueSource.SIEMENS_CSA),
        (private_value(ds, 0x0043, GE_PARM, 0x39), BValueSource.GE_PRIVATE),
        (private_value(ds, 0x2001, PHILIPS_IMAGING, 0x03), BValueSource.PHILIPS_PRIVATE),
    ]
    for raw, source in candidates:
        b = _as_float(raw)
        if b is not None:
            return (ge_bvalue(b) if source is BValueSource.GE_PRIVATE else b), source
    canon = canon_comment_diffusion(ds)
    if canon is not None:
        return canon[0], BValueSource.CANON_COMMENTS
    match = _SEQNAME_B.search(text(ds, "SequenceName"))
    if match:
        return float(match.group(1)), BValueSource.SIEMENS_SEQUENCE_NAME
    return None, None


_BMATRIX_KEYWORDS = (
    "DiffusionBValueXX",
    "DiffusionBValueXY",
    "DiffusionBValueXZ",
    "DiffusionBValueYY",
    "DiffusionBValueYZ",
    "DiffusionBValueZZ",
)


def _bmatrix(item: Dataset) -> NDArray[np.float64] | None:
    """The symmetric b-matrix of a Diffusion b-matrix Sequence (0018,9601) item, if complete."""
    seq = item.get("DiffusionBMatrixSequence")
    holder = seq[0] if seq else item
    vals = [_as_float(holder.get(k)) for k in _BMATRIX_KEYWORDS]
    if any(v is None for v in vals):
        return None
    xx, xy, xz, yy, yz, zz = (float(v) for v in vals if v is not None)
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def _bmatrix_diffusion(
    items: Sequence[Dataset],
) -> tuple[float, tuple[float, float, float] | None] | None:
    """b = trace of the b-matrix, direction = its principal eigenvector (PS3.3 C.8.13.5.9)."""
    for item in items:
        m = _bmatrix(item)
        if m is None:
            continue
        b = float(np.trace(m))
        if not math.isfinite(b) or b < 0:
            continue
        w, v = np.linalg.eigh(m)
        if b < B0_THRESHOLD or float(np.max(w)) < 0.5 * b:
            return b, None  # b≈0 or no dominant gradient axis (an isotropic trace)
        vec = v[:, int(np.argmax(w))]
        vec = vec if vec[int(np.argmax(np.abs(vec)))] > 0 else -vec  # the sign is arbitrary
        return b, (float(vec[0]), float(vec[1]), float(vec[2]))
    return None


def _direction(
    ds: Dataset, items: Sequence[Dataset], csa: Mapping[str, list[str]] | None
) -> tuple[float, float, float] | None:
    for item in items:
        seq = item.get("DiffusionGradientDirectionSequence")
        if seq:
            vec = _as_vector(seq[0].get("DiffusionGradientOrientation"))
            if vec:
                return vec
        vec = _as_vector(item.get("DiffusionGradientOrientation"))
        if vec:
            return vec
    ge = [private_value(ds, 0x0019, GE_ACQU, off) for off in (0xBB, 0xBC, 0xBD)]
    philips = [private_value(ds, 0x2005, PHILIPS_MR_001, off) for off in (0xB0, 0xB1, 0xB2)]
    for candidate in (
        ds.get("DiffusionGradientOrientation"),
        private_value(ds, 0x0019, SIEMENS_MR, 0x0E),
        csa_floats(csa, "DiffusionGradientDirection") or None,
        None if any(v is None for v in ge) else ge,
        None if any(v is None for v in philips) else philips,
        private_value(ds, 0x0065, UIH_IMAGE, 0x37),
    ):
        vec = _as_vector(candidate)
        if vec:
            return vec
    bmatrix = _bmatrix_diffusion(items)
    if bmatrix is not None and bmatrix[1] is not None:
        return bmatrix[1]
    canon = canon_comment_diffusion(ds)
    return None if canon is None else canon[1]


def _vendor_volume(ds: Dataset) -> tuple[tuple[int, ...] | None, int | None]:
    b_num = _as_float(private_value(ds, 0x2005, PHILIPS_MR_005, 0x12))
    g_num = _as_float(private_value(ds, 0x2005, PHILIPS_MR_005, 0x13))
    order = _as_float(private_value(ds, 0x2005, PHILIPS_MR_006, 0x96))
    vid = None if b_num is None or g_num is None else (int(b_num), int(g_num))
    return vid, (None if order is None else int(order))


def diffusion_info(
    ds: Dataset,
    frame: Dataset | None = None,
    *,
    shared: Dataset | None = None,
    csa: Mapping[str, list[str]] | None = None,
) -> DiffusionInfo:
    """b-value, direction and vendor volume identity of one image frame.

    ``frame``/``shared`` are the per-frame and shared functional group items of an enhanced
    object (PS3.3 C.7.6.16); ``csa`` is the parsed Siemens CSA image header if any. The first
    convention that yields a value wins, in the order of :class:`BValueSource`, except that a
    UIH effective b (0065,xx09) is preferred over a nominal standard value.
    """
    items = [i for i in (_diffusion_item(frame), _diffusion_item(shared)) if i is not None]
    top_item = _diffusion_item(ds)
    b: float | None = None
    source: BValueSource | None = None
    for item in items:
        b = _as_float(item.get("DiffusionBValue"))
        if b is not None:
            source = BValueSource.ENHANCED
            break
    if b is None:
        b = _as_float(private_value(ds, 0x0065, UIH_IMAGE, 0x09))
        source = BValueSource.UIH_PRIVATE if b is not None else None
    if b is None:
        b = _as_float(ds.get("DiffusionBValue"))
        if b is None and top_item is not None:
            b = _as_float(top_item.get("DiffusionBValue"))
        source = BValueSource.STANDARD if b is not None else None
    if b is None:
        bmatrix = _bmatrix_diffusion([*items, *([top_item] if top_item is not None else [])])
        if bmatrix is not None:
            b, source = bmatrix[0], BValueSource.BMATRIX
    if b is None:
        b, source = _b_from_private(ds, csa)
    if b is None and (items or top_item is not None):
        b, source = 0.0, BValueSource.IMPLIED_B0

    all_items = [*items, *([top_item] if top_item is not None else [])]
    directionality = None
    for candidate in (
        *(i.get("DiffusionDirectionality") for i in all_items),
        ds.get("DiffusionDirectionality"),
        private_value(ds, 0x0019, SIEMENS_MR, 0x0D),
        (csa or {}).get("DiffusionDirectionality"),
        private_value(ds, 0x2001, PHILIPS_IMAGING, 0x04),
    ):
        directionality = _directionality(candidate)
        if directionality is not None:
            break
    vid, order = _vendor_volume(ds)
    return DiffusionInfo(
        b=b,
        source=source,
        direction=_direction(ds, all_items, csa),
        directionality=directionality,
        volume_id=vid,
        volume_order=order,
    )
