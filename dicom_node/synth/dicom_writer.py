"""Classic single-frame MR Image Storage objects (PS3.3 A.4) built attribute by attribute.

One image per file, Explicit VR Little Endian, 16-bit unsigned pixels with a power-of-two
Rescale Slope so that the stored integers use most of the range and the real-world signal comes
back exactly as ``stored · slope``. Modules written: Patient (C.7.1.1), General Study (C.7.2.1),
Patient Study (C.7.2.2), General Series (C.7.3.1), Frame of Reference (C.7.4.1), General
Equipment (C.7.5.1), General Acquisition (C.7.10.1), General Image (C.7.6.1), Image Plane
(C.7.6.2), Image Pixel (C.7.6.3), MR Image (C.8.3.1), VOI LUT (C.11.2) and SOP Common (C.12.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import DSfloat

from dicom_node.series.volume import Geometry

from .vendors import VendorProfile

__all__ = [
    "MrParams",
    "PatientInfo",
    "SeriesInfo",
    "StudyInfo",
    "mr_image",
    "quantise",
    "save",
]

_MAX_STORED = 60000.0  # headroom below 65535 for the largest value of a series


@dataclass(frozen=True)
class PatientInfo:
    """Patient module (PS3.3 C.7.1.1); the name is visibly synthetic."""

    patient_id: str
    issuer_of_patient_id: str
    name: str
    birth_date: str  # YYYYMMDD
    sex: str
    age: str  # AS, e.g. "052Y"
    weight_kg: float


@dataclass(frozen=True)
class StudyInfo:
    """General Study module (PS3.3 C.7.2.1) plus the study's single Frame of Reference."""

    study_instance_uid: str
    accession_number: str
    study_id: str
    date: str
    time: str
    description: str
    frame_of_reference_uid: str
    institution_name: str


@dataclass(frozen=True)
class SeriesInfo:
    """General Series module (PS3.3 C.7.3.1) values of one series."""

    series_instance_uid: str
    series_number: int
    description: str
    protocol_name: str
    time: str


@dataclass(frozen=True)
class MrParams:
    """MR Image module (PS3.3 C.8.3.1) acquisition parameters of one series."""

    image_type: tuple[str, ...]
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    sequence_name: str
    repetition_time_ms: float
    echo_time_ms: float
    echo_train_length: int
    flip_angle_deg: float
    pixel_bandwidth_hz: float
    acquisition_matrix: tuple[int, int, int, int]
    phase_encoding_direction: str  # ROW or COL


def _ds(value: float) -> DSfloat:
    """A Decimal String that fits the 16-byte limit of PS3.5 Table 6.2-1."""
    return DSfloat(float(value), auto_format=True)


def quantise(values: NDArray[np.floating]) -> tuple[NDArray[np.uint16], float]:
    """Map real-valued signal to uint16 with one power-of-two Rescale Slope for the whole array.

    A power of two keeps the slope exact in its decimal-string form, so ``stored * slope``
    reproduces the quantised values bit for bit on any reader.
    """
    v = np.asarray(values, float)
    vmax = float(v.max()) if v.size else 0.0
    exponent = math.floor(math.log2(_MAX_STORED / vmax)) if vmax > 0 else 0
    exponent = max(-8, min(12, exponent))
    slope = 2.0**-exponent
    stored = np.clip(np.rint(v / slope), 0, 65535).astype(np.uint16)
    return stored, slope


