"""``her2low synth``: write a complete synthetic breast DKI study and its ground truth.

Layout of ``OUT``::

    OUT/dwi/IM00001.dcm …   trace-weighted DWI, one file per (b, slice), vendor b convention
    OUT/t2/IM00001.dcm …    T2-weighted TSE, same Frame of Reference
    OUT/seg/seg.dcm         DICOM SEG of the tumour, referencing the b = 0 DWI images
    OUT/dce/, OUT/dce_sub/  only with ``dce=True``: dynamic T1w (pre + first post-contrast
                            phase) and its subtraction, on their own finer grid (``synth.dce``)
    OUT/truth.npz           s0, dapp (mm²/s), kapp, t2w, labels, tumour_mask, bvals, affine
    OUT/manifest.json       everything a test needs to check a reader (``StudyManifest``)

Noise model: Rician magnitude with per-channel σ = S0_FGT/SNR, where S0_FGT = 1000 is the
nominal b = 0 signal of fibroglandular tissue (``phantom.S0_FGT_NOMINAL``); ``snr=inf`` writes
noise-free images. Random streams are split by purpose: anatomy, laterality and patient depend on
the seed only, so one seed written for three vendors gives one patient, three studies, and the
same pixel values (only headers differ).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.series.bvalues import B0_THRESHOLD
from dicom_node.series.volume import Geometry

from .dce import dce_series
from .dicom_writer import MrParams, PatientInfo, SeriesInfo, StudyInfo, mr_image, quantise, save
from .phantom import (
    S0_FGT_NOMINAL,
    LesionType,
    Phantom,
    TissueLabel,
    add_rician_noise,
    dki_signal,
    make_phantom,
    rng_stream,
)
from .seg import tumour_segmentation
from .vendors import PROFILES, Vendor, apply_diffusion_tags, dwi_instance_numbers

__all__ = [
    "DEFAULT_B_VALUES",
    "ISSUER_OF_PATIENT_ID",
    "MANIFEST_VERSION",
    "STUDY_DESCRIPTION",
    "SeriesEntry",
    "StudyManifest",
    "add_arguments",
    "add_subcommand",
    "cmd_synth",
    "run",
    "study_geometry",
    "write_study",
]

DEFAULT_B_VALUES: tuple[float, ...] = (0.0, 50.0, 800.0, 1000.0, 1500.0, 2000.0)
ISSUER_OF_PATIENT_ID = "HER2LOW-DEMO"
STUDY_DESCRIPTION = "MRI BREAST BILATERAL W/WO CONTRAST"
MANIFEST_VERSION = 1
GENERATOR_VERSION = "0.1.0"
#: Nominal bilateral axial field of view (left-right) in mm; pixels are square.
FOV_LR_MM = 336.0
#: T2 signal of FGT (``phantom``), the reference of the T2 series' SNR.
_T2_FGT = 300.0
_ANTERIOR_EDGE_Y_MM = -150.0
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:her2low-cds:synth")


@dataclass
class SeriesEntry:
    """One written series. ``files`` are relative to the study folder, POSIX style.

    For the DWI series ``files`` and ``sop_instance_uids`` are b-major: entry ``ib * n_slices + k``
    is b-value ``ib`` at slice ``k`` (slice 0 = most inferior, first along the normal).
    """

    role: str
    modality: str
    sop_class_uid: str
    series_instance_uid: str
    series_number: int
    series_description: str
    files: list[str] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)
    rescale_slope: float | None = None


@dataclass
class StudyManifest:
    """Mirror of ``manifest.json``: what was written, with which parameters and ground truth."""

    manifest_version: int
    generator_version: str
    seed: int
    vendor: str
    lesion: str
    laterality: str
    snr: float | None  # None = noise-free (snr = inf)
    sigma: float  # per-channel Gaussian σ of the Rician noise, in DWI signal units
    ge_b_offset: bool
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_sex: str
    patient_birth_date: str
    study_instance_uid: str
    accession_number: str
    study_date: str
    study_time: str
    study_description: str
    frame_of_reference_uid: str
    b_values: list[float]
    geometry: dict[str, Any]
    dwi: SeriesEntry
    t2: SeriesEntry
    seg: SeriesEntry
    truth_file: str = "truth.npz"
    truth_summary: dict[str, float] = field(default_factory=dict)
    #: Only with ``write_study(dce=True)`` (absent from manifest.json otherwise).
    dce: SeriesEntry | None = None
    dce_subtraction: SeriesEntry | None = None
    dce_pattern: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in _OPTIONAL_KEYS:  # keep studies without DCE byte-identical to before
            if data.get(key) is None:
                data.pop(key, None)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyManifest:
        data = dict(data)
        for key in ("dwi", "t2", "seg", "dce", "dce_subtraction"):
            if data.get(key) is not None:
                data[key] = SeriesEntry(**data[key])
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> StudyManifest:
        """Read ``manifest.json`` (or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def geometry_object(self) -> Geometry:
        g = self.geometry
        return Geometry(
            shape=(int(g["shape"][0]), int(g["shape"][1]), int(g["shape"][2])),
            origin=(float(g["origin"][0]), float(g["origin"][1]), float(g["origin"][2])),
            row_dir=(float(g["row_dir"][0]), float(g["row_dir"][1]), float(g["row_dir"][2])),
            col_dir=(float(g["col_dir"][0]), float(g["col_dir"][1]), float(g["col_dir"][2])),
            row_spacing=float(g["row_spacing"]),
            col_spacing=float(g["col_spacing"]),
            slice_spacing=float(g["slice_spacing"]),
            frame_of_reference_uid=str(g["frame_of_reference_uid"]),
        )


_OPTIONAL_KEYS = ("dce", "dce_subtraction", "dce_pattern")


def _uid(*parts: object) -> str:
    """A ``2.25.`` UID from a name-based (SHA-1, version 5) UUID of ``parts`` (PS3.5 B.2).

    Same inputs, same UID. (``pydicom.uid.generate_uid(prefix=None, ...)`` ignores its entropy
    sources and returns a random UUID, so it cannot make deterministic UIDs.)
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(map(str, parts))).int}"


def study_geometry(
    matrix: tuple[int, int], slices: int, slice_thickness: float, frame_of_reference_uid: str
) -> Geometry:
    """Axial grid (IOP 1\\0\\0\\0\\1\\0): columns run to the patient's left, rows posterior.

    Square pixels of ``FOV_LR_MM / columns`` (rounded to 0.001 mm so DS values are exact), the
    anterior FOV edge just in front of the breasts, slices contiguous and centred on z = 0.
    """
    rows, cols = matrix
    if rows < 8 or cols < 8 or slices < 1:
        raise ValueError(f"matrix {matrix} and slices {slices} are too small for a breast phantom")
    if slice_thickness <= 0:
        raise ValueError("slice_thickness must be positive")
    spacing = round(FOV_LR_MM / cols, 3)
    origin = (
        round(-(cols - 1) / 2.0 * spacing, 4),
        round(_ANTERIOR_EDGE_Y_MM + spacing / 2.0, 4),
        round(-(slices - 1) / 2.0 * slice_thickness, 4),
    )
    return Geometry(
        shape=(slices, rows, cols),
        origin=origin,
        row_dir=(1.0, 0.0, 0.0),
        col_dir=(0.0, 1.0, 0.0),
        row_spacing=spacing,
        col_spacing=spacing,
        slice_spacing=float(slice_thickness),
        frame_of_reference_uid=frame_of_reference_uid,
    )


def _patient(seed: int) -> tuple[PatientInfo, dt.date]:
    """Visibly synthetic patient for ``seed`` and her study date."""
    rng = rng_stream(seed, 0)
    birth = dt.date(1950, 1, 1) + dt.timedelta(days=int(rng.integers(0, 35 * 365)))
    study_date = dt.date(2024, 1, 2) + dt.timedelta(days=int(rng.integers(0, 700)))
    age = (
        study_date.year
        - birth.year
        - ((study_date.month, study_date.day) < (birth.month, birth.day))
    )
    info = PatientInfo(
        patient_id=f"H2L{seed:07d}",
        issuer_of_patient_id=ISSUER_OF_PATIENT_ID,
        name=f"SYNTHETIC^DEMO{seed:04d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex="F",
        age=f"{age:03d}Y",
        weight_kg=round(float(rng.uniform(52.0, 90.0)), 1),
    )
    return info, study_date


def _time_plus(start: str, minutes: int) -> str:
    t = dt.datetime.strptime(start, "%H%M%S") + dt.timedelta(minutes=minutes)
    return t.strftime("%H%M%S")


def _geometry_dict(g: Geometry) -> dict[str, Any]:
    return {
        "shape": list(g.shape),
        "origin": list(g.origin),
        "row_dir": list(g.row_dir),
        "col_dir": list(g.col_dir),
        "row_spacing": g.row_spacing,
        "col_spacing": g.col_spacing,
        "slice_spacing": g.slice_spacing,
        "frame_of_reference_uid": g.frame_of_reference_uid,
        "affine": g.affine.tolist(),
    }


def _remove_previous(out: Path) -> None:
    """Delete the files a previous run listed in its manifest (and nothing else)."""
    try:
        old = StudyManifest.load(out)
    except (OSError, ValueError, TypeError, KeyError):
        return
    for entry in (old.dwi, old.t2, old.seg, old.dce, old.dce_subtraction):
        for rel in entry.files if entry is not None else []:
            (out / rel).unlink(missing_ok=True)
    (out / old.truth_file).unlink(missing_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)


def write_study(
    out: Path,
    *,
    seed: int = 0,
    lesion: LesionType | str = LesionType.MASS,
    snr: float = 30.0,
    vendor: Vendor | str = Vendor.SIEMENS,
    matrix: tuple[int, int] = (96, 192),
    slices: int = 24,
    slice_thickness: float = 4.0,
    b_values: Sequence[float] = DEFAULT_B_VALUES,
    ge_b_offset: bool = False,
    overwrite: bool = False,
    dce: bool = False,
) -> StudyManifest:
    """Write a synthetic bilateral breast DKI study to ``out`` and return its manifest.

    ``matrix`` is (rows, columns): rows run anterior→posterior, columns right→left; the default
    96×192 at 1.75 mm covers 168×336 mm, 24 slices of 4 mm cover 96 mm (≈170 images, ≈6 MB).
    ``snr`` may be ``math.inf`` for noise-free images. ``b_values`` must start with a b≈0; a
    near-zero first value (e.g. 0.002, as Philips headers carry) is written as is where the
    vendor's tag can hold it (Philips FL/FD) and rounded where it is an integer (IS).
    ``ge_b_offset`` writes GE's older (0043,1039) form with the 1e9 offset. A non-empty ``out``
    is refused unless ``overwrite``, which removes only files listed in the previous
    ``manifest.json``. ``dce`` also writes a dynamic T1w series (pre- and first post-contrast
    phase) and its subtraction on their own grid (:func:`dicom_node.synth.dce.dce_geometry`);
    everything else is written exactly as without it.
    """
    out = Path(out)
    vendor = Vendor(vendor)
    lesion = LesionType(lesion)
    if seed < 0:
        raise ValueError("seed must be non-negative")
    if not snr > 0:
        raise ValueError("snr must be positive (math.inf for noise-free images)")
    bvals = np.asarray(sorted(float(b) for b in b_values))
    if bvals.size < 2 or not 0.0 <= bvals[0] < B0_THRESHOLD or np.any(np.diff(bvals) <= 0):
        raise ValueError(f"b_values must be distinct and start with a b≈0 (< {B0_THRESHOLD})")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose an empty folder or overwrite=True")
        _remove_previous(out)
    out.mkdir(parents=True, exist_ok=True)

    key = (
        seed,
        vendor.value,
        lesion.value,
        repr(float(snr)),
        matrix,
        slices,
        slice_thickness,
        tuple(bvals.tolist()),
        ge_b_offset,
    )
    patient, study_day = _patient(seed)
    study_rng = rng_stream(seed, 0, 1)
    study_time = f"{int(study_rng.integers(8, 17)):02d}{int(study_rng.integers(0, 60)):02d}00"
    study_uid = _uid("study", *key)
    study = StudyInfo(
        study_instance_uid=study_uid,
        accession_number=f"SYN{int(study_uid.rsplit('.', 1)[-1]) % 10**10:010d}",
        study_id="1",
        date=study_day.strftime("%Y%m%d"),
        time=study_time,
        description=STUDY_DESCRIPTION,
        frame_of_reference_uid=_uid("for", *key),
        institution_name="HER2LOW Synthetic Imaging Centre",
    )
    geometry = study_geometry(matrix, slices, slice_thickness, study.frame_of_reference_uid)
    phantom = make_phantom(geometry, seed=seed, lesion=lesion)
    profile = PROFILES[vendor]
    sigma = 0.0 if math.isinf(snr) else S0_FGT_NOMINAL / snr
    rows, cols = matrix

    # --- T2-weighted TSE (no diffusion attributes) ---
    t2_info = SeriesInfo(
        series_instance_uid=_uid("series-t2", *key),
        series_number=3,
        description=profile.t2_series_description,
        protocol_name=profile.t2_protocol_name,
        time=_time_plus(study_time, 4),
    )
    t2_params = MrParams(
        image_type=("ORIGINAL", "PRIMARY", "M"),
        scanning_sequence=("SE",),
        sequence_variant=("SK", "SP"),
        scan_options=(),
        sequence_name=profile.t2_sequence_name,
        repetition_time_ms=4500.0,
        echo_time_ms=95.0,
        echo_train_length=17,
        flip_angle_deg=150.0,
        pixel_bandwidth_hz=250.0,
        acquisition_matrix=(cols, 0, 0, rows),
        phase_encoding_direction="COL",
    )
    t2_sigma = 0.0 if math.isinf(snr) else _T2_FGT / snr
    t2_real = add_rician_noise(phantom.t2w, t2_sigma, rng_stream(seed, 6))
    t2_stored, t2_slope = quantise(t2_real)
    t2_entry = SeriesEntry(
        role="t2",
        modality="MR",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        series_instance_uid=t2_info.series_instance_uid,
        series_number=t2_info.series_number,
        series_description=t2_info.description,
        rescale_slope=t2_slope,
    )
    for k in range(slices):
        sop_uid = _uid("t2", k, *key)
        ds = mr_image(
            pixels=t2_stored[k],
            slope=t2_slope,
            geometry=geometry,
            slice_index=k,
            patient=patient,
            study=study,
            series=t2_info,
            params=t2_params,
            profile=profile,
            sop_instance_uid=sop_uid,
            instance_number=k + 1,
        )
        rel = f"t2/IM{k + 1:05d}.dcm"
        save(ds, out / rel)
        t2_entry.files.append(rel)
        t2_entry.sop_instance_uids.append(sop_uid)

    # --- trace-weighted DWI ---
    dwi_info = SeriesInfo(
        series_instance_uid=_uid("series-dwi", *key),
        series_number=5,
        description=profile.dwi_series_description,
        protocol_name=profile.dwi_protocol_name,
        time=_time_plus(study_time, 10),
    )
    dwi_params = MrParams(
        image_type=profile.dwi_image_type,
        scanning_sequence=profile.dwi_scanning_sequence,
        sequence_variant=profile.dwi_sequence_variant,
        scan_options=("PFP", "FS"),
        sequence_name="",  # per image, set by the vendor convention
        repetition_time_ms=5200.0,
        echo_time_ms=78.0,
        echo_train_length=max(1, rows // 2),
        flip_angle_deg=90.0,
        pixel_bandwidth_hz=1860.0,
        acquisition_matrix=(cols, 0, 0, rows),
        phase_encoding_direction="COL",
    )
    clean = dki_signal(phantom.s0, phantom.dapp, phantom.kapp, bvals)
    noisy = add_rician_noise(clean, sigma, rng_stream(seed, 5))
    dwi_stored, dwi_slope = quantise(noisy)
    numbers = dwi_instance_numbers(vendor, bvals.size, slices, rng_stream(seed, 7))
    dwi_entry = SeriesEntry(
        role="dwi",
        modality="MR",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        series_instance_uid=dwi_info.series_instance_uid,
        series_number=dwi_info.series_number,
        series_description=dwi_info.description,
        rescale_slope=dwi_slope,
    )
    b0_datasets: list[Dataset] = []
    for ib, b in enumerate(bvals):
        for k in range(slices):
            sop_uid = _uid("dwi", ib, k, *key)
            number = int(numbers[ib, k])
            ds = mr_image(
                pixels=dwi_stored[k, :, :, ib],
                slope=dwi_slope,
                geometry=geometry,
                slice_index=k,
                patient=patient,
                study=study,
                series=dwi_info,
                params=dwi_params,
                profile=profile,
                sop_instance_uid=sop_uid,
                instance_number=number,
            )
            apply_diffusion_tags(ds, vendor, float(b), b_index=ib, ge_b_offset=ge_b_offset)
            rel = f"dwi/IM{number:05d}.dcm"
            save(ds, out / rel)
            dwi_entry.files.append(rel)
            dwi_entry.sop_instance_uids.append(sop_uid)
            if ib == 0:
                b0_datasets.append(ds)

    # --- SEG of the tumour on the b = 0 images ---
    seg_uid = _uid("seg", *key)
    seg_series_uid = _uid("series-seg", *key)
    seg = tumour_segmentation(
        b0_datasets,
        phantom.tumour_mask,
        series_instance_uid=seg_series_uid,
        sop_instance_uid=seg_uid,
        series_number=100,
        date=study.date,
        time=_time_plus(study_time, 30),
        software_version=GENERATOR_VERSION,
    )
    (out / "seg").mkdir(exist_ok=True)
    seg.save_as(out / "seg" / "seg.dcm", enforce_file_format=True)
    seg_entry = SeriesEntry(
        role="seg",
        modality="SEG",
        sop_class_uid=str(seg.SOPClassUID),
        series_instance_uid=seg_series_uid,
        series_number=100,
        series_description=str(seg.SeriesDescription),
        files=["seg/seg.dcm"],
        sop_instance_uids=[seg_uid],
    )

    dce_entries = (
        _write_dce(out, phantom, seed=seed, snr=snr, key=key, patient=patient, study=study,
                   profile=profile, study_time=study_time)
        if dce
        else None
    )  # fmt: skip
    _save_truth(out / "truth.npz", phantom, bvals)
    manifest = StudyManifest(
        manifest_version=MANIFEST_VERSION,
        generator_version=GENERATOR_VERSION,
        seed=seed,
        vendor=vendor.value,
        lesion=lesion.value,
        laterality=phantom.laterality.value,
        snr=None if math.isinf(snr) else float(snr),
        sigma=sigma,
        ge_b_offset=ge_b_offset,
        patient_id=patient.patient_id,
        issuer_of_patient_id=patient.issuer_of_patient_id,
        patient_name=patient.name,
        patient_sex=patient.sex,
        patient_birth_date=patient.birth_date,
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        study_date=study.date,
        study_time=study.time,
        study_description=study.description,
        frame_of_reference_uid=study.frame_of_reference_uid,
        b_values=bvals.tolist(),
        geometry=_geometry_dict(geometry),
        dwi=dwi_entry,
        t2=t2_entry,
        seg=seg_entry,
        truth_summary=_truth_summary(phantom),
        dce=dce_entries[0] if dce_entries else None,
        dce_subtraction=dce_entries[1] if dce_entries else None,
        dce_pattern=dce_entries[2] if dce_entries else None,
    )
    (out / "manifest.json").write_text(manifest.to_json() + "\n", encoding="utf-8")
    return manifest


def _write_dce(
    out: Path,
    phantom: Phantom,
    *,
    seed: int,
    snr: float,
    key: tuple[Any, ...],
    patient: PatientInfo,
    study: StudyInfo,
    profile: Any,
    study_time: str,
) -> tuple[SeriesEntry, SeriesEntry, str]:
    """The dynamic series (2 temporal positions) and its subtraction, as a scanner stores them:
    a fat-suppressed 3-D T1w gradient echo with its own matrix and slices."""
    series = dce_series(phantom, seed=seed, snr=snr)
    grid = series.geometry
    n_slices, rows, cols = grid.shape
    params = MrParams(
        image_type=("ORIGINAL", "PRIMARY", "M"),
        scanning_sequence=("GR",),
        sequence_variant=("SP", "SK"),
        scan_options=("FS",),
        sequence_name="*fl3d1",
        repetition_time_ms=4.7,
        echo_time_ms=1.8,
        echo_train_length=1,
        flip_angle_deg=10.0,
        pixel_bandwidth_hz=490.0,
        acquisition_matrix=(cols, 0, 0, rows),
        phase_encoding_direction="ROW",
    )
    stored, slope = quantise(np.stack([series.pre, series.post]))
    sub_stored, sub_slope = quantise(series.subtraction)
    parts = (
        ("dce", "t1_fl3d_tra_dyn_fs", 7, params, [stored[0], stored[1]], slope),
        (
            "dce_sub",
            "t1_fl3d_tra_dyn_fs_SUB",
            8,
            replace(params, image_type=("DERIVED", "PRIMARY", "SUBTRACTION")),
            [sub_stored],
            sub_slope,
        ),
    )
    entries = []
    for folder, description, number, prm, phases, scale in parts:
        info = SeriesInfo(
            series_instance_uid=_uid(f"series-{folder}", *key),
            series_number=number,
            description=description,
            protocol_name="t1_fl3d_tra_dyn_fs",
            time=_time_plus(study_time, 16),
        )
        entry = SeriesEntry(
            role=folder,
            modality="MR",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            series_instance_uid=info.series_instance_uid,
            series_number=number,
            series_description=description,
            rescale_slope=scale,
        )
        for t, volume in enumerate(phases):
            for k in range(n_slices):
                sop_uid = _uid(folder, t, k, *key)
                ds = mr_image(
                    pixels=volume[k],
                    slope=scale,
                    geometry=grid,
                    slice_index=k,
                    patient=patient,
                    study=study,
                    series=info,
                    params=prm,
                    profile=profile,
                    sop_instance_uid=sop_uid,
                    instance_number=t * n_slices + k + 1,
                    acquisition_number=t + 1,
                )
                ds.MRAcquisitionType = "3D"
                ds.ContrastBolusAgent = "Gadobutrol"
                ds.TemporalPositionIdentifier = t + 2 if folder == "dce_sub" else t + 1
                ds.NumberOfTemporalPositions = 2
                rel = f"{folder}/IM{t * n_slices + k + 1:05d}.dcm"
                save(ds, out / rel)
                entry.files.append(rel)
                entry.sop_instance_uids.append(sop_uid)
        entries.append(entry)
    return entries[0], entries[1], series.pattern


def _save_truth(path: Path, phantom: Phantom, bvals: np.ndarray) -> None:
    np.savez_compressed(
        path,
        s0=phantom.s0.astype(np.float32),
        dapp=phantom.dapp.astype(np.float32),
        kapp=phantom.kapp.astype(np.float32),
        t2w=phantom.t2w.astype(np.float32),
        labels=phantom.labels,
        tumour_mask=phantom.tumour_mask,
        bvals=bvals,
        affine=phantom.geometry.affine,
    )


def _truth_summary(phantom: Phantom) -> dict[str, float]:
    """Tumour size and mean truth values, for quick sanity checks without loading truth.npz."""
    tumour = phantom.tumour_mask
    fgt = phantom.labels == TissueLabel.FGT
    n = int(tumour.sum())
    return {
        "tumour_voxels": float(n),
        "tumour_volume_ml": n * phantom.geometry.voxel_volume_mm3 / 1000.0,
        "tumour_dapp_mean": float(phantom.dapp[tumour].mean()) if n else float("nan"),
        "tumour_kapp_mean": float(phantom.kapp[tumour].mean()) if n else float("nan"),
        "fgt_dapp_mean": float(phantom.dapp[fgt].mean()),
        "fgt_kapp_mean": float(phantom.kapp[fgt].mean()),
    }


def _check_out(out: Path, overwrite: bool) -> str | None:
    """Why ``out`` cannot take a study (before anything is computed or written), or None."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        return (
            f"--out {out} is not empty; choose an empty folder or pass --overwrite "
            "(it removes only the files of a study written there before)"
        )
    parent = next((p for p in (out, *out.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"--out {out}: {parent} is a file, not a folder"
    return None


def cmd_synth(
    out: Path | str,
    seed: int = 0,
    lesion: str = LesionType.MASS.value,
    snr: float = 30.0,
    vendor: str = Vendor.SIEMENS.value,
    *,
    overwrite: bool = False,
    dce: bool = False,
) -> int:
    """CLI body: write the study, print a one-line summary; exit 0, 2 for bad input, 1 when the
    folder cannot be written."""
    out = Path(out)
    problem = _check_out(out, overwrite)
    if problem is None and not snr > 0:
        problem = "--snr must be positive ('inf' for noise-free images)"
    if problem is not None:
        print(f"her2low synth: error: {problem}", file=sys.stderr)
        return 2
    try:
        manifest = write_study(
            out, seed=seed, lesion=lesion, snr=snr, vendor=vendor, overwrite=overwrite, dce=dce
        )
    except ValueError as exc:
        print(f"her2low synth: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = exc.filename or out
        print(f"her2low synth: error: cannot write {where}: {reason}", file=sys.stderr)
        return 1
    extra = [e for e in (manifest.dce, manifest.dce_subtraction) if e is not None]
    n = len(manifest.dwi.files) + len(manifest.t2.files) + len(manifest.seg.files)
    n += sum(len(e.files) for e in extra)
    print(
        f"wrote {n} DICOM files to {out}: vendor={manifest.vendor} lesion={manifest.lesion} "
        f"laterality={manifest.laterality} b={manifest.b_values} "
        f"study={manifest.study_instance_uid}"
    )
    return 0


HELP = "write a synthetic breast DKI study (DWI, T2, SEG, ground truth)"
DESCRIPTION = (
    "Write a complete synthetic bilateral breast study: diffusion series in the chosen vendor's "
    "b-value convention, a T2 series, a DICOM SEG of the tumour and the ground-truth maps "
    "(truth.npz, manifest.json). For demos, tests and checking a PACS route."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``synth`` (defined here only; ``her2low`` composes them)."""
    from her2low.core.commands import positive_float

    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (new, empty, or see --overwrite)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (patient, lesion, noise)")
    parser.add_argument(
        "--lesion",
        choices=[v.value for v in LesionType],
        default=LesionType.MASS.value,
        help="tumour type: a mass or non-mass enhancement",
    )
    parser.add_argument(
        "--snr",
        type=positive_float,
        default=30.0,
        help="signal-to-noise ratio S0_FGT/σ; 'inf' writes noise-free images",
    )
    parser.add_argument(
        "--vendor",
        choices=[v.value for v in Vendor],
        default=Vendor.SIEMENS.value,
        help="whose b-value tags and storage conventions to imitate",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a study written in --out before (other files there are kept)",
    )
    parser.add_argument(
        "--dce",
        action="store_true",
        help="also write a dynamic T1w series (pre + post contrast) and its subtraction",
    )


def run(args: argparse.Namespace) -> int:
    """Handler of the parser :func:`add_arguments` filled."""
    return cmd_synth(
        args.out,
        args.seed,
        args.lesion,
        args.snr,
        args.vendor,
        overwrite=args.overwrite,
        dce=getattr(args, "dce", False),
    )


COMMANDS = {"synth": (HELP, DESCRIPTION, add_arguments, run)}


def add_subcommand(
    subparsers: argparse._SubParsersAction,
) -> argparse.ArgumentParser:
    """Register ``synth``; the parser's ``func`` default runs it and returns the exit code."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "synth", help=HELP, description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser
