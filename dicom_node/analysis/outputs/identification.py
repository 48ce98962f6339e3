"""Who wrote an object: the node's own equipment identity, and deterministic UIDs.

Every object the node writes (SR, SEG, Parametric Maps) carries the same Manufacturer,
Manufacturer's Model Name and Software Versions (General Equipment module, PS3.3 C.7.5.1) and,
in its file meta, the node's Implementation Class UID (PS3.10 7.1). The node recognises its own
objects by these values, never by a file name, so a SEG or map routed back to it by a PACS is
not analysed again (:func:`is_own_object`).

UIDs are derived (``2.25.`` + a hash, PS3.5 B.2) from the source series, the pipeline version and
what the ROI came from: a retried analysis or export re-sends the *same* SOP Instance UIDs, so a
PACS keeps one copy, while a new ROI (a SEG arrived) gives new objects.
"""

from __future__ import annotations

import uuid
from importlib import metadata

from pydicom.dataset import Dataset
from pydicom.uid import UID

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "MANUFACTURER",
    "MODEL_NAME",
    "derived_uid",
    "is_own_object",
    "software_versions",
]

MANUFACTURER = "her2low-cds"
MODEL_NAME = "her2low DKI node"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:her2low-cds:dicom")


def derived_uid(*parts: str) -> str:
    """A UID that depends only on ``parts``: ``2.25.`` + a name-based UUID (PS3.5 B.2, RFC 4122
    version 5), so the same inputs always give the same UID."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(0).join(parts)).int}"


#: Fixed for the project; never changes between versions.
IMPLEMENTATION_CLASS_UID = UID(derived_uid("implementation class"))


def _package_version() -> str:
    try:
        return metadata.version("her2low-cds")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0"


IMPLEMENTATION_VERSION_NAME = f"HER2LOW_{_package_version()}"[:16]


def software_versions(pipeline_version: str) -> str:
    """Software Versions (0018,1020): the package and the pipeline that made the numbers."""
    return f"her2low-cds {_package_version()} pipeline {pipeline_version}"[:64]


def is_own_object(ds: Dataset) -> bool:
    """Whether ``ds`` was written by this node (equipment identity or implementation class)."""
    if (
        str(ds.get("Manufacturer", "") or "") == MANUFACTURER
        and str(ds.get("ManufacturerModelName", "") or "") == MODEL_NAME
    ):
        return True
    meta = getattr(ds, "file_meta", None)
    return meta is not None and str(meta.get("ImplementationClassUID", "")) == str(
        IMPLEMENTATION_CLASS_UID
    )