def mr_image(
    *,
    pixels: NDArray[np.uint16],
    slope: float,
    geometry: Geometry,
    slice_index: int,
    patient: PatientInfo,
    study: StudyInfo,
    series: SeriesInfo,
    params: MrParams,
    profile: VendorProfile,
    sop_instance_uid: str,
    instance_number: int,
    acquisition_number: int = 1,
) -> Dataset:
    """One MR Image Storage dataset (no file meta) for slice ``slice_index`` of ``geometry``."""
    rows, cols = geometry.shape[1:]
    if pixels.shape != (rows, cols) or pixels.dtype != np.uint16:
        raise ValueError(f"pixels must be uint16 {(rows, cols)}, got {pixels.dtype} {pixels.shape}")
    ds = Dataset()
    # SOP Common (C.12.1)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(params.image_type)
    ds.InstanceCreationDate = study.date
    ds.InstanceCreationTime = series.time
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    # General Study / Series / Acquisition / Image dates and times
    ds.StudyDate = study.date
    ds.SeriesDate = study.date
    ds.AcquisitionDate = study.date
    ds.ContentDate = study.date
    ds.StudyTime = study.time
    ds.SeriesTime = series.time
    ds.AcquisitionTime = series.time
    ds.ContentTime = series.time
    ds.AccessionNumber = study.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = study.institution_name
    ds.ReferringPhysicianName = ""
    ds.StationName = profile.station_name
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = profile.model
    # Patient (C.7.1.1) and Patient Study (C.7.2.2)
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer_of_patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = patient.age
    ds.PatientWeight = _ds(patient.weight_kg)
    # MR Image (C.8.3.1)
    ds.BodyPartExamined = "BREAST"
    ds.ScanningSequence = list(params.scanning_sequence)
    ds.SequenceVariant = list(params.sequence_variant)
    ds.ScanOptions = list(params.scan_options) if params.scan_options else ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = params.sequence_name
    ds.AngioFlag = "N"
    ds.SliceThickness = _ds(geometry.slice_spacing)
    ds.RepetitionTime = _ds(params.repetition_time_ms)
    ds.EchoTime = _ds(params.echo_time_ms)
    ds.NumberOfAverages = _ds(1)
    ds.ImagingFrequency = _ds(profile.imaging_frequency_mhz)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.MagneticFieldStrength = _ds(profile.field_strength_t)
    ds.SpacingBetweenSlices = _ds(geometry.slice_spacing)
    ds.NumberOfPhaseEncodingSteps = int(max(params.acquisition_matrix[1:4:2]))
    ds.EchoTrainLength = params.echo_train_length
    ds.PercentSampling = _ds(100)
    ds.PercentPhaseFieldOfView = _ds(
        100.0 * rows * geometry.row_spacing / (cols * geometry.col_spacing)
    )
    ds.PixelBandwidth = _ds(params.pixel_bandwidth_hz)
    ds.DeviceSerialNumber = "SYN0001"
    ds.SoftwareVersions = profile.software_versions.split("\\")
    ds.ProtocolName = series.protocol_name
    ds.ReceiveCoilName = profile.receive_coil
    ds.TransmitCoilName = "Body"
    ds.AcquisitionMatrix = list(params.acquisition_matrix)
    ds.InPlanePhaseEncodingDirection = params.phase_encoding_direction
    ds.FlipAngle = _ds(params.flip_angle_deg)
    ds.PatientPosition = "HFP"  # prone, as in breast MRI; LPS coordinates are unaffected
    # Relationship: General Study, General Series, General Image, Frame of Reference
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.series_number
    ds.AcquisitionNumber = acquisition_number
    ds.InstanceNumber = instance_number
    # Image Plane (C.7.6.2)
    ds.ImagePositionPatient = [_ds(v) for v in geometry.slice_position(slice_index)]
    ds.ImageOrientationPatient = [_ds(v) for v in (*geometry.row_dir, *geometry.col_dir)]
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.Laterality = ""  # bilateral examination: paired body part, laterality not one side
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(np.dot(geometry.slice_position(slice_index), geometry.normal)))
    # Image Pixel (C.7.6.3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(geometry.row_spacing), _ds(geometry.col_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    # VOI LUT (C.11.2), in rescaled units
    top = float(np.percentile(pixels, 99.5)) * slope
    width = max(top, slope)
    ds.WindowCenter = _ds(width / 2.0)
    ds.WindowWidth = _ds(width)
    ds.RescaleIntercept = _ds(0)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def save(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a PS3.10 file: preamble, File Meta Information, Explicit VR LE."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
