"""Digital bilateral breast phantom with known DKI parameters, and the DKI signal model.

Anatomy lives in DICOM patient coordinates (LPS, mm; ``dicom_node.series.volume`` conventions): x to the
patient's left, y posterior, z superior. Both breasts hang anterior (y < chest wall) of an
elliptical thorax whose lungs are dark. Per tissue the phantom carries S0 (b = 0 signal, arbitrary
units), Dapp (mm²/s) and Kapp (unitless) with mild, spatially smooth heterogeneity; values follow
``notes/dki-and-features.md`` ("Typical breast values"). HER2 status is deliberately absent: the
phantom is imaging only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from dicom_node.series.volume import Geometry
from models.contract import Laterality

__all__ = [
    "DK_MAX",
    "S0_FGT_NOMINAL",
    "DceMaps",
    "Laterality",
    "LesionType",
    "Phantom",
    "TissueLabel",
    "add_rician_noise",
    "dce_maps",
    "dki_signal",
    "make_phantom",
    "rng_stream",
]

#: Nominal b = 0 signal of fibroglandular tissue; the noise σ is defined against it (σ = S0/SNR).
S0_FGT_NOMINAL = 1000.0
#: Upper bound on Dapp·Kapp (mm²/s) so that S(b) keeps falling up to b = 2000 s/mm²
#: (the model is valid for b < 3/(Dapp·Kapp); 2000 · 1.35e-3 = 2.7 < 3).
DK_MAX = 1.35e-3


class TissueLabel(IntEnum):
    """Voxel classes stored in ``truth.npz`` ``labels``."""

    BACKGROUND = 0  # air and lungs
    FAT = 1
    FGT = 2  # fibroglandular tissue
    MUSCLE = 3  # chest wall, heart and mediastinum
    TUMOUR = 4


class LesionType(StrEnum):
    """BI-RADS MRI lesion type of the synthetic cancer."""

    MASS = "mass"
    NME = "nme"  # non-mass enhancement, segmental and clumped


@dataclass(frozen=True)
class _TissueValues:
    s0: float
    dapp: float  # mm²/s
    kapp: float
    t2w: float  # T2-weighted TSE signal (no fat suppression)
    spread: float  # relative std of the smooth heterogeneity


# Fat is suppressed in DWI (S0 near zero) but bright on the non-fat-suppressed T2 series.
_BASE: dict[TissueLabel, _TissueValues] = {
    TissueLabel.BACKGROUND: _TissueValues(0.0, 0.0, 0.0, 0.0, 0.0),
    TissueLabel.FAT: _TissueValues(30.0, 0.05e-3, 0.0, 700.0, 0.05),
    TissueLabel.FGT: _TissueValues(S0_FGT_NOMINAL, 2.1e-3, 0.40, 300.0, 0.05),
    TissueLabel.MUSCLE: _TissueValues(350.0, 1.5e-3, 0.55, 180.0, 0.05),
    TissueLabel.TUMOUR: _TissueValues(1200.0, 1.2e-3, 0.90, 450.0, 0.08),
}


@dataclass(frozen=True)
class Phantom:
    """Ground truth on a ``(slices, rows, columns)`` grid described by ``geometry``."""

    geometry: Geometry
    labels: NDArray[np.uint8]
    s0: NDArray[np.float64]
    dapp: NDArray[np.float64]  # mm²/s
    kapp: NDArray[np.float64]
    t2w: NDArray[np.float64]
    lesion: LesionType
    laterality: Laterality
    tumour_centre_mm: tuple[float, float, float]
    #: Necrotic core of the tumour (``make_phantom(necrotic_core=True)``), else None.
    core: NDArray[np.bool_] | None = None
    #: NME only: how densely cancer fills each tumour voxel, in [0.15, 1] (else None).
    involvement: NDArray[np.float64] | None = None

    @property
    def tumour_mask(self) -> NDArray[np.bool_]:
        return np.asarray(self.labels == TissueLabel.TUMOUR)


def rng_stream(seed: int, stream: int, *extra: int) -> np.random.Generator:
    """An independent stream per purpose, so one choice (say lesion type) leaves others alone."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *extra]))


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float, spacing: tuple[float, ...]
) -> NDArray[np.float64]:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(
        rng.standard_normal(shape), [sigma_mm / s for s in spacing], mode="reflect"
    )
    std = float(field.std())
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _patient_grid(geometry: Geometry) -> tuple[NDArray[np.float64], ...]:
    """Patient x, y, z (mm) of every voxel centre, each shaped like the grid."""
    k, i, j = np.meshgrid(*(np.arange(n, dtype=float) for n in geometry.shape), indexing="ij")
    a = geometry.affine
    return tuple(a[r, 0] * k + a[r, 1] * i + a[r, 2] * j + a[r, 3] for r in range(3))


