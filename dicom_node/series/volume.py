"""Image volumes with their patient-space geometry: the meeting point of reader, fit and ROI.

Array axis order is always ``(slice, row, column[, b])``. Geometry follows DICOM's patient
coordinate system (LPS, millimetres): voxel ``(k, i, j)`` (slice ``k``, row ``i``, column ``j``)
sits at ``origin + j * col_spacing * row_dir + i * row_spacing * col_dir + k * slice_spacing *
normal``, where ``row_dir``/``col_dir`` are the two ImageOrientationPatient vectors (direction of
increasing column index and of increasing row index, PS3.3 C.7.6.2.1.1) and ``origin`` is the
ImagePositionPatient of slice 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Geometry:
    """Where each voxel of a ``(slices, rows, columns)`` grid lies in patient space."""

    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    row_spacing: float  # mm between adjacent rows (PixelSpacing[0])
    col_spacing: float  # mm between adjacent columns (PixelSpacing[1])
    slice_spacing: float  # mm between adjacent slice centres along the normal
    frame_of_reference_uid: str = ""

    @property
    def normal(self) -> NDArray[np.float64]:
        n = np.cross(np.asarray(self.row_dir, float), np.asarray(self.col_dir, float))
        return n / np.linalg.norm(n)

    @property
    def affine(self) -> NDArray[np.float64]:
        """4x4 matrix mapping ``(k, i, j, 1)`` voxel indices to patient ``(x, y, z, 1)``."""
        a = np.eye(4)
        a[:3, 0] = self.normal * self.slice_spacing
        a[:3, 1] = np.asarray(self.col_dir, float) * self.row_spacing
        a[:3, 2] = np.asarray(self.row_dir, float) * self.col_spacing
        a[:3, 3] = np.asarray(self.origin, float)
        return a

    @property
    def voxel_volume_mm3(self) -> float:
        return float(self.row_spacing * self.col_spacing * self.slice_spacing)

    def index_to_patient(self, kij: NDArray[np.floating]) -> NDArray[np.float64]:
        """Voxel indices ``(..., 3)`` as ``(k, i, j)`` to patient coordinates ``(..., 3)``."""
        kij = np.asarray(kij, float)
        return kij @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_index(self, xyz: NDArray[np.floating]) -> NDArray[np.float64]:
        """Patient coordinates ``(..., 3)`` to fractional voxel indices ``(k, i, j)``."""
        inv = np.linalg.inv(self.affine)
        xyz = np.asarray(xyz, float)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def slice_position(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``k``."""
        p = np.asarray(self.origin, float) + k * self.slice_spacing * self.normal
        return (float(p[0]), float(p[1]), float(p[2]))


@dataclass
class DwiVolume:
    """A trace-weighted diffusion series assembled from its headers.

    ``data`` is float32 ``(slices, rows, columns, n_b)`` with one volume per distinct b-value
    (directions already combined into the trace by geometric mean); ``bvals`` holds the exact
    header values in s/mm², ascending, one per last-axis entry.
    """

    data: NDArray[np.float32]
    bvals: NDArray[np.float64]
    geometry: Geometry
    study_instance_uid: str
    series_instance_uid: str
    #: SOPInstanceUID of one source image per slice (the first b volume), for SEG/SR references.
    slice_sop_instance_uids: list[str] = field(default_factory=list)
    vendor: str = ""
    #: Human-readable remarks found while assembling (e.g. "directions combined into trace").
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.data.ndim != 4:
            raise ValueError(f"DWI data must be 4-D (slices, rows, cols, b), got {self.data.shape}")
        if self.data.shape[-1] != len(self.bvals):
            raise ValueError("last axis of data must match the number of b-values")
        if tuple(self.data.shape[:3]) != tuple(self.geometry.shape):
            raise ValueError("data shape does not match its geometry")


@dataclass
class ScalarVolume:
    """A single 3-D image (T2-weighted, a map) with its geometry."""

    data: NDArray[np.floating]
    geometry: Geometry
    series_instance_uid: str = ""
