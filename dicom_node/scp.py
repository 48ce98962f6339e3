"""The node's DICOM application entity: C-ECHO and C-STORE for every storage SOP class.

Configured in one place (:func:`build_ae`); handlers take their dependencies as bound
arguments (pynetdicom's ``(event, handler, [args])`` form) and return named statuses.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.ingest import Ingestor
from dicom_node.status import EchoStatus, StoreStatus
from her2low.settings import Settings

log = logging.getLogger(__name__)


def handle_echo(event: Event) -> int:
    """C-ECHO: the association itself proves reachability (PS3.4 A.4)."""
    return int(EchoStatus.SUCCESS)


def handle_store(event: Event, ingestor: Ingestor) -> int:
    """C-STORE: success only once the instance is on disk and indexed (PS3.4 B.2.3)."""
    try:
        encoded = event.encoded_dataset(include_meta=True)
    except Exception:  # a dataset pynetdicom cannot even frame
        return int(StoreStatus.CANNOT_UNDERSTAND)
    request = cast(C_STORE, event.request)
    outcome = ingestor.ingest(
        encoded,
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        transfer_syntax_uid=str(event.context.transfer_syntax),
        calling_aet=str(event.assoc.requestor.ae_title),
    )
    if outcome.status is not StoreStatus.SUCCESS:
        log.warning(
            "c-store refused",
            extra={
                "status": f"0x{int(outcome.status):04X}",
                "status_name": outcome.status.name,
                "detail": outcome.detail,
                "series_uid": outcome.series_instance_uid,
                "calling_aet": str(event.assoc.requestor.ae_title),
            },
        )
    return int(outcome.status)


def build_ae(settings: Settings) -> AE:
    """The AE with its contexts, limits and AE-title checks; nothing is started here."""
    ae = AE(ae_title=settings.node_ae_title)
    ae.maximum_pdu_size = 0  # no cap: large MR frames in few PDUs
    ae.maximum_associations = settings.node_max_associations
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    ae.require_called_aet = True  # reject A-ASSOCIATE with a wrong called AE (reason 7)
    if settings.node_allowed_calling_aets:
        # rejected with "calling AE title not recognised" (PS3.8 7.1.1.9, reason 3)
        ae.require_calling_aet = [
            aet.split("@", 1)[0] for aet in settings.node_allowed_calling_aets
        ]
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def start(settings: Settings, ingestor: Ingestor, **kwargs: Any) -> ThreadedAssociationServer:
    """Start listening without blocking; stop with ``server.shutdown()``."""
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ingestor]),
    ]
    server = ae.start_server(
        (settings.node_host, settings.node_port), block=False, evt_handlers=handlers, **kwargs
    )
    assert server is not None
    return server