#: Necrotic core relative to the tumour's own means: higher Dapp, lower Kapp (free water).
CORE_DAPP_FACTOR = 1.5
CORE_KAPP_FACTOR = 0.65


def make_phantom(
    geometry: Geometry, *, seed: int, lesion: LesionType | str, necrotic_core: bool = False
) -> Phantom:
    """Build the phantom for ``seed``; the anatomy and laterality depend on the seed only.

    ``necrotic_core`` gives the tumour known internal structure (for the feature benchmark: a
    denoiser must not smooth it away): with depth t = distance to the tumour edge / its maximum,
    Dapp rises and Kapp falls smoothly from the rim (t ≤ 0.3, unchanged) to the necrotic core
    (t ≥ 0.7: Dapp × 1.5, Kapp × 0.65). A ramp, not a step, so the histogram stays continuous
    and its median well defined. ``Phantom.core`` is the inner half (t ≥ 0.5). No random
    numbers are drawn, so every other map and the noise stay as without it.

    The tumour is placed in the fibroglandular tissue of the chosen breast: a mass is a compact
    blob 12–20 mm across with an irregular (noise-perturbed) margin; NME is a segmental cone
    pointing at the nipple, filled with clumped foci whose contrast fades from their centres to
    their margins (see ``_blend_nme``: NME is cancer interspersed with normal gland, not a
    uniformly bright blob).
    """
    lesion = LesionType(lesion)
    shape = geometry.shape
    spacing = (geometry.slice_spacing, geometry.row_spacing, geometry.col_spacing)
    x, y, z = _patient_grid(geometry)

    anatomy = rng_stream(seed, 1)
    laterality = Laterality.RIGHT if anatomy.random() < 0.5 else Laterality.LEFT
    chest_y = -40.0  # anterior surface of the chest wall
    half_sep = anatomy.uniform(80.0, 90.0)
    ax, ay, az = anatomy.uniform(58, 70), anatomy.uniform(80, 100), anatomy.uniform(60, 75)
    density = anatomy.uniform(0.3, 0.6)  # share of the glandular zone that is FGT

    labels = np.zeros(shape, np.uint8)
    thorax = ((x / 150.0) ** 2 + ((y - 60.0) / 100.0) ** 2) <= 1.0
    body = ((x / 162.0) ** 2 + ((y - 60.0) / 112.0) ** 2) <= 1.0  # 12 mm subcutaneous fat
    lungs = (((np.abs(x) - 72.0) / 58.0) ** 2 + ((y - 70.0) / 70.0) ** 2) <= 1.0
    labels[body] = TissueLabel.FAT
    labels[thorax] = TissueLabel.MUSCLE
    labels[thorax & lungs] = TissueLabel.BACKGROUND

    # Normalised ellipsoid radius for each breast; the patient's right breast is at x < 0.
    centres = {Laterality.RIGHT: -half_sep, Laterality.LEFT: half_sep}
    radius = {
        side: np.sqrt(((x - cx) / ax) ** 2 + ((y - chest_y) / ay) ** 2 + (z / az) ** 2)
        for side, cx in centres.items()
    }
    # Breasts lie on the chest wall: anterior of it, wrapping its curve towards the axillae.
    anterior = ~thorax & (y < chest_y + 25.0)
    gland_noise = _smooth_noise(anatomy, shape, 4.0, spacing)
    for r in radius.values():
        breast = anterior & (r <= 1.0)
        labels[breast] = TissueLabel.FAT
        # Glands lie under a subcutaneous fat layer, denser towards the chest wall centre.
        zone = breast & (r <= 0.85) & (y < chest_y - 4.0)
        score = gland_noise + 1.2 * (0.85 - r)
        threshold = np.quantile(score[zone], 1.0 - density) if zone.any() else np.inf
        labels[zone & (score >= threshold)] = TissueLabel.FGT

    fgt_side = (labels == TissueLabel.FGT) & (radius[laterality] <= 1.0)
    tumour, centre, involvement = _make_tumour(
        rng_stream(seed, 3, list(LesionType).index(lesion)),
        lesion,
        (x, y, z),
        spacing,
        fgt_side,
        radius[laterality],
        nipple=(centres[laterality], chest_y - ay, 0.0),
    )
    labels[tumour & (labels != TissueLabel.BACKGROUND)] = TissueLabel.TUMOUR

    s0, dapp, kapp, t2w = _tissue_maps(
        rng_stream(seed, 4, list(LesionType).index(lesion)), labels, spacing
    )
    if involvement is not None:
        _blend_nme(labels, involvement, s0, dapp, kapp)
    core = None
    if necrotic_core:
        depth = ndimage.distance_transform_edt(labels == TissueLabel.TUMOUR, sampling=spacing)
        t = depth / max(float(depth.max()), 1e-9)
        core = t >= 0.5
        ramp = np.clip((t - 0.3) / 0.4, 0.0, 1.0)
        inner = ramp > 0
        dapp[inner] = np.minimum(dapp[inner] * (1.0 + (CORE_DAPP_FACTOR - 1.0) * ramp[inner]), 3e-3)
        kfac = 1.0 + (CORE_KAPP_FACTOR - 1.0) * ramp[inner]
        kapp[inner] = np.minimum(kapp[inner] * kfac, DK_MAX / dapp[inner])
    return Phantom(
        geometry=geometry,
        labels=labels,
        s0=s0,
        dapp=dapp,
        kapp=kapp,
        t2w=t2w,
        lesion=lesion,
        laterality=laterality,
        tumour_centre_mm=centre,
        core=core,
        involvement=None
        if involvement is None
        else np.where(labels == TissueLabel.TUMOUR, involvement, 0.0),
    )


