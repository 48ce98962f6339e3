"""Checks on an encoded instance before it is stored: size bounds and Pixel Data framing.

Both run on the C-STORE's critical path, so they read lengths from the encoded bytes instead of
decoding anything: the Pixel Data element header is parsed where pydicom's header read stopped,
and encapsulated Pixel Data is walked item by item (PS3.5 A.4) without touching fragment bytes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRBigEndian, ImplicitVRLittleEndian

UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
EXTENDED_OFFSET_TABLE = 0x7FE00001
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
#: Video transfer syntaxes (PS3.5 8.2.5-8.2.8) carry every frame in one stream of fragments.
_VIDEO_PREFIX = "1.2.840.10008.1.2.4.10"
_INFLATE_CHUNK = 1 << 20
_INPUT_CHUNK = 1 << 16


class TooLarge(ValueError):
    """The instance exceeds ``node_max_instance_bytes`` (answered with 0xA700)."""


def inflated_size_within(deflated: bytes | memoryview, limit: int) -> int:
    """Size of raw-deflate ``deflated`` once inflated, never holding more than 1 MiB of output.

    Raises :class:`TooLarge` as soon as the output passes ``limit`` (a small C-STORE may inflate
    to gigabytes: PS3.5 A.5 puts no bound on it) and ``zlib.error`` on a corrupt stream.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    data = memoryview(deflated)
    for at in range(0, len(data), _INPUT_CHUNK):
        pending: bytes | memoryview = data[at : at + _INPUT_CHUNK]
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, _INFLATE_CHUNK))
            if total > limit:
                raise TooLarge(f"inflates past the {limit}-byte limit (node_max_instance_bytes)")
            pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    while not inflater.eof:  # output zlib still holds once all input is in
        out = inflater.decompress(b"", _INFLATE_CHUNK)
        if not out:
            break
        total += len(out)
        if total > limit:
            raise TooLarge(f"inflates past the {limit}-byte limit (node_max_instance_bytes)")
    return total


@dataclass(frozen=True)
class PixelElement:
    """Where the Pixel Data value starts in the encoded bytes and its declared length."""

    start: int
    length: int


def pixel_element(encoded: bytes, offset: int, syntax: UID) -> PixelElement | str | None:
    """Parse the element header at ``offset`` (where a stop-before-pixels read stopped).

    ``None`` when there is no Pixel Data there, a :class:`PixelElement`, or the tag as text when
    the header or the value runs past the end of ``encoded`` (a torn C-STORE).
    """
    if offset >= len(encoded):
        return None
    little = syntax != ExplicitVRBigEndian
    end = "<" if little else ">"
    if offset + 8 > len(encoded):
        return "(7FE0,0010)"
    group, element = struct.unpack_from(f"{end}HH", encoded, offset)
    if syntax == ImplicitVRLittleEndian:
        (length,) = struct.unpack_from(f"{end}I", encoded, offset + 4)
        start = offset + 8
    else:
        if offset + 12 > len(encoded):
            return f"({group:04X},{element:04X})"
        (length,) = struct.unpack_from(f"{end}I", encoded, offset + 8)
        start = offset + 12
    if length != UNDEFINED_LENGTH and start + length > len(encoded):
        return f"({group:04X},{element:04X})"
    if (group << 16) | element != PIXEL_DATA:
        return None
    return PixelElement(start, length)


_KEYWORD_TAGS = {
    "Rows": BaseTag(0x00280010),
    "Columns": BaseTag(0x00280011),
    "BitsAllocated": BaseTag(0x00280100),
    "SamplesPerPixel": BaseTag(0x00280002),
    "NumberOfFrames": BaseTag(0x00280008),
}


