"""Synthetic breast-like DKI phantom with known truth (shared by the DKI tests and the benchmark).

Tissue values follow /work/shared/notes/dki-and-features.md: fibroglandular tissue Dapp ≈ 2.2
×10⁻³ mm²/s, Kapp ≈ 0.4; cancer 1.2 / 0.88 (Wu et al. 2014); fat-suppressed fat with a low
signal; air background. Noise is Rician: |S + n₁ + i·n₂| with σ = S0(FGT)/SNR.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_node.series.volume import Geometry

BVALS = np.array([0.0, 50.0, 800.0, 1000.0, 1500.0, 2000.0])
S0_TISSUE = 1000.0


class Tissue(IntEnum):
    BACKGROUND = 0
    FAT = 1
    FGT = 2
    TUMOUR = 3


#: (S0 relative to S0_TISSUE, Dapp mm²/s, Kapp, relative spread of D and K)
TISSUE_VALUES: dict[Tissue, tuple[float, float, float, float]] = {
    Tissue.FAT: (0.25, 0.6e-3, 0.8, 0.10),
    Tissue.FGT: (1.0, 2.2e-3, 0.40, 0.08),
    Tissue.TUMOUR: (1.0, 1.2e-3, 0.88, 0.10),
}


@dataclass
class Phantom:
    signal: NDArray[np.float32]  # (z, y, x, b)
    noiseless: NDArray[np.float32]
    dapp: NDArray[np.float64]
    kapp: NDArray[np.float64]
    s0: NDArray[np.float64]
    tissue: NDArray[np.int8]
    sigma: float
    bvals: NDArray[np.float64]


def dki_signal(
    s0: NDArray[np.float64], d: NDArray[np.float64], k: NDArray[np.float64], b: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Jensen's model with b on the last axis."""
    bb = b.reshape((1,) * s0.ndim + (-1,))
    dd = d[..., None]
    return s0[..., None] * np.exp(-bb * dd + bb * bb * dd * dd * k[..., None] / 6.0)


def rician(
    clean: NDArray[np.float64], sigma: float, rng: np.random.Generator
) -> NDArray[np.float64]:
    n1 = rng.normal(0.0, sigma, clean.shape)
    n2 = rng.normal(0.0, sigma, clean.shape)
    return np.sqrt((clean + n1) ** 2 + n2**2)


