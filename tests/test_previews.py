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
