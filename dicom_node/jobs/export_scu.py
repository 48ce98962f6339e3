"""The node as a C-STORE SCU: send result objects to one destination (PS3.4 Annex B).

Shaped like the SCP (:mod:`dicom_node.receiving.scp`): the AE is configured in one place
(:func:`build_ae`) and every outcome is a named member of :class:`SendOutcome`, with the DIMSE
status named from pynetdicom's Storage Service table, never bare hex. Files are sent as they are
on disk (pynetdicom reads and streams them without decoding).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicom_node.analysis.outputs.identification import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)

__all__ = ["SendOutcome", "SendResult", "build_ae", "store_files"]

log = logging.getLogger(__name__)


class SendOutcome(StrEnum):
    """How one send of a batch ended."""

    SUCCESS = "success"
    #: The peer answered A-ASSOCIATE-RJ or accepted no presentation context we need.
    REJECTED = "rejected"
    #: No connection, TLS failure, abort or timeout before the association was established.
    UNREACHABLE = "unreachable"
    #: A C-STORE answered a failure status, or the association was lost mid-batch.
    FAILED = "failed"


@dataclass
class SendResult:
    outcome: SendOutcome
    message: str = ""
    #: SOP Instance UIDs the peer answered with success or warning.
    stored: list[str] = field(default_factory=list)


def _status_text(code: int) -> str:
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
    return f"{category} 0x{code:04X} {text}".strip()


def build_ae(calling_aet: str, sop_classes: Sequence[str], *, timeout: float) -> AE:
    """The SCU: our AE title and implementation identity, one context per SOP class."""
    ae = AE(ae_title=calling_aet)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = 0
    for uid in dict.fromkeys(sop_classes):
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae


def _no_delay(event: Event) -> None:
    """TCP_NODELAY on the connection, as the node's SCP sets it on the ones it accepts.

    Without it Nagle's algorithm holds the tail of each C-STORE until the peer's delayed ACK,
    up to tens of milliseconds per object (DCMTK ``storescu`` is run with ``TCP_NODELAY=1``).
    """
    raw = getattr(event.assoc.dul.socket, "socket", None)
    if isinstance(raw, socket.socket):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def store_files(
    paths: Sequence[Path],
    *,
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> SendResult:
    """Send ``paths`` over one association; SUCCESS only when every object was stored."""
    # The file meta names each object (PS3.10 7.1): no need to parse the datasets here.
    headers = [(p, read_file_meta_info(p)) for p in paths]
    ae = build_ae(
        calling_aet, [str(h.MediaStorageSOPClassUID) for _, h in headers], timeout=timeout
    )
    tls_args = (tls, host) if tls is not None else None
    try:
        assoc = ae.associate(
            host,
            port,
            ae_title=called_aet,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)],
        )
    except (OSError, ssl.SSLError) as exc:
        return SendResult(SendOutcome.UNREACHABLE, f"{type(exc).__name__}: {exc}")
    if assoc.is_rejected:
        return SendResult(SendOutcome.REJECTED, f"association rejected by {called_aet}")
    if not assoc.is_established:
        return SendResult(SendOutcome.UNREACHABLE, f"no association with {host}:{port}")
    stored: list[str] = []
    try:
        for path, header in headers:
            try:
                status = assoc.send_c_store(path)
            except ValueError as exc:  # no accepted presentation context for this SOP class
                return SendResult(SendOutcome.REJECTED, str(exc)[:300], stored)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == -1:
                return SendResult(
                    SendOutcome.FAILED, "association lost or timed out during C-STORE", stored
                )
            if code_to_category(code) not in ("Success", "Warning"):
                return SendResult(
                    SendOutcome.FAILED,
                    f"{header.MediaStorageSOPInstanceUID}: {_status_text(code)}",
                    stored,
                )
            stored.append(str(header.MediaStorageSOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
    return SendResult(SendOutcome.SUCCESS, "", stored)
