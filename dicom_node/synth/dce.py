"""The synthetic study's dynamic contrast-enhanced (DCE) series, on its own grid.

A real breast protocol acquires DCE as a fat-suppressed 3-D T1-weighted gradient echo at a finer
resolution than the DWI (here 2 mm slices and ≈ 1.25 mm pixels against 4 mm and 1.75 mm), in the
same Frame of Reference. The truth (``phantom.dce_maps``) is defined on the phantom's grid and
sampled onto the DCE grid by patient coordinates (trilinear), then each phase gets its own
Rician noise. The readers therefore meet what they would in a real study: another matrix,
another slice thickness, registered only through the patient coordinate system.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from dicom_node.analysis.companions import resample_linear
from dicom_node.series.volume import Geometry

from .phantom import Phantom, add_rician_noise, dce_maps, rng_stream

__all__ = ["DCE_FGT_PRE", "DceSeries", "dce_geometry", "dce_series"]

#: Pre-contrast signal of fibroglandular tissue: the DCE noise σ is DCE_FGT_PRE / SNR.
DCE_FGT_PRE = 300.0


def dce_geometry(dwi: Geometry, *, in_plane: float = 1.4, through_plane: float = 2.0) -> Geometry:
    """The DCE grid covering the DWI's field of view: ``in_plane``× the matrix, slices
    ``through_plane``× thinner (so different pixel size, slice thickness and origin)."""
    slices, rows, cols = dwi.shape
    n_rows, n_cols = round(rows * in_plane), round(cols * in_plane)
    n_slices = max(1, round(slices * through_plane))
    fov = (slices * dwi.slice_spacing, rows * dwi.row_spacing, cols * dwi.col_spacing)
    spacing = (fov[0] / n_slices, round(fov[1] / n_rows, 3), round(fov[2] / n_cols, 3))
    # first voxel centre: half a new voxel inside the DWI's outer voxel edge
    corner = np.asarray(dwi.index_to_patient(np.array([-0.5, -0.5, -0.5])))
    normal = dwi.normal
    col_dir = np.asarray(dwi.col_dir, float)
    row_dir = np.asarray(dwi.row_dir, float)
    origin = corner + 0.5 * (spacing[0] * normal + spacing[1] * col_dir + spacing[2] * row_dir)
    return Geometry(
        shape=(n_slices, n_rows, n_cols),
        origin=(round(float(origin[0]), 4), round(float(origin[1]), 4), round(float(origin[2]), 4)),
        row_dir=dwi.row_dir,
        col_dir=dwi.col_dir,
        row_spacing=spacing[1],
        col_spacing=spacing[2],
        slice_spacing=round(spacing[0], 4),
        frame_of_reference_uid=dwi.frame_of_reference_uid,
    )


class DceSeries:
    """Noisy pre- and first post-contrast phases on the DCE grid, with the pattern drawn."""

    def __init__(
        self,
        geometry: Geometry,
        pre: NDArray[np.float64],
        post: NDArray[np.float64],
        pattern: str,
    ) -> None:
        self.geometry = geometry
        self.pre = pre
        self.post = post
        self.pattern = pattern

    @property
    def subtraction(self) -> NDArray[np.float64]:
        """Post − pre, clipped at 0 (scanners store subtraction images unsigned)."""
        return np.clip(self.post - self.pre, 0.0, None)


def dce_series(
    phantom: Phantom, *, seed: int, snr: float, geometry: Geometry | None = None
) -> DceSeries:
    """The DCE phases of ``phantom`` on ``geometry`` (default :func:`dce_geometry`), with Rician
    noise σ = DCE_FGT_PRE / ``snr`` (``inf``: noise-free); random streams 8 (truth) and 9, 10
    (noise), so writing DCE leaves every other series of the study unchanged."""
    target = geometry or dce_geometry(phantom.geometry)
    truth = dce_maps(phantom, seed=seed)
    sigma = 0.0 if not np.isfinite(snr) else DCE_FGT_PRE / snr
    pre = resample_linear(truth.pre, phantom.geometry, target)
    post = resample_linear(truth.post, phantom.geometry, target)
    return DceSeries(
        geometry=target,
        pre=add_rician_noise(pre, sigma, rng_stream(seed, 9)),
        post=add_rician_noise(post, sigma, rng_stream(seed, 10)),
        pattern=truth.pattern,
    )
