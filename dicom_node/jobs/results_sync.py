"""Keeping the service and the PACS in step with the node's result objects (issue 14).

Two directions, one loop (:func:`run_forever`, a thread of ``her2low worker`` beside the export
thread, so neither a slow service nor a slow PACS holds the other up):

- **export states → service** (:mod:`dicom_node.jobs.export_reports`): every export state change
  is reported, from durable "last reported" marks, so nothing is lost while the service is down;
- **assessments → PACS** (:mod:`dicom_node.jobs.assessment_sync`): the service's newer
  descriptors or likelihood become a revised SR, queued to the original's destinations.

Both speak through :class:`~dicom_node.jobs.results_client.ResultsClient`. The names callers use
are re-exported here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.jobs.assessment_sync import (
    apply_assessment,
    get_cursor,
    parse_page,
    poll_assessments,
    record_original,
)
from dicom_node.jobs.export import ExportConfig
from dicom_node.jobs.export_reports import export_report, report_exports, unreported_series
from dicom_node.jobs.publish import PublishError
from dicom_node.jobs.results_client import ResultsClient, SyncConfig
from dicom_node.jobs.results_state import ExportReported, MeasurementReportRecord, SyncState
from her2low.core.settings import Settings

__all__ = [
    "Backoff",
    "ExportReported",
    "MeasurementReportRecord",
    "ResultsClient",
    "SyncConfig",
    "SyncState",
    "apply_assessment",
    "export_report",
    "get_cursor",
    "parse_page",
    "poll_assessments",
    "record_original",
    "report_exports",
    "run_forever",
    "start_thread",
    "unreported_series",
]

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    """In-memory wait after the service failed: 5 s doubling to 5 min. Losing it on a restart
    costs one early attempt; the durable state is the unreported rows themselves."""

    base: float = 5.0
    cap: float = 300.0
    failures: int = 0
    until: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.until

    def failed(self, now: float) -> None:
        self.failures += 1
        self.until = now + min(self.cap, self.base * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures, self.until = 0, 0.0


def run_forever(
    sessions: sessionmaker[Session],
    config: SyncConfig,
    stop: Callable[[], bool],
    *,
    tick: float = 1.0,
    retry_base: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """The results-sync thread of ``her2low worker``: report states, poll, until ``stop()``.

    After a failure each side waits ``retry_base`` seconds, doubling up to 5 minutes.
    """
    reports, polls = Backoff(base=retry_base), Backoff(base=retry_base)
    next_poll = clock()
    while not stop():
        now = clock()
        if reports.ready(now):
            try:
                _, down = report_exports(sessions, config.client)
                if down:
                    reports.failed(now)
                else:
                    reports.succeeded()
            except Exception:  # the database or a bug: keep going, the state is durable
                log.exception("export state reporting failed")
                reports.failed(now)
        if config.poll_seconds > 0 and now >= next_poll and polls.ready(now):
            next_poll = now + config.poll_seconds
            try:
                poll_assessments(sessions, config)
                polls.succeeded()
            except PublishError as exc:
                log.warning("assessments not fetched", extra={"err": str(exc)[:300]})
                polls.failed(now)
            except Exception:
                log.exception("assessment poll failed")
                polls.failed(now)
        time.sleep(tick)


def start_thread(sessions: sessionmaker[Session], settings: Settings, export: ExportConfig) -> Any:
    """Start :func:`run_forever` as a daemon thread (the worker's wiring)."""
    import threading

    thread = threading.Thread(
        target=run_forever,
        args=(sessions, SyncConfig.from_settings(settings, export), lambda: False),
        name="results-sync",
        daemon=True,
    )
    thread.start()
    return thread
