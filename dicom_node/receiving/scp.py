"""The node's DICOM application entity: C-ECHO and C-STORE for every storage SOP class.

Configured in one place (:func:`build_ae`); handlers take their dependencies as bound
arguments (pynetdicom's ``(event, handler, [args])`` form) and return named statuses.
Association acceptance (PS3.8 9.3.4) is decided by :mod:`dicom_node.receiving.access` in an
``EVT_REQUESTED`` hook; TLS (PS3.15 B.9) by :mod:`dicom_node.receiving.tls`, with the handshake done on
the connection's own thread so a silent or plain-TCP peer cannot stall the listener.
One peer cannot hold every association slot: limits per calling AE title and per host sit beside
the total, and an association that only echoes is aborted once it has stored nothing for
``node_echo_idle_seconds`` (a C-ECHO every minute would otherwise keep it forever).
"""

from __future__ import annotations

import copy
import logging
import socket
import ssl
import threading
import time
import weakref
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.metrics import record_store
from dicom_node.receiving.access import (
    AccessPolicy,
    AssociationLimits,
    ProviderRejectReason,
    RejectResult,
    RejectSource,
    describe,
)
from dicom_node.receiving.ingest import Ingestor
from dicom_node.receiving.status import EchoStatus, StoreStatus
from dicom_node.receiving.tls import context_from_settings
from her2low.core.settings import Settings

log = logging.getLogger(__name__)


class IdleGuard:
    """When each association last did real work (was accepted, or stored an instance)."""

    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self._last_work: weakref.WeakKeyDictionary[Association, float] = weakref.WeakKeyDictionary()
        self._closing: weakref.WeakSet[Association] = weakref.WeakSet()
        self._lock = threading.Lock()

    def worked(self, assoc: Association) -> None:
        with self._lock:
            self._last_work[assoc] = time.monotonic()

    def echoed(self, assoc: Association) -> bool:
        """True (and the association marked for closing) when it has been idle too long."""
        now = time.monotonic()
        with self._lock:
            idle = now - self._last_work.setdefault(assoc, now)
            if idle > self.idle_seconds:
                self._closing.add(assoc)
                return True
        return False

    def take_closing(self, assoc: Association) -> bool:
        """True once for an association marked by :meth:`echoed`."""
        with self._lock:
            if assoc in self._closing:
                self._closing.discard(assoc)
                return True
        return False


class MessageSizeGuard:
    """Counts the data set bytes of the C-STORE being received on each association.

    pynetdicom gathers a whole message in memory before the C-STORE handler sees it, so the
    instance bound (``node_max_instance_bytes``) is also applied here, fragment by fragment: past
    it the association is aborted instead of buffering gigabytes a hostile peer announces.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._received: weakref.WeakKeyDictionary[Association, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def exceeded(self, assoc: Association, pdu: object) -> bool:
        """Count ``pdu``; True once, when the message in progress passes the limit."""
        if not isinstance(pdu, P_DATA_TF):
            return False
        with self._lock:
            total = self._received.get(assoc, 0)
            if total < 0:  # already over: being aborted
                return False
            for item in pdu.presentation_data_value_items:
                value = item.presentation_data_value
                if not value or value[0] & 0x01:  # a command fragment (PS3.8 E.2)
                    continue
                total += len(value) - 1
                if total > self.limit:
                    self._received[assoc] = -1
                    return True
                if value[0] & 0x02:  # the last fragment of the data set
                    total = 0
            self._received[assoc] = total
        return False


def handle_pdu_recv(event: Event, guard: MessageSizeGuard) -> None:
    """Abort an association whose C-STORE data set grows past ``node_max_instance_bytes``."""
    if guard.exceeded(event.assoc, event.pdu):
        log.warning(
            "c-store data set larger than node_max_instance_bytes; association aborted",
            extra={
                "calling_aet": str(event.assoc.requestor.ae_title),
                "peer": event.assoc.requestor.address,
                "limit": guard.limit,
            },
        )
        # not on this (the DUL's) thread: abort() waits for the DUL to stop
        threading.Thread(target=event.assoc.abort, name="size-abort", daemon=True).start()


def handle_echo(event: Event, guard: IdleGuard) -> int:
    """C-ECHO: the association itself proves reachability (PS3.4 A.4).

    An association that has stored nothing for ``node_echo_idle_seconds`` gets its answer and
    then an A-ABORT (:func:`handle_dimse_sent`): echoes alone do not hold a slot.
    """
    if guard.echoed(event.assoc):
        log.warning(
            "association only echoes; aborting it after this answer",
            extra={
                "calling_aet": str(event.assoc.requestor.ae_title),
                "peer": event.assoc.requestor.address,
                "idle_seconds": guard.idle_seconds,
            },
        )
    return int(EchoStatus.SUCCESS)


def handle_dimse_sent(event: Event, guard: IdleGuard) -> None:
    """After a response is queued: abort an association :class:`IdleGuard` marked as idle."""
    if guard.take_closing(event.assoc):
        threading.Thread(
            target=_abort_once_sent, args=(event.assoc,), name="idle-abort", daemon=True
        ).start()


def _abort_once_sent(assoc: Association, drain_seconds: float = 2.0) -> None:
    """Abort once the DUL has sent what is queued, so the peer still gets its C-ECHO answer."""
    deadline = time.monotonic() + drain_seconds
    while not assoc.dul.to_provider_queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the last PDU leaves the socket
    if assoc.is_established:
        assoc.abort()


def _status(status: StoreStatus, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (0000,0902) saying why (PS3.7 C.4)."""
    rsp = Dataset()
    rsp.Status = int(status)
    text = "".join(c if c.isprintable() and c != "\\" else " " for c in comment)
    rsp.ErrorComment = text[:64]  # LO
    return rsp


