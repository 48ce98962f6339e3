"""The node's DICOM application entity: C-ECHO and C-STORE for every storage SOP class.

Configured in one place (:func:`build_ae`); handlers take their dependencies as bound
arguments (pynetdicom's ``(event, handler, [args])`` form) and return named statuses.
Association acceptance (PS3.8 9.3.4) is decided by :mod:`dicom_node.receiving.access` in an
``EVT_REQUESTED`` hook; TLS (PS3.15 B.9) by :mod:`dicom_node.receiving.tls`, with the handshake done on
the connection's own thread so a silent or plain-TCP peer cannot stall the listener.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.receiving.access import AccessPolicy, RejectResult, RejectSource, describe
from dicom_node.receiving.ingest import Ingestor
from dicom_node.receiving.status import EchoStatus, StoreStatus
from dicom_node.receiving.tls import context_from_settings
from her2low.core.settings import Settings

log = logging.getLogger(__name__)


def handle_echo(event: Event) -> int:
    """C-ECHO: the association itself proves reachability (PS3.4 A.4)."""
    return int(EchoStatus.SUCCESS)


def handle_store(event: Event, ingestor: Ingestor) -> int:
    """C-STORE: success only once the instance is on disk and indexed (PS3.4 B.2.3)."""
    calling = str(event.assoc.requestor.ae_title)
    try:
        encoded = event.encoded_dataset(include_meta=True)
        request = cast(C_STORE, event.request)
        outcome = ingestor.ingest(
            encoded,
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_aet=calling,
        )
    except Exception:  # never let pynetdicom turn a surprise into an unnamed 0xC211
        log.exception("c-store not understood", extra={"calling_aet": calling})
        return int(StoreStatus.CANNOT_UNDERSTAND)
    if outcome.status is not StoreStatus.SUCCESS:
        log.warning(
            "c-store refused",
            extra={
                "status": f"0x{int(outcome.status):04X}",
                "status_name": outcome.status.name,
                "detail": outcome.detail,
                "series_uid": outcome.series_instance_uid,
                "calling_aet": calling,
            },
        )
    return int(outcome.status)


def handle_requested(event: Event, policy: AccessPolicy) -> None:
    """A-ASSOCIATE-RQ received: reject unknown called/calling AEs (PS3.8 Table 9-21)."""
    assoc = event.assoc
    request = cast(A_ASSOCIATE, assoc.requestor.primitive)
    calling = str(request.calling_ae_title)
    address = assoc.requestor.address
    reason = policy.check(calling, str(request.called_ae_title), address)
    if reason is None:
        return
    log.warning(
        "association rejected",
        extra={
            "calling_aet": calling,
            "called_aet": str(request.called_ae_title),
            "peer": address,
            "reason": reason.name,
        },
    )
    assoc.acse.send_reject(RejectResult.PERMANENT, RejectSource.SERVICE_USER, reason)
    assoc.kill()  # as pynetdicom's own rejections: wait until the A-ASSOCIATE-RJ is sent


def build_ae(settings: Settings, policy: AccessPolicy | None = None) -> AE:
    """The AE with its contexts, limits, timeouts and AE-title checks; nothing is started."""
    policy = policy or access_policy(settings)
    ae = AE(ae_title=settings.node_ae_title)
    ae.maximum_pdu_size = 0  # no cap: large MR frames in few PDUs
    # beyond this, pynetdicom answers rejected-transient, local-limit-exceeded (PS3.8 9.3.4)
    ae.maximum_associations = settings.node_max_associations
    ae.acse_timeout = settings.node_acse_timeout
    ae.dimse_timeout = settings.node_dimse_timeout
    ae.network_timeout = settings.node_network_timeout
    # Second line behind handle_requested: pynetdicom's own reason 7 / reason 3 rejections.
    ae.require_called_aet = True
    if policy.allowed:
        ae.require_calling_aet = policy.ae_titles
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def access_policy(settings: Settings) -> AccessPolicy:
    return AccessPolicy.from_entries(settings.node_ae_title, settings.node_allowed_calling_aets)


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY and the TLS handshake off the accept loop."""

    handshake_timeout: float = 30.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        listener = cast(socket.socket, self.socket)
        client, address = listener.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.handshake_timeout)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ValueError) as exc:  # ssl.SSLError, timeouts, resets
                peer = client_address[0] if isinstance(client_address, tuple) else client_address
                log.warning(
                    "tls handshake failed; connection closed",
                    extra={"peer": peer, "err": f"{type(exc).__name__}: {exc}"[:200]},
                )
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def start(settings: Settings, ingestor: Ingestor, **kwargs: Any) -> NodeServer:
    """Start listening without blocking; stop with ``server.shutdown()``.

    ``kwargs`` go to :meth:`pynetdicom.AE.make_server` (e.g. ``ssl_context`` to override the
    one built from the settings).
    """
    policy = access_policy(settings)
    ae = build_ae(settings, policy)
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, handle_requested, [policy]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ingestor]),
    ]
    kwargs.setdefault("ssl_context", context_from_settings(settings))
    server = cast(
        NodeServer,
        ae.make_server(
            (settings.node_host, settings.node_port),
            evt_handlers=handlers,
            server_class=NodeServer,
            **kwargs,
        ),
    )
    server.handshake_timeout = settings.node_acse_timeout
    thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does, so ae.shutdown() reaches it
    log.info(
        "dicom scp started",
        extra={
            "tls": server.ssl_context is not None,
            "mutual_tls": settings.node_tls_ca is not None,
            "allowed_calling_aets": describe(policy.allowed),
            "max_associations": settings.node_max_associations,
        },
    )
    return server
