"""Siemens CSA header: the private binary header of Siemens MR images (VB/VD era).

The CSA Image Header Info lives in (0029,xx10) and the CSA Series Header Info in (0029,xx20) of
the private block owned by ``SIEMENS CSA HEADER`` (PS3.5 §7.8: the block is found through its
private creator, not by a fixed element number). See notes/dicom.md: VB-era mosaics carry
``B_value``, ``DiffusionGradientDirection``, ``NumberOfImagesInMosaic`` and
``SliceNormalVector`` only here.

Layout (little endian). CSA2 starts with ``SV10`` + 4 bytes, CSA1 has no signature:
``uint32 n_tags, uint32 (77)``, then per tag ``char name[64], int32 vm, char vr[4],
int32 syngodt, int32 n_items, int32 (77|205)``, then per item ``int32 x[4]`` followed by the
item bytes (length ``x[1]`` in CSA2, ``x[0] - n_tags`` in CSA1) padded to 4 bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from pydicom.dataset import Dataset

from dicom_node.series.headers import private_tag

__all__ = [
    "CSA_CREATOR",
    "CsaError",
    "csa_float",
    "csa_floats",
    "csa_image_header",
    "csa_int",
    "parse_csa",
]

CSA_CREATOR = "SIEMENS CSA HEADER"
_IMAGE_HEADER_ELEMENT = 0x10  # (0029,xx10) CSA Image Header Info
_MAX_TAGS = 1000
_MAX_ITEMS = 1000

CsaHeader = Mapping[str, list[str]]


class CsaError(ValueError):
    """The bytes are not a well-formed CSA1/CSA2 header."""


def parse_csa(raw: bytes) -> dict[str, list[str]]:
    """Parse a CSA1 or CSA2 header into ``{tag name: [non-empty item strings]}``."""
    csa2 = raw[:4] == b"SV10"
    pos = 8 if csa2 else 0
    n_tags, _ = _unpack("<2I", raw, pos)
    if not 0 < n_tags <= _MAX_TAGS:
        raise CsaError(f"implausible CSA tag count {n_tags}")
    pos += 8
    out: dict[str, list[str]] = {}
    for _ in range(n_tags):
        name_b = raw[pos : pos + 64]
        if len(name_b) < 64:
            raise CsaError("CSA header truncated in a tag name")
        name = name_b.split(b"\0", 1)[0].decode("latin-1")
        _vm, _vr, _dt, n_items, _ = _unpack("<i4siii", raw, pos + 64)
        if not 0 <= n_items <= _MAX_ITEMS:
            raise CsaError(f"implausible item count {n_items} for {name!r}")
        pos += 84
        values: list[str] = []
        for _ in range(n_items):
            x = _unpack("<4i", raw, pos)
            pos += 16
            length = x[1] if csa2 else x[0] - n_tags
            if length < 0 or pos + length > len(raw):
                raise CsaError(f"item of {name!r} runs past the end of the header")
            text = raw[pos : pos + length].split(b"\0", 1)[0].decode("latin-1").strip()
            if text:
                values.append(text)
            pos += (length + 3) // 4 * 4
        out[name] = values
    return out


def _unpack(fmt: str, raw: bytes, pos: int) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    if pos + size > len(raw):
        raise CsaError("CSA header truncated")
    return struct.unpack_from(fmt, raw, pos)


def csa_image_header(ds: Dataset) -> dict[str, list[str]] | None:
    """The parsed CSA Image Header of ``ds``, or None when absent or unreadable."""
    tag = private_tag(ds, 0x0029, CSA_CREATOR, _IMAGE_HEADER_ELEMENT)
    elem = None if tag is None else ds.get(tag)
    if elem is None:
        return None
    value = elem.value
    if not isinstance(value, bytes | bytearray) or not value:
        return None
    try:
        return parse_csa(bytes(value))
    except CsaError:
        return None


def csa_floats(header: CsaHeader | None, name: str) -> list[float]:
    """All numeric items of ``name`` (empty when missing or not numeric)."""
    if header is None:
        return []
    try:
        return [float(v) for v in header.get(name, [])]
    except ValueError:
        return []


def csa_float(header: CsaHeader | None, name: str) -> float | None:
    """First numeric item of ``name``, or None."""
    vals = csa_floats(header, name)
    return vals[0] if vals else None


def csa_int(header: CsaHeader | None, name: str) -> int | None:
    """First item of ``name`` as an integer, or None."""
    v = csa_float(header, name)
    return None if v is None else round(v)