def _int(header: Dataset, keyword: str, default: int | None = None) -> int | None:
    """An integer attribute, read from the raw little-endian bytes when it is still raw:
    pydicom's conversion costs ~100 µs an element, more than the whole check otherwise."""
    raw = header._dict.get(_KEYWORD_TAGS[keyword])
    if raw is None:
        return default
    if isinstance(raw, RawDataElement) and raw.is_little_endian and isinstance(raw.value, bytes):
        value = raw.value
        if not value:
            return default
        if keyword == "NumberOfFrames":  # IS: decimal text
            text = value.strip(b" \0")
            return int(text) if text.lstrip(b"+-").isdigit() else None
        return int.from_bytes(value[:2], "little") if len(value) >= 2 else None
    element = header.get(keyword, None)
    if element is None or element == "":
        return default
    try:
        return int(element)
    except (TypeError, ValueError):
        return None


def expected_native_bytes(header: Dataset) -> int | str:
    """Bytes of native Pixel Data that Rows × Columns × Samples × Frames × BitsAllocated imply,
    or why the header cannot describe any pixel data."""
    rows, columns = _int(header, "Rows"), _int(header, "Columns")
    bits = _int(header, "BitsAllocated")
    samples = _int(header, "SamplesPerPixel", 1)
    frames = _int(header, "NumberOfFrames", 1)
    if not rows or not columns or rows < 0 or columns < 0:
        return f"Pixel Data present but Rows {rows} x Columns {columns}"
    if not bits or bits < 0 or (bits != 1 and bits % 8):
        return f"BitsAllocated {bits} is not 1 or a multiple of 8"
    if not samples or samples < 0:
        return f"SamplesPerPixel {samples} is not positive"
    if not frames or frames < 0:
        return f"NumberOfFrames {frames} is not positive"
    total = (rows * columns * samples * frames * bits + 7) // 8
    if samples == 3 and header.get("PhotometricInterpretation", "") == "YBR_FULL_422":
        total = total // 3 * 2  # two chroma samples per pair of pixels (PS3.3 C.7.6.3.1.2)
    return total


def native_length_problem(header: Dataset, length: int) -> str:
    """Why native Pixel Data of ``length`` bytes contradicts the header, or ''."""
    expected = expected_native_bytes(header)
    if isinstance(expected, str):
        return expected
    if length == expected or (expected % 2 and length == expected + 1):  # one pad byte
        return ""
    shape = (
        f"{_int(header, 'Rows')}x{_int(header, 'Columns')}x{_int(header, 'SamplesPerPixel', 1)}"
        f"x{_int(header, 'NumberOfFrames', 1)} at {_int(header, 'BitsAllocated')} bits"
    )
    return f"Pixel Data has {length} bytes, header implies {expected} ({shape})"


def encapsulated_problem(
    encoded: bytes, start: int, header: Dataset, syntax: UID, *, extended_table: bool
) -> str:
    """Why encapsulated Pixel Data starting at ``start`` is malformed or too short for the
    header's frames (PS3.5 A.4: an offset table item, then one or more fragments per frame)."""
    expected = expected_native_bytes(header)
    if isinstance(expected, str):
        return expected
    frames = _int(header, "NumberOfFrames", 1) or 1
    size = len(encoded)
    pos = start
    fragments = -1  # the first item is the Basic Offset Table
    offset_table = 0
    while True:
        if pos + 8 > size:
            return "encapsulated Pixel Data ends without a sequence delimiter"
        group, element, length = struct.unpack_from("<HHI", encoded, pos)
        pos += 8
        if (group, element) == _SEQUENCE_DELIMITER:
            break
        if (group, element) != _ITEM or length == UNDEFINED_LENGTH:
            return f"encapsulated Pixel Data holds ({group:04X},{element:04X}), not an item"
        if pos + length > size:
            return "encapsulated Pixel Data item runs past the end"
        if fragments < 0:
            offset_table = length
        fragments += 1
        pos += length
    if fragments < 1:
        return "encapsulated Pixel Data has no fragments"
    if offset_table and (offset_table % 4 or (not extended_table and offset_table != 4 * frames)):
        return f"Basic Offset Table has {offset_table // 4} entries for {frames} frames"
    if fragments < frames and not str(syntax).startswith(_VIDEO_PREFIX):
        return f"encapsulated Pixel Data has {fragments} fragments for {frames} frames"
    return ""