def _make_tumour(
    rng: np.random.Generator,
    lesion: LesionType,
    xyz: tuple[NDArray[np.float64], ...],
    spacing: tuple[float, float, float],
    fgt_side: NDArray[np.bool_],
    breast_radius: NDArray[np.float64],
    *,
    nipple: tuple[float, float, float],
) -> tuple[NDArray[np.bool_], tuple[float, float, float], NDArray[np.float64] | None]:
    """Tumour mask, centre (mm) and, for NME, each voxel's involvement in [0.15, 1].

    The centre is an FGT voxel well inside the breast.
    """
    x, y, z = xyz
    k_mid = fgt_side.shape[0] // 2
    slab = np.zeros_like(fgt_side)
    margin = max(1, int(np.ceil(12.0 / spacing[0])))
    slab[max(0, k_mid - margin) : k_mid + margin + 1] = True
    # away from the skin and at least 15 mm in front of the chest wall (y = -40 mm)
    core = (breast_radius >= 0.15) & (breast_radius <= 0.7) & (y < -55.0)
    candidates = np.flatnonzero(fgt_side & slab & core)
    if candidates.size == 0:
        candidates = (
            np.flatnonzero(fgt_side) if fgt_side.any() else np.flatnonzero(breast_radius <= 0.7)
        )
    if candidates.size == 0:
        raise ValueError("the field of view holds no breast tissue; enlarge matrix or slices")
    flat = int(rng.choice(candidates))
    c = np.array([x.flat[flat], y.flat[flat], z.flat[flat]])
    inside = breast_radius <= 0.95
    if lesion is LesionType.MASS:
        r0 = rng.uniform(6.0, 10.0)
        stretch = rng.uniform(0.8, 1.25, size=3)
        dist = np.sqrt(
            ((x - c[0]) / stretch[0]) ** 2
            + ((y - c[1]) / stretch[1]) ** 2
            + ((z - c[2]) / stretch[2]) ** 2
        )
        rough = _smooth_noise(rng, x.shape, 3.0, spacing)
        mask = inside & (dist / r0 + 0.25 * rough < 1.0)
        if not mask.any():  # coarse grids: keep at least the centre voxel
            mask.flat[flat] = True
        lab, n = ndimage.label(mask)
        if n > 1:  # keep the blob holding the centre (or else the largest one)
            keep = int(lab.flat[flat]) or 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
            mask = lab == keep
        involvement = None
    else:
        # Segmental: a cone with its apex at the nipple, axis through the chosen centre.
        axis = c - np.asarray(nipple)
        axis /= np.linalg.norm(axis)
        rel = np.stack([x - nipple[0], y - nipple[1], z - nipple[2]], axis=-1)
        along = rel @ axis
        cos_angle = along / np.maximum(np.linalg.norm(rel, axis=-1), 1e-6)
        half_angle = np.deg2rad(rng.uniform(14.0, 20.0))
        length = float(np.linalg.norm(c - np.asarray(nipple)))
        segment = (
            inside
            & (cos_angle >= np.cos(half_angle))
            & (along >= max(5.0, length - 20.0))
            & (along <= length + 20.0)
        )
        clumps = _smooth_noise(rng, x.shape, 2.5, spacing)
        mask = segment & (clumps > 0.35)
        lab, n = ndimage.label(mask)
        if n:
            sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
            mask = np.isin(lab, np.flatnonzero(sizes >= 3) + 1)
        if not mask.any():
            mask = segment
        if not mask.any():
            mask.flat[flat] = True
        # How densely cancer fills the voxel: full at a focus' centre, 15 % at its margin.
        involvement = 0.15 + 0.85 * np.clip((clumps - 0.35) / NME_FULL_ABOVE, 0.0, 1.0)
    return mask.astype(bool), (float(c[0]), float(c[1]), float(c[2])), involvement


