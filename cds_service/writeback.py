"""Write a card's FHIR resources back to the EHR's ``fhirServer`` as one transaction.

Off by default (``HER2LOW_CDS_FHIR_WRITEBACK``). A hook call only puts a job on a bounded queue
(never blocks: a full queue drops the job and says so in the audit); one background thread per
process posts the transaction with bounded retries and exponential backoff, and records each
outcome in the audit trail. The hook response never waits for the EHR's FHIR server, and a
failing server cannot break or slow the card.

What is sent is exactly what the card suggests (Observation, DiagnosticReport, Provenance, Device,
model card), as a FHIR R4 transaction with conditional creates (``fhir_transparency``), so a retry
or a repeated chart open does not duplicate resources. A job is sent once per (server, card) per
process. The access token lives only in the queued job, in memory, and is never logged.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import requests

from cds_service.fhir_transparency import suggested_resources, transaction_bundle
from cds_service.store import AuditTuple

log = logging.getLogger(__name__)

ACTOR = "her2low-cds:fhir-writeback"
QUEUE_SIZE = 64
_IDLE_EXIT_SECONDS = 2.0
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class WritebackOutcome(StrEnum):
    """Audit actions of the write-back."""

    SUCCEEDED = "fhir-writeback-succeeded"
    FAILED = "fhir-writeback-failed"
    DROPPED = "fhir-writeback-dropped"


class AuditSink(Protocol):
    """What the writer needs of ``Store``."""

    def audit_many(self, events: list[AuditTuple]) -> None: ...


@dataclass(frozen=True)
class WritebackJob:
    """One card to write back. ``body``: the served ``{"cards": [...]}`` JSON."""

    server: str
    body: bytes
    result_id: str
    card_uuid: str
    hook_instance: str
    access_token: str | None = field(default=None, repr=False)
    not_after: float | None = None  # time.monotonic() when the token expires

    @property
    def key(self) -> tuple[str, str]:
        return (self.server.rstrip("/"), self.card_uuid)


def bundle_of(body: bytes) -> dict[str, Any] | None:
    """The transaction Bundle of a served card body (None: the card suggests nothing)."""
    cards = json.loads(body).get("cards") or []
    resources = [r for card in cards for r in suggested_resources(card)]
    return transaction_bundle(resources) if resources else None


class FhirWriteback:
    """A bounded queue and one on-demand worker thread (it exits when idle, restarts on submit)."""

    def __init__(
        self,
        audit: AuditSink,
        *,
        timeout: float,
        attempts: int,
        backoff_seconds: float = 0.5,
        queue_size: int = QUEUE_SIZE,
        remember: int = 4096,
    ) -> None:
        self.audit = audit
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff_seconds = backoff_seconds
        self._queue: queue.Queue[WritebackJob] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remember = remember
        self._busy = 0

    def submit(self, job: WritebackJob) -> bool:
        """Queue ``job`` without blocking; False if it was already sent/queued or dropped."""
        with self._lock:
            if job.key in self._seen:
                return False
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                dropped = True
            else:
                dropped = False
                self._busy += 1
                self._seen[job.key] = None
                while len(self._seen) > self._remember:
                    self._seen.popitem(last=False)
                if self._worker is None or not self._worker.is_alive():
                    self._worker = threading.Thread(
                        target=self._run, name="fhir-writeback", daemon=True
                    )
                    self._worker.start()
        if dropped:
            log.warning(
                "fhir write-back queue full; job dropped", extra={"result_id": job.result_id}
            )
            self._record(job, WritebackOutcome.DROPPED, {"why": "queue full"})
        return not dropped

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued job is done (tests, shutdown); False on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if self._busy == 0:
                    return True
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Stop retrying (pending backoffs end at once) and let the worker finish."""
        self._stop.set()
        worker = self._worker
        if worker is not None:
            worker.join(timeout)

    def _run(self) -> None:
        session = requests.Session()
        try:
            while True:
                try:
                    job = self._queue.get(timeout=_IDLE_EXIT_SECONDS)
                except queue.Empty:
                    with self._lock:
                        if self._queue.empty():
                            self._worker = None
                            return
                    continue
                try:
                    self._send(session, job)
                except Exception as exc:  # never let one job kill the worker
                    log.exception(
                        "fhir write-back crashed", extra={"error_class": type(exc).__name__}
                    )
                finally:
                    with self._lock:
                        self._busy -= 1
        finally:
            session.close()

    def _send(self, session: requests.Session, job: WritebackJob) -> None:
        bundle = bundle_of(job.body)
        if bundle is None:
            return
        data = json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        if job.access_token:
            headers["Authorization"] = f"Bearer {job.access_token}"
        status: int | None = None
        error: str | None = None
        tried = 0
        for attempt in range(1, self.attempts + 1):
            if job.not_after is not None and time.monotonic() > job.not_after:
                error = "access token expired"
                break
            tried = attempt
            try:
                response = session.post(
                    job.server.rstrip("/"),
                    data=data,
                    headers=headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                )
            except requests.RequestException as exc:
                status, error = None, type(exc).__name__
            else:
                status = response.status_code
                if status == 200 and _is_transaction_response(response):
                    detail = {
                        "attempts": attempt,
                        "status": status,
                        "entries": len(bundle["entry"]),
                    }
                    self._record(job, WritebackOutcome.SUCCEEDED, detail)
                    return
                error = f"HTTP {status}" if status != 200 else "not a transaction-response"
                if status not in _RETRY_STATUSES:
                    break  # a refusal (or a wrong answer) will not change on retry
            if attempt < self.attempts and self._stop.wait(
                self.backoff_seconds * 2 ** (attempt - 1)
            ):
                break
        self._fail(job, tried, status, error)

    def _fail(
        self, job: WritebackJob, attempts: int, status: int | None, error: str | None
    ) -> None:
        log.warning(
            "fhir write-back failed",
            extra={"result_id": job.result_id, "status": status, "error": error},
        )
        detail: dict[str, Any] = {"attempts": attempts, "error": error}
        if status is not None:
            detail["status"] = status
        self._record(job, WritebackOutcome.FAILED, detail)
        with self._lock:  # a later call may try again
            self._seen.pop(job.key, None)

    def _record(self, job: WritebackJob, outcome: WritebackOutcome, detail: dict[str, Any]) -> None:
        detail = {
            "card": job.card_uuid,
            "hookInstance": job.hook_instance,
            "server": job.server,
            **detail,
        }
        try:
            self.audit.audit_many([(ACTOR, outcome.value, job.result_id, detail)])
        except Exception as exc:  # the audit database may be gone at shutdown
            log.warning("fhir write-back audit failed", extra={"error_class": type(exc).__name__})


def _is_transaction_response(response: requests.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return (
        isinstance(body, dict)
        and body.get("resourceType") == "Bundle"
        and body.get("type") == "transaction-response"
    )


_CREATE_LOCK = threading.Lock()


def server_allowed(server: str, allowlist: list[str] | tuple[str, ...]) -> bool:
    """The prefetch SSRF guard: only configured FHIR servers, when an allow-list is configured."""
    return not allowlist or any(server.startswith(prefix) for prefix in allowlist)


def writer_for(holder: Any, audit: AuditSink, *, timeout: float, attempts: int) -> FhirWriteback:
    """The per-process writer kept on ``holder.writeback`` (the ServiceState), made on first use."""
    writer = getattr(holder, "writeback", None)
    if isinstance(writer, FhirWriteback):
        return writer
    with _CREATE_LOCK:
        writer = getattr(holder, "writeback", None)
        if not isinstance(writer, FhirWriteback):
            writer = FhirWriteback(audit, timeout=timeout, attempts=attempts)
            holder.writeback = writer
        return writer
