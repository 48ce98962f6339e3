"""Run one analysis job: claim it, analyse its series, publish, and record the outcome.

A claim is a conditional update (queued → running with a lease), so a job sent twice runs once,
and a job whose worker died is taken over once its lease expires.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import Job, JobState, Series, SeriesState
from dicom_node.jobs.pipeline import Deferred, PipelineSettings, Skipped, run_pipeline
from dicom_node.jobs.publish import PublishError

log = logging.getLogger(__name__)

LEASE_SECONDS = 600.0


class RetryLater(RuntimeError):
    """Raised to the queue so that it runs the job again after a delay."""


def claim(sessions: sessionmaker[Session], job_id: str, *, now: float | None = None) -> Job | None:
    now = time.time() if now is None else now
    with sessions() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                attempts=Job.attempts + 1,
                lease_expires_at=now + LEASE_SECONDS,
                updated_at=now,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            return None
        job = session.get(Job, job_id)
        assert job is not None
        series = session.get(Series, job.series_instance_uid)
        if series is not None and series.generation == job.generation:
            series.state = SeriesState.ANALYSING
        session.commit()
        return job


def _finish(
    sessions: sessionmaker[Session],
    job: Job,
    *,
    job_state: JobState,
    series_state: SeriesState,
    reason: str = "",
    result_id: str = "",
    role: str = "",
) -> None:
    now = time.time()
    with sessions() as session:
        stored = session.get(Job, job.id)
        series = session.get(Series, job.series_instance_uid)
        if stored is None or series is None:
            return
        stored.state = job_state
        stored.updated_at = now
        stored.error = reason if job_state is not JobState.DONE else ""
        stored.result_id = result_id
        if result_id:
            stored.latency_seconds = now - series.last_received_at
        if series.generation == job.generation:  # a newer generation owns the series otherwise
            series.state = series_state
            series.reason = reason
            series.role = role or series.role
            if job_state is JobState.DONE:
                series.analysed_generation = job.generation
                series.result_id = result_id or series.result_id
        session.commit()


def requeue(sessions: sessionmaker[Session], job: Job, reason: str) -> None:
    """Queue the job again without counting this run as an attempt.

    Attempts count worker deaths and analysis failures; waiting for a SEG or for the CDS
    service to come back is neither, so an outage of any length never fails a job: the queue
    retries it, then the scheduler re-sends it every few minutes until it publishes.
    """
    with sessions() as session:
        stored = session.get(Job, job.id)
        if stored is not None:
            stored.attempts = max(0, stored.attempts - 1)
            stored.state = JobState.QUEUED
            stored.updated_at = time.time()
            stored.error = reason
            series = session.get(Series, job.series_instance_uid)
            if series is not None and series.generation == job.generation:
                series.state = SeriesState.QUEUED
            session.commit()


def run_job(sessions: sessionmaker[Session], settings: PipelineSettings, job_id: str) -> None:
    """Entry point of the queue task. Raises :class:`RetryLater` for transient problems."""
    job = claim(sessions, job_id)
    if job is None:
        log.info("job already taken or finished", extra={"job_id": job_id})
        return
    extra = {"job_id": job.id, "series_uid": job.series_instance_uid}
    started = time.perf_counter()
    try:
        outcome = run_pipeline(sessions, job.series_instance_uid, settings)
    except Skipped as skip:
        log.info("series not analysed", extra={**extra, "reason": skip.reason, "role": skip.role})
        _finish(
            sessions,
            job,
            job_state=JobState.DONE,
            series_state=SeriesState.SKIPPED,
            reason=skip.reason,
            role=skip.role,
        )
        return
    except Deferred as wait:
        log.info("job deferred", extra={**extra, "reason": str(wait)})
        requeue(sessions, job, str(wait))
        raise RetryLater(str(wait)) from wait
    except PublishError as exc:
        if exc.transient:
            log.warning(
                "results API unavailable; job re-queued", extra={**extra, "err": str(exc)[:300]}
            )
            requeue(sessions, job, str(exc))
            raise RetryLater(str(exc)) from exc
        log.error("publish failed", extra={**extra, "err": str(exc)[:300]})
        _finish(
            sessions,
            job,
            job_state=JobState.FAILED,
            series_state=SeriesState.FAILED,
            reason=str(exc),
        )
        return
    except Exception as exc:
        log.exception("analysis failed", extra=extra)
        _finish(
            sessions,
            job,
            job_state=JobState.FAILED,
            series_state=SeriesState.FAILED,
            reason=f"{type(exc).__name__}: {exc}"[:1000],
        )
        return
    _finish(
        sessions,
        job,
        job_state=JobState.DONE,
        series_state=SeriesState.DONE,
        result_id=outcome.result_id,
        role=outcome.role,
    )
    log.info(
        "series analysed and published",
        extra={
            **extra,
            "result_id": outcome.result_id,
            "publish_status": outcome.publish_status,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