#: Clump-field excess over the NME threshold at which a voxel is wholly cancer.
NME_FULL_ABOVE = 0.6


def _blend_nme(
    labels: NDArray[np.uint8],
    involvement: NDArray[np.float64],
    s0: NDArray[np.float64],
    dapp: NDArray[np.float64],
    kapp: NDArray[np.float64],
) -> None:
    """Mix NME voxels with the surrounding gland by their involvement (in place).

    Why: non-mass enhancement is cancer spread through normal fibroglandular tissue, so on DWI
    its foci are bright at their centres and fade into the gland; a uniformly bright segment
    would make the automatic ROI's task unrealistically easy. Parameters are mixed linearly
    with the patient's FGT means; no random numbers are drawn.
    """
    tumour = labels == TissueLabel.TUMOUR
    fgt = labels == TissueLabel.FGT
    if not tumour.any() or not fgt.any():
        return
    w = involvement[tumour]
    for arr in (s0, dapp, kapp):
        arr[tumour] = w * arr[tumour] + (1.0 - w) * float(arr[fgt].mean())
    kapp[tumour] = np.minimum(kapp[tumour], DK_MAX / np.maximum(dapp[tumour], 1e-12))


def _tissue_maps(
    rng: np.random.Generator, labels: NDArray[np.uint8], spacing: tuple[float, float, float]
) -> tuple[NDArray[np.float64], ...]:
    """S0, Dapp, Kapp and T2w maps: per-patient tissue means plus smooth heterogeneity."""
    shape = labels.shape
    # Per-patient means (notes/dki-and-features.md): cancer Dapp 1.20 ± 0.31e-3, Kapp 0.88 ± 0.17
    # — drawn with a narrower spread so every seed stays a plausible, fittable cancer.
    means = dict(_BASE)
    means[TissueLabel.FGT] = _TissueValues(
        S0_FGT_NOMINAL, rng.uniform(2.0e-3, 2.2e-3), rng.uniform(0.35, 0.45), 300.0, 0.05
    )
    means[TissueLabel.TUMOUR] = _TissueValues(
        rng.uniform(1050.0, 1300.0),
        float(np.clip(rng.normal(1.2e-3, 0.12e-3), 0.9e-3, 1.5e-3)),
        float(np.clip(rng.normal(0.9, 0.06), 0.75, 1.05)),
        rng.uniform(380.0, 520.0),
        0.08,
    )
    fields = [_smooth_noise(rng, shape, 3.0, spacing) for _ in range(4)]
    s0 = np.zeros(shape)
    dapp = np.zeros(shape)
    kapp = np.zeros(shape)
    t2w = np.zeros(shape)
    for label, v in means.items():
        m = labels == label
        s0[m] = v.s0 * (1.0 + 0.5 * v.spread * fields[0][m])
        dapp[m] = v.dapp * (1.0 + v.spread * fields[1][m])
        kapp[m] = v.kapp * (1.0 + v.spread * fields[2][m])
        t2w[m] = v.t2w * (1.0 + 0.5 * v.spread * fields[3][m])
    np.clip(s0, 0.0, None, out=s0)
    np.clip(dapp, 0.0, 3.0e-3, out=dapp)
    kapp = np.clip(kapp, 0.0, np.where(dapp > 0, DK_MAX / np.maximum(dapp, 1e-12), 0.0))
    np.clip(t2w, 0.0, None, out=t2w)
    return s0, dapp, kapp, t2w


