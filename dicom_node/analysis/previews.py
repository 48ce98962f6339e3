"""PNG previews for the review app: a map slice over its anatomy with the ROI, and the ROI histogram.

Images are composed as numpy arrays (window/level and a colour lookup table, nearest-neighbour
upscaling, the ROI outline) and written with Pillow, which also draws the text: no matplotlib
figure, so a preview costs milliseconds rather than ≈ 0.1 s, is thread-safe and headless.

A map slice is read the way radiologists read a fused image: the b≈0 (lowest-b) image of the same
slice in grey for anatomy, the map semi-transparent only where it was fitted (elsewhere it holds
placeholder zeros that would read as "no diffusion"), the ROI outline on top, a colour bar with
the unit, and a title that says when the ROI is an unconfirmed automatic candidate. The title and
slice are also written into the PNG's text chunks so the review app and tests can read them.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

__all__ = [
    "analysis_previews",
    "best_slice",
    "histogram_png",
    "map_slice_png",
    "map_slice_title",
    "orientation_labels",
    "roi_slices",
]

_DPI = 100
_ROI_COLOUR = "#ff2d2d"


def best_slice(roi: NDArray[np.bool_]) -> int:
    """Slice holding the most ROI voxels — the ROI's largest cross-section (middle if empty)."""
    counts = np.asarray(roi, dtype=bool).reshape(roi.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.any() else roi.shape[0] // 2


#: LPS patient axes (DICOM PS3.3 C.7.6.2.1.1): the letter at the positive end of x, y, z.
_POSITIVE = ("L", "P", "H")
_NEGATIVE = ("R", "A", "F")


def _towards(direction: tuple[float, float, float], sign: float) -> str:
    """The patient direction a unit vector points to most (its dominant LPS axis)."""
    v = np.asarray(direction, dtype=float) * sign
    axis = int(np.argmax(np.abs(v)))
    return _POSITIVE[axis] if v[axis] > 0 else _NEGATIVE[axis]


def orientation_labels(
    row_dir: tuple[float, float, float], col_dir: tuple[float, float, float]
) -> dict[str, str]:
    """Orientation markers of an image shown as stored (rows down, columns right).

    ``row_dir`` / ``col_dir`` are the two ImageOrientationPatient vectors: the direction of
    increasing column index (→ the right edge) and of increasing row index (→ the bottom edge).
    Returns the letter (L/R, A/P, H/F) for each edge: ``left``, ``right``, ``top``, ``bottom``.
    """
    return {
        "left": _towards(row_dir, -1.0),
        "right": _towards(row_dir, 1.0),
        "top": _towards(col_dir, -1.0),
        "bottom": _towards(col_dir, 1.0),
    }


def roi_slices(roi: NDArray[np.bool_], limit: int = 5) -> list[int]:
    """The slices the ROI crosses, at most ``limit`` evenly spaced ones (always its largest)."""
    counts = np.asarray(roi, dtype=bool).reshape(roi.shape[0], -1).sum(axis=1)
    crossed = [int(k) for k in np.flatnonzero(counts)]
    if len(crossed) <= limit:
        return crossed
    picks = {crossed[round(float(i))] for i in np.linspace(0, len(crossed) - 1, limit)}
    picks.add(best_slice(roi))
    return sorted(picks)


def map_slice_title(
    label: str, slice_index: int, n_slices: int, *, roi_confirmed: bool | None = None
) -> str:
    """Title of a map preview: map name and slice (1-based, "of N"), then the ROI status.

    ``roi_confirmed=False`` (an automatic candidate nobody has confirmed yet) adds a second line
    "ROI unconfirmed (automatic)" so a reader never takes the outline for a radiologist's.
    """
    head = f"slice {slice_index + 1} of {n_slices}"
    if label:
        head = f"{label} — {head}"
    return f"{head}\nROI unconfirmed (automatic)" if roi_confirmed is False else head


# --- drawing: numpy RGB arrays and Pillow text, no matplotlib figure -------------------------
#
# Why not matplotlib: a Figure + Agg canvas costs 110–140 ms per preview, and an analysis renders
# 26 of them before it publishes (benchmarks.md, latency). The pictures are simple — a nearest-
# neighbour upscaled slice, an outline, a colour bar, a histogram — so they are composed as
# arrays (window/level and a colour lookup table in numpy) and only the text goes through Pillow.

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_RED_TITLE = (176, 0, 0)
_MARKER = (255, 212, 0)
_BAR = (70, 130, 180)  # steelblue


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def _pt(points: float) -> int:
    """Font size in pixels of a size given in points at the previews' 100 dpi."""
    return max(6, round(points * _DPI / 72.0))


@functools.lru_cache(maxsize=16)
def _font(size_px: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib's data; covers "—", "⁻³", "²") else Pillow's own."""
    spec = importlib.util.find_spec("matplotlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = (
            Path(root) / "mpl-data" / "fonts" / "ttf" / f"DejaVuSans{'-Bold' if bold else ''}.ttf"
        )
        if path.is_file():
            return ImageFont.truetype(str(path), size_px)
    return ImageFont.load_default(size_px)


@functools.lru_cache(maxsize=8)
def _lut(name: str) -> NDArray[np.uint8]:
    """256-entry RGB lookup table of a named colour map (matplotlib's registry, no figure)."""
    if name in ("gray", "grey"):
        ramp = np.arange(256, dtype=np.uint8)
        return np.stack([ramp, ramp, ramp], axis=1)
    from matplotlib import colormaps  # the registry only: cheap next to a Figure

    rgba = colormaps[name](np.linspace(0.0, 1.0, 256))
    return np.asarray(np.rint(rgba[:, :3] * 255.0), dtype=np.uint8)


def _normalise(img: NDArray[np.float64], lo: float, hi: float) -> NDArray[np.float64]:
    span = hi - lo if hi > lo else 1.0
    return np.clip((np.nan_to_num(img, nan=lo) - lo) / span, 0.0, 1.0)


def _colour(img: NDArray[np.float64], lo: float, hi: float, cmap: str) -> NDArray[np.float64]:
    """RGB (0–255, float) of ``img`` through the colour map on the window [lo, hi]."""
    idx = np.minimum((_normalise(img, lo, hi) * 256.0).astype(np.intp), 255)
    return _lut(cmap)[idx].astype(np.float64)


def _upscale(shape: tuple[int, int], box: tuple[int, int]) -> tuple[NDArray[np.intp], ...]:
    """Row and column source indices of a nearest-neighbour upscale keeping the aspect ratio."""
    ny, nx = shape
    zoom = min(box[0] / ny, box[1] / nx)
    h, w = max(1, int(ny * zoom)), max(1, int(nx * zoom))
    rows = np.minimum((np.arange(h) / zoom).astype(np.intp), ny - 1)
    cols = np.minimum((np.arange(w) / zoom).astype(np.intp), nx - 1)
    return rows, cols


def _outline(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Pixels on either side of the mask's border (a ≈ 2 px line around the voxels)."""
    edge = np.zeros(mask.shape, dtype=bool)
    dy = mask[1:, :] != mask[:-1, :]
    dx = mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge


def _text_size(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont
) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _vertical_text(
    canvas: Image.Image, text: str, centre: tuple[int, int], size_px: int, fill: tuple[int, ...]
) -> None:
    """Text rotated 90° counter-clockwise (a colour bar's or y axis' label) centred at ``centre``."""
    font = _font(size_px)
    probe = ImageDraw.Draw(canvas)
    w, h = _text_size(probe, text, font)
    strip = Image.new("L", (w + 4, h + 6), 0)
    ImageDraw.Draw(strip).text((2, 1), text, font=font, fill=255)
    strip = strip.rotate(90, expand=True)
    colour = Image.new("RGB", strip.size, fill[:3])
    canvas.paste(colour, (centre[0] - strip.width // 2, centre[1] - strip.height // 2), strip)


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 × 10ⁿ steps) covering [lo, hi]."""
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(target, 1)
    mag = 10.0 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw)
    first = np.ceil(lo / step - 1e-9) * step
    ticks = np.arange(first, hi + step * 1e-6, step)
    return [float(round(t / step) * step) for t in ticks]


def _tick_label(value: float) -> str:
    return f"{value:.4g}".replace("-", "−")


def _png(canvas: Image.Image, metadata: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_itxt(key, value)  # iTXt: UTF-8 (titles hold "—")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", pnginfo=info, compress_level=_COMPRESS)
    return buf.getvalue()


#: zlib level of the PNGs: 1 is ~5× faster than Pillow's default 6 for ~10 % more bytes.
_COMPRESS = 1


def _grey_window(img: NDArray[np.float64]) -> tuple[float, float]:
    """Display window of an anatomical slice: 0 to the 99.5th percentile of its positive pixels,
    so air stays black and a few bright voxels (vessels, artefacts) do not wash out the breast."""
    pos = img[np.isfinite(img) & (img > 0)]
    hi = float(np.percentile(pos, 99.5)) if pos.size else 0.0
    return 0.0, hi if hi > 0 else 1.0


def map_slice_png(
    values: ArrayLike,
    roi: NDArray[np.bool_] | None = None,
    *,
    underlay: ArrayLike | None = None,
    fitted: ArrayLike | None = None,
    slice_index: int | None = None,
    title: str = "",
    roi_confirmed: bool | None = None,
    scale: float = 1.0,
    unit_label: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    alpha: float = 0.7,
    size_inches: tuple[float, float] = (5.0, 4.4),
    orientation: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
    grey: bool = False,
) -> bytes:
    """One slice of a parameter map (times ``scale``, e.g. 1e3 for 10⁻³ mm²/s) over its anatomy.

    ``underlay`` is the lowest-b image on the same ``(slice, row, column)`` grid, drawn in grey;
    the map is drawn with opacity ``alpha`` only where ``fitted`` is True (everywhere finite if
    ``fitted`` is None); the ROI is outlined on top. The slice defaults to the ROI's largest
    cross-section. ``title`` is the map name; :func:`map_slice_title` adds slice and ROI status.
    Shown as stored (rows down, columns right), like a DICOM viewer, voxels as nearest-neighbour
    blocks; ``orientation`` (the ImageOrientationPatient row and column vectors) adds L/R, A/P,
    H/F markers at the edges. ``grey`` draws ``values`` itself in grey (the high-b DWI image)
    with no overlay. The PNG is ``size_inches`` × 100 dpi pixels; text chunks: ``Title``,
    ``Slice`` (0-based index) and ``ROI`` (confirmed / unconfirmed / unknown).
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"map must be 3-D (slice, row, column), got {arr.shape}")
    for name, other in (("roi", roi), ("underlay", underlay), ("fitted", fitted)):
        if other is not None and np.shape(other) != arr.shape:
            raise ValueError(f"{name} shape {np.shape(other)} does not match map {arr.shape}")
    k = best_slice(roi) if slice_index is None and roi is not None else slice_index
    k = arr.shape[0] // 2 if k is None else int(k)
    if not 0 <= k < arr.shape[0]:
        raise ValueError(f"slice {k} outside 0..{arr.shape[0] - 1}")
    img = arr[k] * scale
    shown = np.isfinite(img)
    if fitted is not None:
        shown &= np.asarray(fitted, dtype=bool)[k]
    if vmin is None or vmax is None:
        vals = img[shown]
        lo, hi = (float(v) for v in np.percentile(vals, [1.0, 99.0])) if vals.size else (0.0, 1.0)
        vmin = lo if vmin is None else vmin
        vmax = (hi if hi > lo else lo + 1.0) if vmax is None else vmax
    if grey:
        cmap, underlay = "gray", None

    width, height = round(size_inches[0] * _DPI), round(size_inches[1] * _DPI)
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    full_title = map_slice_title(title, k, arr.shape[0], roi_confirmed=roi_confirmed)
    title_font = _font(_pt(10))
    tw, th = _text_size(draw, full_title, title_font)
    margin = 6
    top = margin + th + 8
    tick_px, label_px = _pt(8), _pt(9)
    bar_w, bar_reserve = max(10, width // 32), max(10, width // 32) + 4 * tick_px + 2 * label_px
    box = (height - top - margin, width - 2 * margin - bar_reserve)
    rows, cols = _upscale(img.shape, (max(box[0], 1), max(box[1], 1)))
    h, w = rows.size, cols.size
    x0 = margin + max(0, (box[1] - w) // 2)
    y0 = top + max(0, (box[0] - h) // 2)  # the title sits just above the image
    title_y = y0 - th - 8

    colour = _colour(img, vmin, vmax, cmap)
    if underlay is not None:
        anat = np.asarray(underlay, dtype=np.float64)[k]
        glo, ghi = _grey_window(anat)
        base = np.repeat((_normalise(anat, glo, ghi) * 255.0)[..., None], 3, axis=-1)
        a = np.where(shown, alpha, 0.0)[..., None]
        rgb = a * colour + (1.0 - a) * base
    else:
        rgb = np.where(shown[..., None], colour, np.asarray(_WHITE, dtype=np.float64))
    block = np.rint(rgb).astype(np.uint8)[rows[:, None], cols[None, :]]
    if roi is not None and np.asarray(roi)[k].any():
        up = np.asarray(roi, dtype=bool)[k][rows[:, None], cols[None, :]]
        block[_outline(up)] = _hex_rgb(_ROI_COLOUR)
    canvas.paste(Image.fromarray(block, mode="RGB"), (x0, y0))

    draw.multiline_text(
        (max(margin, x0 + (w - tw) // 2), title_y),
        full_title,
        font=title_font,
        fill=_BLACK if roi_confirmed is not False else _RED_TITLE,
        align="center",
        spacing=3,
    )
    if orientation is not None:
        marks = orientation_labels(*orientation)
        mfont = _font(_pt(12), bold=True)
        for edge, fx, fy, ax_, ay in (
            ("left", 0.01, 0.5, 0.0, 0.5),
            ("right", 0.99, 0.5, 1.0, 0.5),
            ("top", 0.5, 0.01, 0.5, 0.0),
            ("bottom", 0.5, 0.99, 0.5, 1.0),
        ):
            mw, mh = _text_size(draw, marks[edge], mfont)
            px = x0 + fx * w - ax_ * mw
            py = y0 + fy * h - ay * (mh + 4)
            draw.text((px, py), marks[edge], font=mfont, fill=_MARKER)

    # A solid colour bar (not the semi-transparent overlay's colours) reads values reliably.
    bx = x0 + w + 3 * margin
    by0, by1 = y0, y0 + h
    ramp = np.linspace(1.0, 0.0, max(by1 - by0, 2))
    bar = _lut(cmap)[np.minimum((ramp * 256).astype(np.intp), 255)]
    canvas.paste(Image.fromarray(np.repeat(bar[:, None, :], bar_w, axis=1), mode="RGB"), (bx, by0))
    draw.rectangle((bx - 1, by0 - 1, bx + bar_w, by0 + bar.shape[0]), outline=_BLACK)
    tick_font = _font(tick_px)
    span = float(vmax) - float(vmin) if vmax > vmin else 1.0
    widest = 0
    for t in _nice_ticks(float(vmin), float(vmax)):
        ty = by0 + (1.0 - (t - vmin) / span) * (bar.shape[0] - 1)
        draw.line((bx + bar_w, ty, bx + bar_w + 3, ty), fill=_BLACK)
        label = _tick_label(t)
        lw, lh = _text_size(draw, label, tick_font)
        widest = max(widest, lw)
        draw.text((bx + bar_w + 5, ty - lh / 2 - 2), label, font=tick_font, fill=_BLACK)
    if unit_label:
        _vertical_text(
            canvas, unit_label, (bx + bar_w + 8 + widest + label_px, (by0 + by1) // 2),
            label_px, _BLACK,
        )  # fmt: skip
    status = {True: "confirmed", False: "unconfirmed", None: "unknown"}[roi_confirmed]
    return _png(canvas, {"Title": full_title, "Slice": str(k), "ROI": status})


def histogram_png(
    values: ArrayLike,
    *,
    bin_width: float,
    bin_min: float = 0.0,
    scale: float = 1.0,
    title: str = "",
    xlabel: str = "",
    size_inches: tuple[float, float] = (4.0, 3.0),
    annotations: dict[str, Any] | None = None,
) -> bytes:
    """Histogram of the ROI values on the same fixed-bin-size grid the entropy used.

    Bars are drawn as array columns (one count per bin, ``np.bincount``), axes and labels with
    Pillow; the PNG is ``size_inches`` × 100 dpi pixels.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    width, height = round(size_inches[0] * _DPI), round(size_inches[1] * _DPI)
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    title_font, tick_font, label_font = _font(_pt(9)), _font(_pt(7)), _font(_pt(8))
    _, th = _text_size(draw, title or "Ag", title_font)
    _, tickh = _text_size(draw, "0.5", tick_font)
    _, labh = _text_size(draw, xlabel or "Ag", label_font)
    left, right = 8 + labh + 6 * _pt(7) // 2 + 8, width - 10
    top, bottom = 6 + th + 8, height - (6 + labh + tickh + 10)
    pw, ph = max(right - left, 1), max(bottom - top, 1)
    if title:
        tw, _ = _text_size(draw, title, title_font)
        draw.text((left + (pw - tw) // 2, 4), title, font=title_font, fill=_BLACK)
    if x.size:
        first = np.floor((x.min() - bin_min) / bin_width)
        last = np.floor((x.max() - bin_min) / bin_width) + 1
        n_bins = int(min(last - first, 2000))
        idx = np.clip(np.floor((x - bin_min) / bin_width) - first, 0, n_bins - 1).astype(np.intp)
        counts = np.bincount(idx, minlength=n_bins)
        lo = float(bin_min + first * bin_width) * scale
        hi = float(bin_min + (first + n_bins) * bin_width) * scale
        pad = 0.05 * (hi - lo)
        xlo, xhi = lo - pad, hi + pad
        ymax = float(counts.max()) * 1.05
        # each bin fills the pixel columns it spans (at least one): a bin narrower than a pixel
        # shares its column with its neighbours and the column shows the highest of them
        edges_px = (lo + np.arange(n_bins + 1) * (hi - lo) / n_bins - xlo) / (xhi - xlo) * pw
        start = np.clip(edges_px[:-1].astype(np.intp), 0, pw - 1)
        span = np.maximum(np.clip(edges_px[1:].astype(np.intp), 0, pw) - start, 1)
        cols = np.repeat(start, span) + (
            np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span)
        )
        heights = np.zeros(pw)
        np.maximum.at(heights, np.minimum(cols, pw - 1), np.repeat(counts, span).astype(np.float64))
        bar_px = np.rint(heights / ymax * ph).astype(np.intp)
        plot = np.full((ph, pw, 3), 255, dtype=np.uint8)
        rows = np.arange(ph)[:, None]
        plot[rows >= (ph - bar_px)[None, :]] = _BAR
        canvas.paste(Image.fromarray(plot, mode="RGB"), (left, top))
        for t in _nice_ticks(xlo, xhi):
            px = left + (t - xlo) / (xhi - xlo) * pw
            draw.line((px, bottom, px, bottom + 3), fill=_BLACK)
            label = _tick_label(t)
            lw, _ = _text_size(draw, label, tick_font)
            draw.text((px - lw / 2, bottom + 4), label, font=tick_font, fill=_BLACK)
        for t in _nice_ticks(0.0, ymax, 4):
            py = bottom - t / ymax * ph
            draw.line((left - 3, py, left, py), fill=_BLACK)
            label = f"{t:g}"
            lw, lh = _text_size(draw, label, tick_font)
            draw.text((left - 5 - lw, py - lh / 2 - 2), label, font=tick_font, fill=_BLACK)
    else:
        msg = "no voxels"
        mw, mh = _text_size(draw, msg, label_font)
        draw.text((left + (pw - mw) // 2, top + (ph - mh) // 2), msg, font=label_font, fill=_BLACK)
    draw.rectangle((left - 1, top - 1, right, bottom), outline=_BLACK)
    if xlabel:
        lw, _ = _text_size(draw, xlabel, label_font)
        draw.text((left + (pw - lw) // 2, height - labh - 8), xlabel, font=label_font, fill=_BLACK)
    _vertical_text(canvas, "voxels", (6 + labh // 2, top + ph // 2), _pt(8), _BLACK)
    if annotations:
        text = "\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                         for k, v in annotations.items())  # fmt: skip
        aw, _ = _text_size(draw, text, tick_font)
        draw.multiline_text((right - 6 - aw, top + 4), text, font=tick_font, fill=_BLACK,
                            align="right")  # fmt: skip
    return _png(canvas)


#: Per map: label, display scale, unit shown, colour window (display units).
_MAP_DISPLAY: dict[str, tuple[str, float, str, tuple[float, float]]] = {
    "adc": ("ADC", 1e3, "10⁻³ mm²/s", (0.0, 3.0)),
    "dapp": ("Dapp", 1e3, "10⁻³ mm²/s", (0.0, 3.5)),
    "kapp": ("Kapp", 1.0, "unitless", (0.0, 2.0)),
}


def analysis_previews(
    maps: Mapping[str, NDArray[np.float64]],
    roi: NDArray[np.bool_],
    *,
    roi_confirmed: bool,
    underlay: NDArray[Any],
    shown: Mapping[str, NDArray[np.bool_]],
    histogram_voxels: Mapping[str, NDArray[np.bool_]],
    bin_widths: Mapping[str, float],
    bin_min: float,
    high_b: NDArray[Any] | None = None,
    orientation: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
    max_slices: int = 5,
) -> dict[str, bytes]:
    """The review app's previews of one analysis: slices through the ROI and ROI histograms.

    Diffusivities are shown in 10⁻³ mm²/s, Kapp unitless (docs: units). ``shown[name]`` is where
    the map was fitted (elsewhere it holds zeros); ``histogram_voxels[name]`` the voxels that
    entered the features, binned with the features' bin widths. Per map ``<map>_slice.png`` is
    the ROI's largest cross-section; ``<map>_slice_<k>.png`` (k: 0-based, 3 digits) and, with
    ``high_b``, ``dwi_slice_<k>.png`` follow the ROI through up to ``max_slices`` slices at a
    readable size with orientation markers, for the case page's slice navigation.
    """
    out: dict[str, bytes] = {}
    big = (6.4, 5.6)
    slices = roi_slices(roi, max_slices)
    if high_b is not None:
        for k in slices:
            out[f"dwi_slice_{k:03d}.png"] = map_slice_png(
                high_b,
                roi,
                slice_index=k,
                title="High-b DWI",
                roi_confirmed=roi_confirmed,
                unit_label="signal (a.u.)",
                size_inches=big,
                orientation=orientation,
                grey=True,
            )
    for name, (label, scale, unit, (lo, hi)) in _MAP_DISPLAY.items():
        show = functools.partial(
            map_slice_png,
            maps[name],
            roi,
            underlay=underlay,
            fitted=shown[name],
            title=label,
            roi_confirmed=roi_confirmed,
            scale=scale,
            unit_label=f"{label} ({unit})",
            vmin=lo,
            vmax=hi,
        )
        for k in slices:
            out[f"{name}_slice_{k:03d}.png"] = show(
                slice_index=k, size_inches=big, orientation=orientation
            )
        out[f"{name}_slice.png"] = show()
        vals = maps[name][roi & histogram_voxels[name]]
        out[f"{name}_histogram.png"] = histogram_png(
            vals,
            bin_width=bin_widths[name],
            bin_min=bin_min,
            scale=scale,
            title=f"{label} in ROI ({vals.size} voxels)",
            xlabel=f"{label} ({unit})",
        )
    return out
