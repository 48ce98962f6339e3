"""PNG previews for the review app: a map slice over its anatomy with the ROI, and the ROI histogram.

Figures are built with matplotlib's object API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``)
so nothing touches pyplot's global state and rendering is thread-safe and headless.

A map slice is read the way radiologists read a fused image: the b≈0 (lowest-b) image of the same
slice in grey for anatomy, the map semi-transparent only where it was fitted (elsewhere it holds
placeholder zeros that would read as "no diffusion"), the ROI outline on top, a colour bar with
the unit, and a title that says when the ROI is an unconfirmed automatic candidate. The title and
slice are also written into the PNG's text chunks so the review app and tests can read them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from numpy.typing import ArrayLike, NDArray

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


def _png(fig: Figure, metadata: dict[str, str] | None = None) -> bytes:
    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf, metadata=metadata)
    return buf.getvalue()


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
    Shown as stored (rows down, columns right), like a DICOM viewer; ``orientation`` (the
    ImageOrientationPatient row and column vectors) adds L/R, A/P, H/F markers at the edges.
    ``grey`` draws ``values`` itself in grey (the high-b DWI image) with no overlay. PNG text
    chunks: ``Title``, ``Slice`` (0-based index) and ``ROI`` (confirmed / unconfirmed / unknown).
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
    norm = Normalize(vmin=vmin, vmax=vmax)
    if grey:
        cmap, underlay = "gray", None

    fig = Figure(figsize=size_inches, dpi=_DPI)
    ax = fig.add_subplot()
    if underlay is not None:
        anat = np.asarray(underlay, dtype=np.float64)[k]
        glo, ghi = _grey_window(anat)
        ax.imshow(anat, cmap="gray", vmin=glo, vmax=ghi, interpolation="nearest")
    ax.imshow(
        np.ma.masked_where(~shown, img),
        cmap=cmap,
        norm=norm,
        alpha=alpha if underlay is not None else 1.0,
        interpolation="nearest",
    )
    if roi is not None and np.asarray(roi)[k].any():
        ax.contour(
            np.asarray(roi)[k].astype(float), levels=[0.5], colors=_ROI_COLOUR, linewidths=1.2
        )
    full_title = map_slice_title(title, k, arr.shape[0], roi_confirmed=roi_confirmed)
    ax.set_title(
        full_title, fontsize=10, color="black" if roi_confirmed is not False else "#b00000"
    )
    ax.set_axis_off()
    if orientation is not None:
        marks = orientation_labels(*orientation)
        for edge, x, y, ha, va in (
            ("left", 0.01, 0.5, "left", "center"),
            ("right", 0.99, 0.5, "right", "center"),
            ("top", 0.5, 0.99, "center", "top"),
            ("bottom", 0.5, 0.01, "center", "bottom"),
        ):
            ax.text(x, y, marks[edge], ha=ha, va=va, color="#ffd400", fontsize=12,
                    fontweight="bold", transform=ax.transAxes)  # fmt: skip
    # A solid colour bar (not the semi-transparent overlay's colours) reads values reliably.
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=8)
    if unit_label:
        cb.set_label(unit_label, fontsize=9)
    fig.tight_layout()
    status = {True: "confirmed", False: "unconfirmed", None: "unknown"}[roi_confirmed]
    return _png(fig, {"Title": full_title, "Slice": str(k), "ROI": status})


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
    """Histogram of the ROI values on the same fixed-bin-size grid the entropy used."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    fig = Figure(figsize=size_inches, dpi=_DPI)
    ax = fig.add_subplot()
    if x.size:
        first = np.floor((x.min() - bin_min) / bin_width)
        last = np.floor((x.max() - bin_min) / bin_width) + 1
        n_edges = int(min(last - first + 1, 2001))
        edges = bin_min + (first + np.arange(n_edges)) * bin_width
        ax.hist(x * scale, bins=edges * scale, color="steelblue", edgecolor="none")
    else:
        ax.text(0.5, 0.5, "no voxels", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("voxels", fontsize=8)
    ax.tick_params(labelsize=7)
    if annotations:
        text = "\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                         for k, v in annotations.items())  # fmt: skip
        ax.text(0.98, 0.95, text, ha="right", va="top", fontsize=7, transform=ax.transAxes)
    fig.tight_layout()
    return _png(fig)


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
        for k in slices:
            out[f"{name}_slice_{k:03d}.png"] = map_slice_png(
                maps[name],
                roi,
                underlay=underlay,
                fitted=shown[name],
                slice_index=k,
                title=label,
                roi_confirmed=roi_confirmed,
                scale=scale,
                unit_label=f"{label} ({unit})",
                vmin=lo,
                vmax=hi,
                size_inches=big,
                orientation=orientation,
            )
        out[f"{name}_slice.png"] = map_slice_png(
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
