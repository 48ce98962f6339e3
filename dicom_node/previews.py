"""PNG previews for the review app: a map slice with the ROI outline, and the ROI histogram.

Figures are built with matplotlib's object API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``)
so nothing touches pyplot's global state and rendering is thread-safe and headless.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike, NDArray

__all__ = ["best_slice", "histogram_png", "map_slice_png"]

_DPI = 100


def best_slice(roi: NDArray[np.bool_]) -> int:
    """Slice holding the most ROI voxels (the middle slice for an empty ROI)."""
    counts = np.asarray(roi, dtype=bool).reshape(roi.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.any() else roi.shape[0] // 2


def _png(fig: Figure) -> bytes:
    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()


def map_slice_png(
    values: ArrayLike,
    roi: NDArray[np.bool_] | None = None,
    *,
    slice_index: int | None = None,
    title: str = "",
    scale: float = 1.0,
    unit_label: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    size_inches: tuple[float, float] = (4.0, 4.0),
) -> bytes:
    """One slice of a parameter map (times ``scale``, e.g. 1e3 for 10⁻³ mm²/s) with the ROI
    outlined in red. Shown as stored (rows down, columns right), like a DICOM viewer."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"map must be 3-D (slice, row, column), got {arr.shape}")
    k = best_slice(roi) if slice_index is None and roi is not None else slice_index
    k = arr.shape[0] // 2 if k is None else int(k)
    if not 0 <= k < arr.shape[0]:
        raise ValueError(f"slice {k} outside 0..{arr.shape[0] - 1}")
    img = arr[k] * scale
    fig = Figure(figsize=size_inches, dpi=_DPI)
    ax = fig.add_subplot()
    im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if roi is not None and np.asarray(roi)[k].any():
        ax.contour(np.asarray(roi)[k].astype(float), levels=[0.5], colors="red", linewidths=1.0)
    ax.set_title(f"{title} (slice {k})" if title else f"slice {k}", fontsize=9)
    ax.set_axis_off()
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if unit_label:
        cb.set_label(unit_label, fontsize=8)
    fig.tight_layout()
    return _png(fig)


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
