"""Send DICOM files to a node over a real association (the demo and tests use it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import build_context

_TRANSFER = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


@dataclass
class SendReport:
    sent: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # file name -> status


def send_files(
    files: Iterable[Path],
    host: str,
    port: int,
    *,
    called_aet: str = "HER2LOW",
    calling_aet: str = "HER2LOW-DEMO",
) -> SendReport:
    paths = list(files)
    datasets = [pydicom.dcmread(f) for f in paths]
    ae = AE(ae_title=calling_aet)
    ae.maximum_pdu_size = 0
    classes = sorted({str(ds.SOPClassUID) for ds in datasets})
    ae.requested_contexts = [build_context(uid, _TRANSFER) for uid in classes]
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        raise ConnectionError(f"association with {called_aet}@{host}:{port} not established")
    report = SendReport()
    try:
        for path, ds in zip(paths, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", 0xFFFF))
            if code == 0:
                report.sent += 1
            else:
                report.failed[Path(path).name] = code
    finally:
        assoc.release()
    return report


def echo(
    host: str, port: int, *, called_aet: str = "HER2LOW", calling_aet: str = "HER2LOW-DEMO"
) -> bool:
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 5
    ae.network_timeout = 5
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return int(getattr(status, "Status", 0xFFFF)) == 0
    finally:
        assoc.release()
