"""Vendor profiles: where each scanner family puts the diffusion b-value in a classic MR image.

The conventions follow ``notes/dicom.md`` ("Where diffusion b-values live"):

* Siemens classic (XA-style) export: private (0019,100C) ``B_value`` (IS) under the creator
  ``SIEMENS MR HEADER``; SequenceName ``*ep_b1000t``; **no** standard Diffusion b-value
  (0018,9087).
* GE: private (0043,1039) (IS, 4 values, b = first value; older releases add a 1e9 offset) under
  ``GEMS_PARM_01``; the standard (0018,9087) only on b > 0 images.
* Philips: private (2001,1003) (FL) under ``Philips Imaging DD 001`` and the standard (0018,9087)
  on every image, b = 0 included; volume keys (2005,1412)/(2005,1413); instance numbers not in
  volume order.

Private elements are written through pydicom's private block API so that each element sits in
the block reserved by its creator (PS3.5 section 7.8.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicom_node.series.bvalues import (
    B0_THRESHOLD,
    GE_B_OFFSET,
    GE_PARM,
    PHILIPS_IMAGING,
    PHILIPS_MR_005,
    SIEMENS_MR,
)

__all__ = [
    "GE_B_OFFSET",
    "PROFILES",
    "Vendor",
    "VendorProfile",
    "apply_diffusion_tags",
    "dwi_instance_numbers",
]

#: Block of ``PHILIPS_MR_005`` in group 2005. Philips scanners reserve block 0x14 of group 2005 for
#: "Philips MR Imaging DD 005" (its (2005,0014) creator); the volume keys (2005,1412) and
#: (2005,1413) can only have those element numbers inside block 0x14 (PS3.5 7.8.1).
PHILIPS_MR_BLOCK = 0x14


class Vendor(StrEnum):
    """Scanner family whose header conventions the synthetic DWI series imitates."""

    SIEMENS = "siemens"
    GE = "ge"
    PHILIPS = "philips"


@dataclass(frozen=True)
class VendorProfile:
    """Equipment (PS3.3 C.7.5.1) and sequence attributes (C.8.3.1) typical of one vendor."""

    manufacturer: str
    model: str
    software_versions: str
    station_name: str
    field_strength_t: float
    imaging_frequency_mhz: float
    receive_coil: str
    dwi_image_type: tuple[str, ...]
    dwi_scanning_sequence: tuple[str, ...]
    dwi_sequence_variant: tuple[str, ...]
    dwi_series_description: str
    dwi_protocol_name: str
    t2_series_description: str
    t2_protocol_name: str
    t2_sequence_name: str


PROFILES: dict[Vendor, VendorProfile] = {
    Vendor.SIEMENS: VendorProfile(
        manufacturer="SIEMENS",
        model="MAGNETOM Vida",
        software_versions="syngo MR XA50",
        station_name="SYNMR01",
        field_strength_t=3.0,
        imaging_frequency_mhz=123.2497,
        receive_coil="Breast_18",
        dwi_image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"),
        dwi_scanning_sequence=("EP",),
        dwi_sequence_variant=("SK", "SP"),
        dwi_series_description="ep2d_diff_tra_b0_2000_TRACEW",
        dwi_protocol_name="ep2d_diff_tra_b0_2000",
        t2_series_description="t2_tse_tra",
        t2_protocol_name="t2_tse_tra",
        t2_sequence_name="*tse2d1_15",
    ),
    Vendor.GE: VendorProfile(
        manufacturer="GE MEDICAL SYSTEMS",
        model="SIGNA Premier",
        software_versions="29\\LX\\MR29.1_EA_2138.a",
        station_name="SYNMR02",
        field_strength_t=3.0,
        imaging_frequency_mhz=127.7424,
        receive_coil="16Ch Breast",
        dwi_image_type=("ORIGINAL", "PRIMARY", "OTHER"),
        dwi_scanning_sequence=("EP", "SE"),
        dwi_sequence_variant=("SK", "SS"),
        dwi_series_description="AX DWI b0-2000",
        dwi_protocol_name="BREAST BILAT DKI",
        t2_series_description="AX T2 FRFSE",
        t2_protocol_name="BREAST BILAT DKI",
        t2_sequence_name="frfse2",
    ),
    Vendor.PHILIPS: VendorProfile(
        manufacturer="Philips",
        model="Ingenia Elition X",
        software_versions="5.7.1\\5.7.1.2",
        station_name="SYNMR03",
        field_strength_t=3.0,
        imaging_frequency_mhz=127.7703,
        receive_coil="MULTI COIL",
        dwi_image_type=("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"),
        dwi_scanning_sequence=("SE", "EP"),
        dwi_sequence_variant=("SK",),
        dwi_series_description="DWI_b0-2000 SENSE",
        dwi_protocol_name="WIP DWI_b0-2000 SENSE",
        t2_series_description="T2W_TSE SENSE",
        t2_protocol_name="T2W_TSE SENSE",
        t2_sequence_name="TSE",
    ),
}


def _siemens_sequence_name(b: float) -> str:
    """Siemens names the trace-weighted b image ``*ep_b1000t`` and the b = 0 image ``*ep_b0``."""
    return "*ep_b0" if round(b) == 0 else f"*ep_b{round(b)}t"


def apply_diffusion_tags(
    ds: Dataset,
    vendor: Vendor,
    b: float,
    *,
    b_index: int,
    ge_b_offset: bool = False,
) -> None:
    """Write the b-value of one trace-weighted image in ``vendor``'s convention (notes/dicom.md).

    ``b_index`` is the 0-based position of ``b`` among the series' b-values (Philips volume key).
    The standard Diffusion b-value (0018,9087) and Diffusion Directionality (0018,9075) are those
    of the MR Diffusion Macro (PS3.3 C.8.13.5.9) that vendors also place in classic images.
    """
    vendor = Vendor(vendor)
    if vendor is Vendor.SIEMENS:
        ds.SequenceName = _siemens_sequence_name(b)
        block = ds.private_block(0x0019, SIEMENS_MR, create=True)
        block.add_new(0x0C, "IS", round(b))
    elif vendor is Vendor.GE:
        ds.SequenceName = "epi2"
        first = round(b) + (GE_B_OFFSET if ge_b_offset else 0)
        block = ds.private_block(0x0043, GE_PARM, create=True)
        block.add_new(0x39, "IS", [first, 0, 0, 0])
        if round(b) > 0:  # GE b = 0 images carry only the private tag
            ds.DiffusionBValue = float(b)
            ds.DiffusionDirectionality = "ISOTROPIC"
    elif vendor is Vendor.PHILIPS:
        ds.SequenceName = "DwiSE"
        block = ds.private_block(0x2001, PHILIPS_IMAGING, create=True)
        block.add_new(0x03, "FL", float(b))
        ds.DiffusionBValue = float(b)
        ds.DiffusionDirectionality = "ISOTROPIC" if b >= B0_THRESHOLD else "NONE"
        if (0x2005, PHILIPS_MR_BLOCK) not in ds:
            ds.add_new((0x2005, PHILIPS_MR_BLOCK), "LO", PHILIPS_MR_005)
        mr_block = ds.private_block(0x2005, PHILIPS_MR_005)
        mr_block.add_new(0x12, "IS", b_index + 1)  # diffusion b-value number
        mr_block.add_new(0x13, "IS", 1)  # gradient orientation number (trace only)
    else:  # pragma: no cover - Enum coercion above rejects anything else
        raise ValueError(f"unknown vendor {vendor!r}")


def dwi_instance_numbers(
    vendor: Vendor, n_b: int, n_slices: int, rng: np.random.Generator
) -> NDArray[np.int64]:
    """InstanceNumber of each ``(b, slice)`` image, as each vendor tends to order them.

    Siemens numbers volume by volume, GE slice by slice (all b of a location together), Philips
    in an order unrelated to volumes (a deterministic shuffle here) — readers must sort by
    position and b, never by InstanceNumber (notes/dicom.md, "Series assembly").
    """
    vendor = Vendor(vendor)
    b_idx, k_idx = np.meshgrid(np.arange(n_b), np.arange(n_slices), indexing="ij")
    if vendor is Vendor.SIEMENS:
        numbers = b_idx * n_slices + k_idx + 1
    elif vendor is Vendor.GE:
        numbers = k_idx * n_b + b_idx + 1
    else:
        numbers = rng.permutation(n_b * n_slices).reshape(n_b, n_slices) + 1
    return numbers.astype(np.int64)
