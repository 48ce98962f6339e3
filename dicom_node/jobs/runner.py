"""Run one analysis job: claim it, analyse its series, publish, and record the outcome.

A claim is a conditional update (queued → running with a lease), so a job sent twice runs once,
also with several workers on PostgreSQL: the second ``UPDATE … WHERE state = 'queued'`` waits for
the first one's row lock, re-reads the row and matches nothing. The lease is short and renewed
by a heartbeat thread while the job runs, so a worker killed mid-job (``kill -9``, a lost host)
has its job re-queued by the node's scheduler within a lease, not after a fixed long timeout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from types import TracebackType
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import Job, JobState, Series, SeriesState
from dicom_node.jobs.pipeline import Deferred, PipelineSettings, Skipped, run_pipeline
from dicom_node.jobs.publish import PublishError
from dicom_node.metrics import record_job
from her2low.core.readiness import Pulse

log = logging.getLogger(__name__)

#: Default lease (``HER2LOW_WORKER_LEASE_SECONDS``); the heartbeat renews it while a job runs.
LEASE_SECONDS = 20.0
#: Default renewal interval (``HER2LOW_WORKER_HEARTBEAT_SECONDS``).
HEARTBEAT_SECONDS = 5.0

#: This worker process' runner pulse, for its readiness (``dicom_node.operations.start_worker``):
#: every queue poll of the consumer's threads beats it (:func:`watch_queue`), and so does every
#: lease renewal while a job runs; a runner that does neither is stalled, not ready.
PULSE = Pulse()


def watch_queue(huey: Any, pulse: Pulse = PULSE) -> None:
    """Beat ``pulse`` whenever a consumer thread polls ``huey`` for a job (every ≤ 0.5 s idle)."""
    dequeue = huey.dequeue

    def polled(*args: Any, **kwargs: Any) -> Any:
        pulse.beat()
        return dequeue(*args, **kwargs)

    huey.dequeue = polled


class RetryLater(RuntimeError):
    """Raised to the queue so that it runs the job again after a delay."""


def claim(
    sessions: sessionmaker[Session],
    job_id: str,
    *,
    now: float | None = None,
    lease_seconds: float = LEASE_SECONDS,
) -> Job | None:
    """Take a queued job (running, one more attempt, a lease); None if anyone else has it."""
    now = time.time() if now is None else now
    with sessions() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                attempts=Job.attempts + 1,
                lease_expires_at=now + lease_seconds,
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


def renew_lease(
    sessions: sessionmaker[Session], job: Job, lease_seconds: float, *, now: float | None = None
) -> bool:
    """Extend the lease of ``job`` as this worker claimed it; False once it is no longer ours.

    The condition (still running, same attempt) makes a worker that lost its lease — paused
    past it, cut off from the database — unable to take the job back from its new owner.
    """
    now = time.time() if now is None else now
    with sessions() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.RUNNING, Job.attempts == job.attempts)
            .values(lease_expires_at=now + lease_seconds)
        )
        session.commit()
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


class Heartbeat:
    """A thread renewing a running job's lease every ``every`` seconds until the job ends.

    A failed renewal (database briefly unreachable) is logged and retried at the next beat; the
    lease is several beats long, so one miss does not lose the job.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job: Job,
        *,
        lease_seconds: float,
        every: float,
        pulse: Pulse = PULSE,
    ) -> None:
        self.sessions = sessions
        self.job = job
        self.pulse = pulse
        self.lease_seconds = lease_seconds
        self.every = min(every, lease_seconds / 3)
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job.id[:8]}", daemon=True)

    def _run(self) -> None:
        extra = {"job_id": self.job.id}
        while not self._stop.wait(self.every):
            try:
                if not renew_lease(self.sessions, self.job, self.lease_seconds):
                    self.lost = True
                    log.warning("job lease lost to another worker", extra=extra)
                    return
                self.pulse.beat()  # the runner works on a job it still holds
            except Exception as exc:
                log.warning("lease renewal failed", extra={**extra, "err": str(exc)[:300]})

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every + 5)


def _ours(stored: Job | None, job: Job) -> bool:
    """The stored job is still the run this worker claimed (not re-queued and taken over)."""
    return (
        stored is not None and stored.state == JobState.RUNNING and stored.attempts == job.attempts
    )


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
        stored = session.get(Job, job.id, with_for_update=True)
        series = session.get(Series, job.series_instance_uid)
        if stored is None or series is None:
            return
        if not _ours(stored, job):  # our lease ran out and another worker owns the job now
            log.warning("job outcome dropped: lease lost", extra={"job_id": job.id})
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
        stored = session.get(Job, job.id, with_for_update=True)
        if stored is not None and _ours(stored, job):
            stored.attempts = max(0, stored.attempts - 1)
            stored.state = JobState.QUEUED
            stored.updated_at = time.time()
            stored.error = reason
            series = session.get(Series, job.series_instance_uid)
            if series is not None and series.generation == job.generation:
                series.state = SeriesState.QUEUED
            session.commit()


def run_job(
    sessions: sessionmaker[Session],
    settings: PipelineSettings,
    job_id: str,
    *,
    lease_seconds: float = LEASE_SECONDS,
    heartbeat_seconds: float = HEARTBEAT_SECONDS,
) -> None:
    """Entry point of the queue task. Raises :class:`RetryLater` for transient problems."""
    job = claim(sessions, job_id, lease_seconds=lease_seconds)
    if job is None:
        log.info("job already taken or finished", extra={"job_id": job_id})
        return
    extra = {"job_id": job.id, "series_uid": job.series_instance_uid}
    log.info("job claimed", extra={**extra, "attempt": job.attempts, "worker_pid": os.getpid()})
    started = time.perf_counter()
    try:
        with Heartbeat(sessions, job, lease_seconds=lease_seconds, every=heartbeat_seconds):
            outcome = run_pipeline(sessions, job.series_instance_uid, settings)
    except Skipped as skip:
        log.info("series not analysed", extra={**extra, "reason": skip.reason, "role": skip.role})
        record_job("skipped", time.perf_counter() - started, reason=skip.reason, role=skip.role)
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
        record_job("deferred", time.perf_counter() - started)
        requeue(sessions, job, str(wait))
        raise RetryLater(str(wait)) from wait
    except PublishError as exc:
        if exc.transient:
            log.warning(
                "results API unavailable; job re-queued", extra={**extra, "err": str(exc)[:300]}
            )
            record_job("retry", time.perf_counter() - started)
            requeue(sessions, job, str(exc))
            raise RetryLater(str(exc)) from exc
        log.error("publish failed", extra={**extra, "err": str(exc)[:300]})
        record_job("publish_failed", time.perf_counter() - started)
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
        record_job("failed", time.perf_counter() - started)
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
    record_job("done", time.perf_counter() - started)  # dicom_node.metrics
    log.info(
        "series analysed and published",
        extra={
            **extra,
            "result_id": outcome.result_id,
            "publish_status": outcome.publish_status,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
