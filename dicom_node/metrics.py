"""Prometheus metrics of the DICOM node and its workers: every definition in one place.

Two kinds, on purpose:

* **Events counted where they happen** (module-level counters and a histogram): C-STORE
  outcomes in the node process (:mod:`dicom_node.receiving.scp`), job outcomes and latency in
  the worker process that ran the job (:mod:`dicom_node.jobs.runner`). Each process serves its
  own on its HTTP side port (:mod:`dicom_node.operations`): the node on ``node_metrics_port``,
  each worker on ``worker_metrics_port``. Prometheus sums them across targets.
* **State read from the node database at scrape time** (:class:`NodeStateCollector`): queue
  depth, series per state, exports pending and dead. The database is the state of record, so
  these are right whichever process scrapes and survive every restart.

Labels stay bounded: a DIMSE status name, a job outcome, a short reason key (never free text,
never a UID or anything about the patient).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import Job, JobState, Series, SeriesState
from dicom_node.receiving.status import StoreStatus

log = logging.getLogger(__name__)

INSTANCES_RECEIVED = Counter(
    "her2low_node_instances_received",
    "C-STORE requests answered Success, by outcome (stored, duplicate, new-version)",
    ["outcome"],
)
INSTANCES_REJECTED = Counter(
    "her2low_node_instances_rejected",
    "C-STORE requests answered with a failure status, by status name (PS3.4 Annex B)",
    ["status"],
)
SERIES_ANALYSED = Counter(
    "her2low_node_series_analysed", "Series analysed and published to the CDS service"
)
SERIES_SKIPPED = Counter(
    "her2low_node_series_skipped",
    "Series recorded but not analysed, by reason (a short key, e.g. not_a_diffusion_series_t1)",
    ["reason"],
)
JOBS_FAILED = Counter(
    "her2low_node_jobs_failed",
    "Analysis jobs that failed, by stage (analysis or publish)",
    ["stage"],
)
JOB_SECONDS = Histogram(
    "her2low_node_job_seconds",
    "Wall time of one analysis job in a worker, by outcome (done, skipped, failed, deferred)",
    ["outcome"],
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)

_KNOWN_OUTCOMES = {"stored", "duplicate", "new-version"}
_SLUG = re.compile(r"[^a-z0-9]+")


def record_store(status: StoreStatus, detail: str) -> None:
    """Count one C-STORE answer (called once per request by ``scp.handle_store``)."""
    if status is StoreStatus.SUCCESS:
        INSTANCES_RECEIVED.labels(detail if detail in _KNOWN_OUTCOMES else "stored").inc()
    else:
        INSTANCES_REJECTED.labels(status.name).inc()


def reason_key(reason: str, role: str = "") -> str:
    """A bounded label for a skip reason: its text before the first ':' as a slug (≤ 48)."""
    head = reason.split(":", 1)[0].lower()
    key = _SLUG.sub("_", head).strip("_")[:48]
    return key or (role or "unknown")


def record_job(outcome: str, seconds: float, *, reason: str = "", role: str = "") -> None:
    """Count one finished job run (called once by ``runner.run_job``).

    ``outcome``: done, skipped, deferred, retry (results API down), publish_failed or failed.
    """
    bucket = {"done": "done", "skipped": "skipped", "deferred": "deferred", "retry": "deferred"}
    JOB_SECONDS.labels(bucket.get(outcome, "failed")).observe(seconds)
    if outcome == "done":
        SERIES_ANALYSED.inc()
    elif outcome == "skipped":
        SERIES_SKIPPED.labels(reason_key(reason, role)).inc()
    elif outcome == "publish_failed":
        JOBS_FAILED.labels("publish").inc()
    elif outcome == "failed":
        JOBS_FAILED.labels("analysis").inc()


class NodeStateCollector(Collector):
    """Gauges computed from the node database on every scrape (queue depth, series, exports)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(
            "her2low_node_jobs",
            "Analysis jobs per state in the node database (queued = queue depth)",
            labels=["state"],
        )
        depth = GaugeMetricFamily(
            "her2low_node_queue_depth", "Analysis jobs waiting for a worker (state queued)"
        )
        series = GaugeMetricFamily(
            "her2low_node_series", "Series per state in the node database", labels=["state"]
        )
        exports = GaugeMetricFamily(
            "her2low_node_exports",
            "Result exports to DICOM destinations per state (pending, sending, done, dead)",
            labels=["state"],
        )
        try:
            with self.sessions() as session:
                job_counts = dict(
                    session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
                )
                series_counts = dict(
                    session.execute(select(Series.state, func.count()).group_by(Series.state)).all()
                )
            export_counts = _export_counts(self.sessions)
        except Exception:  # a scrape must answer; /readyz names the broken database
            log.exception("node metrics: database not readable")
            return
        for state in JobState:
            jobs.add_metric([state.value], float(job_counts.get(state, 0)))
        depth.add_metric([], float(job_counts.get(JobState.QUEUED, 0)))
        for sstate in SeriesState:
            series.add_metric([sstate.value], float(series_counts.get(sstate, 0)))
        yield jobs
        yield depth
        yield series
        if export_counts is not None:
            for name, count in export_counts.items():
                exports.add_metric([name], float(count))
            yield exports


def _export_counts(sessions: sessionmaker[Session]) -> dict[str, int] | None:
    """Exports per state, or None where the exports table is not part of this build."""
    try:
        from dicom_node.jobs.export import counts
    except ImportError:
        return None
    return counts(sessions)