def handle_store(event: Event, ingestor: Ingestor, guard: IdleGuard) -> int | Dataset:
    """C-STORE: success only once the instance is on disk and indexed (PS3.4 B.2.3)."""
    calling = str(event.assoc.requestor.ae_title)
    guard.worked(event.assoc)
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
        record_store(StoreStatus.CANNOT_UNDERSTAND, "")
        return _status(StoreStatus.CANNOT_UNDERSTAND, "internal error; see the node log")
    record_store(outcome.status, outcome.detail)  # her2low_node_instances_* (dicom_node.metrics)
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
        return _status(outcome.status, outcome.detail)
    return int(outcome.status)


def _held(assoc: Association) -> list[tuple[str, str]]:
    """(calling AE title, address) of the other associations this AE accepted and holds."""
    held = []
    for other in assoc.ae.active_associations:
        request = other.requestor.primitive if other.is_acceptor else None
        if other is assoc or request is None:
            continue
        if other.is_aborted or other.is_rejected or other.is_released:
            continue
        held.append((str(request.calling_ae_title), other.requestor.address))
    return held


def handle_requested(
    event: Event, policy: AccessPolicy, limits: AssociationLimits, guard: IdleGuard
) -> None:
    """A-ASSOCIATE-RQ received: reject unknown called/calling AEs and peers past their
    association limit (PS3.8 Table 9-21)."""
    assoc = event.assoc
    request = cast(A_ASSOCIATE, assoc.requestor.primitive)
    calling = str(request.calling_ae_title)
    address = assoc.requestor.address
    reason = policy.check(calling, str(request.called_ae_title), address)
    if reason is None:
        limit = limits.exceeded(calling, address, _held(assoc))
        if not limit:
            guard.worked(assoc)
            return
        log.warning(
            "association rejected: local limit exceeded",
            extra={"calling_aet": calling, "peer": address, "limit": limit},
        )
        assoc.acse.send_reject(
            RejectResult.TRANSIENT,
            RejectSource.SERVICE_PROVIDER_PRESENTATION,
            ProviderRejectReason.LOCAL_LIMIT_EXCEEDED,
        )
        assoc.kill()
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


class PresentationContexts(list[PresentationContext]):
    """The server's supported contexts, with a cheap deep copy.

    pynetdicom deep-copies the server's contexts for every association it accepts. The default
    deep copy rebuilds, and re-validates with a regular expression, each of the ~7,700
    transfer-syntax UIDs the node accepts: about 0.1 s of CPU per association, paid again by a
    PACS that opens one association per series. UIDs are immutable strings, so a copy of each
    context with its own lists is just as independent.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            twin = copy.copy(context)
            twin.__dict__ = {
                k: list(v) if isinstance(v, list) else v for k, v in vars(context).items()
            }
            copies.append(twin)
        return copies


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY and the TLS handshake off the accept loop."""

    handshake_timeout: float = 30.0
    reuse_port: bool = False

    @property
    def contexts(self) -> list[PresentationContext]:
        return self._contexts

    @contexts.setter
    def contexts(self, value: list[PresentationContext]) -> None:
        self._contexts = PresentationContexts(value)

    def server_bind(self) -> None:
        """SO_REUSEPORT before bind (when asked), so several node processes share one port."""
        if self.reuse_port:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

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


class SharedPortNodeServer(NodeServer):
    """The node's server bound with SO_REUSEPORT (``node_reuse_port``): bind happens inside
    the constructor, so the option is a class attribute rather than a constructor argument."""

    reuse_port = True


def start(settings: Settings, ingestor: Ingestor, **kwargs: Any) -> NodeServer:
    """Start listening without blocking; stop with ``server.shutdown()``.

    ``kwargs`` go to :meth:`pynetdicom.AE.make_server` (e.g. ``ssl_context`` to override the
    one built from the settings).
    """
    policy = access_policy(settings)
    ae = build_ae(settings, policy)
    limits = AssociationLimits(
        per_calling_aet=settings.node_max_associations_per_aet,
        per_host=settings.node_max_associations_per_host,
    )
    guard = IdleGuard(settings.node_echo_idle_seconds)
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, handle_requested, [policy, limits, guard]),
        (evt.EVT_C_ECHO, handle_echo, [guard]),
        (evt.EVT_DIMSE_SENT, handle_dimse_sent, [guard]),
        (evt.EVT_C_STORE, handle_store, [ingestor, guard]),
        (evt.EVT_PDU_RECV, handle_pdu_recv, [MessageSizeGuard(ingestor.max_instance_bytes)]),
    ]
    kwargs.setdefault("ssl_context", context_from_settings(settings))
    server = cast(
        NodeServer,
        ae.make_server(
            (settings.node_host, settings.node_port),
            evt_handlers=handlers,
            server_class=SharedPortNodeServer if settings.node_reuse_port else NodeServer,
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
            "max_associations_per_aet": settings.node_max_associations_per_aet,
            "max_associations_per_host": settings.node_max_associations_per_host,
        },
    )
    return server
