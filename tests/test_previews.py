"""Map slice previews: valid PNG of the stated size, anatomy underlay, slice choice, ROI status."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dicom_node.analysis.previews import best_slice, histogram_png, map_slice_png, map_slice_title

PNG = b"\x89PNG\r\n\x1a\n"
SHAPE = (5, 48, 48)


def _decode(png: bytes) -> Image.Image:
    assert png.startswith(PNG)
    img = Image.open(io.BytesIO(png))
    img.load()  # decodes every chunk: raises on a truncated or corrupt file
    return img


def _checkerboard() -> np.ndarray:
    """Anatomy stand-in: 8-voxel black/white squares on every slice."""
    r, c = np.indices(SHAPE[1:])
    board = (((r // 8) + (c // 8)) % 2 * 100.0).astype(np.float32)
    return np.broadcast_to(board, SHAPE).copy()


def _roi() -> np.ndarray:
    """Cross-sections of 4, 36 and 16 voxels on slices 1, 2, 3: the largest is slice 2."""
    roi = np.zeros(SHAPE, dtype=bool)
    roi[1, 22:24, 22:24] = True
    roi[2, 21:27, 21:27] = True
    roi[3, 22:26, 22:26] = True
    return roi


def _dark_grey_fraction(png: bytes) -> float:
    """Share of the figure's pixels that are near-black and colourless (R = G = B)."""
    rgb = np.asarray(_decode(png).convert("RGB")).astype(int)
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    return float(np.mean(grey & (rgb[..., 0] < 60)))


def test_png_is_valid_with_the_requested_size() -> None:
    values = np.full(SHAPE, 1.2e-3)
    png = map_slice_png(values, _roi(), underlay=_checkerboard(), scale=1e3)
    assert _decode(png).size == (500, 440)  # default 5.0 × 4.4 in at 100 dpi
    small = map_slice_png(values, _roi(), size_inches=(3.0, 2.5))
    assert _decode(small).size == (300, 250)
    assert _decode(histogram_png(values.ravel(), bin_width=2.5e-5)).size == (400, 300)


def test_underlay_shows_outside_the_fitted_region() -> None:
    """Where the map was not fitted the b≈0 anatomy must show (not a blank background)."""
    values = np.zeros(SHAPE)
    fitted = np.zeros(SHAPE, dtype=bool)
    fitted[:, 20:28, 20:28] = True
    values[fitted] = 1.0e-3
    kwargs = {"fitted": fitted, "scale": 1e3, "vmin": 0.0, "vmax": 3.0}
    with_anatomy = map_slice_png(values, _roi(), underlay=_checkerboard(), **kwargs)
    without = map_slice_png(values, _roi(), **kwargs)
    # Half of the unfitted squares are black: a large, non-uniform grey area with the underlay.
    assert _dark_grey_fraction(with_anatomy) > 0.15
    assert _dark_grey_fraction(without) < 0.05
    rgb = np.asarray(_decode(with_anatomy).convert("RGB")).astype(int)
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    assert np.std(rgb[..., 0][grey]) > 50  # black and white squares, not one flat tone


def test_slice_is_the_largest_roi_cross_section_and_recorded() -> None:
    roi = _roi()
    assert best_slice(roi) == 2
    assert best_slice(np.zeros(SHAPE, dtype=bool)) == SHAPE[0] // 2
    png = map_slice_png(np.ones(SHAPE), roi, underlay=_checkerboard(), title="Kapp")
    text = _decode(png).text
    assert text["Slice"] == "2"
    assert text["Title"].startswith("Kapp — slice 3 of 5")
    explicit = map_slice_png(np.ones(SHAPE), roi, slice_index=4)
    assert _decode(explicit).text["Slice"] == "4"
    with pytest.raises(ValueError, match="slice"):
        map_slice_png(np.ones(SHAPE), roi, slice_index=5)
    with pytest.raises(ValueError, match="underlay shape"):
        map_slice_png(np.ones(SHAPE), roi, underlay=np.ones((5, 48, 40)))


@pytest.mark.parametrize(("confirmed", "flagged"), [(False, True), (True, False), (None, False)])
def test_title_flags_an_unconfirmed_roi(confirmed: bool | None, flagged: bool) -> None:
    title = map_slice_title("Dapp", 2, 5, roi_confirmed=confirmed)
    assert title.startswith("Dapp — slice 3 of 5")
    assert ("unconfirmed" in title) is flagged
    png = map_slice_png(np.ones(SHAPE), _roi(), title="Dapp", roi_confirmed=confirmed)
    text = _decode(png).text
    assert text["Title"] == title
    assert text["ROI"] == {False: "unconfirmed", True: "confirmed", None: "unknown"}[confirmed]


def test_roi_outline_drawn_in_its_colour_around_the_roi() -> None:
    """The outline is the ROI colour and surrounds the ROI, not the whole image."""
    png = map_slice_png(np.full(SHAPE, 1.0e-3), _roi(), underlay=_checkerboard(), scale=1e3)
    rgb = np.asarray(_decode(png).convert("RGB")).astype(int)
    red = (rgb[..., 0] == 0xFF) & (rgb[..., 1] == 0x2D) & (rgb[..., 2] == 0x2D)
    assert red.sum() > 40
    ys, xs = np.nonzero(red)
    # a 6 × 6 voxel square of a 48 × 48 slice: the outline spans about an eighth of the image
    assert 0.05 * rgb.shape[1] < xs.max() - xs.min() < 0.3 * rgb.shape[1]
    assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 3  # square stays square
    no_roi = map_slice_png(np.full(SHAPE, 1.0e-3), np.zeros(SHAPE, dtype=bool))
    rgb2 = np.asarray(_decode(no_roi).convert("RGB")).astype(int)
    assert not ((rgb2[..., 0] == 0xFF) & (rgb2[..., 1] == 0x2D) & (rgb2[..., 2] == 0x2D)).any()


def _bar_heights(png: bytes) -> np.ndarray:
    """Per pixel column, the number of steelblue (bar) pixels."""
    rgb = np.asarray(_decode(png).convert("RGB")).astype(int)
    bar = (rgb[..., 0] == 70) & (rgb[..., 1] == 130) & (rgb[..., 2] == 180)
    return bar.sum(axis=0)


def test_histogram_bars_follow_the_bin_counts() -> None:
    """Two bins, 30 and 10 voxels: two bars, the first three times as tall; empty → no bars."""
    values = np.array([1.01e-3] * 30 + [1.06e-3] * 10)
    heights = _bar_heights(histogram_png(values, bin_width=5e-5, scale=1e3))
    tall = heights[heights > 0]
    levels = sorted(set(tall.tolist()))
    assert len(levels) == 2
    assert abs(levels[1] / levels[0] - 3.0) < 0.1
    assert (_bar_heights(histogram_png(np.array([]), bin_width=5e-5)) == 0).all()


def test_previews_build_no_matplotlib_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency guard: a matplotlib Figure costs ≈ 0.1 s per preview (26 per analysis)."""
    import matplotlib.figure

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a matplotlib Figure was built")

    monkeypatch.setattr(matplotlib.figure.Figure, "__init__", refuse)
    map_slice_png(
        np.ones(SHAPE), _roi(), underlay=_checkerboard(), orientation=((1, 0, 0), (0, 1, 0))
    )
    histogram_png(np.linspace(0, 1, 50), bin_width=0.1, annotations={"mean": 0.5})