def make_phantom(
    shape: tuple[int, int, int] = (8, 64, 64),
    *,
    bvals: NDArray[np.float64] = BVALS,
    snr: float = 30.0,
    seed: int = 0,
    lesion_radius_frac: float = 0.09,
    lesion_side: str = "L",
) -> Phantom:
    """Two half-ellipsoid breasts in air, FGT core with a fat rim and one tumour sphere.

    Axis order is (slice, row, column); column index increases towards patient left when the
    geometry uses row_dir = (1, 0, 0), so ``lesion_side="L"`` plants the tumour at high columns.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.meshgrid(
        (np.arange(nz) + 0.5) / nz, (np.arange(ny) + 0.5) / ny, (np.arange(nx) + 0.5) / nx,
        indexing="ij",
    )  # fmt: skip
    tissue = np.zeros(shape, dtype=np.int8)
    centres = ((0.27, 0.25), (0.73, 0.25))  # (x, y) of each breast base (chest wall at y≈0.2)
    for cx, cy in centres:
        r = ((x - cx) / 0.22) ** 2 + ((y - cy) / 0.55) ** 2 + ((z - 0.5) / 0.6) ** 2
        breast = (r < 1.0) & (y > cy - 0.05)
        tissue[breast] = Tissue.FAT
        tissue[breast & (r < 0.55)] = Tissue.FGT
    cx = 0.73 if lesion_side == "L" else 0.27
    lr = lesion_radius_frac
    if lr > 0:  # sphere of radius lr·nx voxels in-plane and through-plane
        r_vox = lr * nx
        les = (((x - cx) * nx) ** 2 + ((y - 0.45) * ny) ** 2) / r_vox**2
        les = les + ((z - 0.5) * nz / max(r_vox, 1.5)) ** 2
        tissue[les < 1.0] = Tissue.TUMOUR
    s0 = np.zeros(shape)
    d = np.zeros(shape)
    k = np.zeros(shape)
    for t, (rel_s0, dv, kv, spread) in TISSUE_VALUES.items():
        sel = tissue == t
        n = int(sel.sum())
        s0[sel] = rel_s0 * S0_TISSUE
        d[sel] = np.clip(rng.normal(dv, spread * dv, n), 0.2e-3, 3.2e-3)
        k[sel] = np.clip(rng.normal(kv, spread * kv, n), 0.05, 2.0)
    # Keep the model physical over the sampled b range (Dapp·Kapp·b_max < 3).
    bmax = float(np.max(bvals))
    k = np.minimum(k, 0.9 * 3.0 / np.maximum(d * bmax, 1e-12))
    clean = dki_signal(s0, d, k, bvals)
    sigma = S0_TISSUE / snr
    noisy = rician(clean, sigma, rng)
    return Phantom(
        signal=noisy.astype(np.float32),
        noiseless=clean.astype(np.float32),
        dapp=d,
        kapp=k,
        s0=s0,
        tissue=tissue,
        sigma=sigma,
        bvals=np.asarray(bvals, dtype=np.float64),
    )


# ------------------------------------------------------------------ DICOM builders (for SEG tests)


def axial_geometry(
    shape: tuple[int, int, int],
    *,
    spacing: tuple[float, float, float] = (4.0, 2.0, 2.0),
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    frame_of_reference_uid: str = "",
) -> Geometry:
    """Axial grid (rows → +y posterior, columns → +x patient left) centred on ``centre``."""
    nz, ny, nx = shape
    ds, dr, dc = spacing
    origin = (
        centre[0] - (nx - 1) / 2 * dc,
        centre[1] - (ny - 1) / 2 * dr,
        centre[2] - (nz - 1) / 2 * ds,
    )
    return Geometry(
        shape=shape,
        origin=origin,
        row_dir=(1.0, 0.0, 0.0),
        col_dir=(0.0, 1.0, 0.0),
        row_spacing=dr,
        col_spacing=dc,
        slice_spacing=ds,
        frame_of_reference_uid=frame_of_reference_uid,
    )


def mr_series(
    geometry: Geometry,
    pixels: NDArray[np.floating] | None = None,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Dataset]:
    """Single-frame MR Image Storage datasets for every slice of ``geometry`` (pydicom only)."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    nz, ny, nx = geometry.shape
    if pixels is None:
        pixels = np.zeros(geometry.shape)
    out = []
    for k in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = geometry.frame_of_reference_uid
        ds.Modality = "MR"
        ds.PatientID = "TEST-1"
        ds.PatientName = "Test^Phantom"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyID = "1"
        ds.StudyDate = "20261125"
        ds.StudyTime = "100000"
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "Synthetic"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
        ds.ImagePositionPatient = list(geometry.slice_position(k))
        ds.ImageOrientationPatient = [*geometry.row_dir, *geometry.col_dir]
        ds.PixelSpacing = [geometry.row_spacing, geometry.col_spacing]
        ds.SliceThickness = geometry.slice_spacing
        ds.SpacingBetweenSlices = geometry.slice_spacing
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.clip(pixels[k], 0, 65535).astype(np.uint16).tobytes()
        out.append(ds)
    return out


def make_seg(
    source: list[Dataset],
    masks: NDArray[np.bool_],
    labels: tuple[str, ...] = ("tumour",),
) -> Dataset:
    """A BINARY DICOM SEG (highdicom) of ``masks`` (slices, rows, cols[, segments])."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, label in enumerate(labels)
    ]
    arr = masks.astype(np.uint8)
    return hd.seg.Segmentation(
        source_images=source,
        pixel_array=arr,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Synthetic",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="1",
    )


def sphere_mask(
    geometry: Geometry, centre_xyz: tuple[float, float, float], radius_mm: float
) -> NDArray[np.bool_]:
    """Voxels of ``geometry`` whose centres lie inside a patient-space sphere."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in geometry.shape], indexing="ij")
    idx = np.stack(grids, -1)
    xyz = geometry.index_to_patient(idx.reshape(-1, 3)).reshape(*geometry.shape, 3)
    return np.asarray(np.linalg.norm(xyz - np.asarray(centre_xyz), axis=-1) <= radius_mm)