def dki_signal(
    s0: NDArray[np.floating],
    dapp: NDArray[np.floating],
    kapp: NDArray[np.floating],
    bvals: NDArray[np.floating] | list[float],
) -> NDArray[np.float64]:
    """S(b) = S0·exp(−b·Dapp + b²·Dapp²·Kapp/6) (Jensen 2005), b on a new last axis."""
    b = np.asarray(bvals, float)
    d = np.asarray(dapp, float)[..., None]
    k = np.asarray(kapp, float)[..., None]
    return np.asarray(s0, float)[..., None] * np.exp(-b * d + (b * d) ** 2 * k / 6.0)


def add_rician_noise(
    signal: NDArray[np.floating], sigma: float, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Magnitude of the signal plus complex Gaussian noise of per-channel std ``sigma``.

    Both channels are always drawn, so for a given seed the noise pattern is the same at any SNR;
    ``sigma == 0`` returns the noise-free signal.
    """
    s = np.asarray(signal, float)
    re = rng.standard_normal(s.shape)
    im = rng.standard_normal(s.shape)
    if sigma <= 0:
        return s.copy()
    return np.hypot(s + sigma * re, sigma * im)


@dataclass(frozen=True)
class DceMaps:
    """Fat-suppressed T1-weighted DCE truth on the phantom grid: pre-contrast signal and the
    relative enhancement of the first post-contrast phase ((post − pre) / pre)."""

    pre: NDArray[np.float64]
    enhancement: NDArray[np.float64]
    #: Mass only: "rim" or "homogeneous"; NME: "clumped".
    pattern: str

    @property
    def post(self) -> NDArray[np.float64]:
        return self.pre * (1.0 + self.enhancement)

    @property
    def subtraction(self) -> NDArray[np.float64]:
        return self.pre * self.enhancement


#: Pre-contrast fat-suppressed T1w signal per tissue (arbitrary units).
_T1_PRE: dict[TissueLabel, float] = {
    TissueLabel.BACKGROUND: 0.0,
    TissueLabel.FAT: 60.0,
    TissueLabel.FGT: 300.0,
    TissueLabel.MUSCLE: 260.0,
    TissueLabel.TUMOUR: 280.0,
}


def dce_maps(phantom: Phantom, *, seed: int) -> DceMaps:
    """Early post-contrast enhancement of the phantom (its own random stream: nothing else moves).

    Why these values (BI-RADS MRI lexicon; Kuhl, Radiology 2007): cancers enhance strongly in
    the early phase (relative enhancement 100–200 %), masses either homogeneously or with a rim
    (a less perfused centre); non-mass enhancement is clumped foci in a segment, each enhancing
    with its cancer involvement; normal gland shows mild background parenchymal enhancement
    (5–25 %), muscle and heart moderate, fat almost none.
    """
    rng = rng_stream(seed, 8)
    labels = phantom.labels
    spacing = (
        phantom.geometry.slice_spacing,
        phantom.geometry.row_spacing,
        phantom.geometry.col_spacing,
    )
    texture = _smooth_noise(rng, labels.shape, 3.0, spacing)
    pre = np.zeros(labels.shape)
    for label, value in _T1_PRE.items():
        pre[labels == label] = value
    pre *= 1.0 + 0.04 * texture
    bpe = rng.uniform(0.05, 0.25)
    enh = np.zeros(labels.shape)
    enh[labels == TissueLabel.FAT] = 0.03
    enh[labels == TissueLabel.MUSCLE] = 0.4
    fgt = labels == TissueLabel.FGT
    enh[fgt] = bpe * (1.0 + 0.3 * texture[fgt])
    tumour = phantom.tumour_mask
    peak = rng.uniform(1.2, 2.0)
    if phantom.lesion is LesionType.NME and phantom.involvement is not None:
        pattern = "clumped"
        w = phantom.involvement[tumour]
        enh[tumour] = bpe + w * (peak - bpe)
        pre[tumour] = w * _T1_PRE[TissueLabel.TUMOUR] + (1.0 - w) * _T1_PRE[TissueLabel.FGT]
    else:
        pattern = "rim" if rng.random() < 0.5 else "homogeneous"
        if pattern == "rim" and tumour.any():
            depth = ndimage.distance_transform_edt(tumour, sampling=spacing)
            rim = np.exp(-np.maximum(depth - 1.0, 0.0) / 2.5)  # 1 at the edge, falls inwards
            enh[tumour] = peak * (0.35 + 0.65 * rim[tumour])
        else:
            enh[tumour] = peak * (1.0 + 0.08 * texture[tumour])
    enh[labels == TissueLabel.BACKGROUND] = 0.0
    return DceMaps(pre=pre, enhancement=np.clip(enh, 0.0, None), pattern=pattern)
