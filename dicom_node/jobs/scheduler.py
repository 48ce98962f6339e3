"""Series stability and job bookkeeping, driven by timestamps in the node database.

Stability is a heuristic (a quiet period after the last instance); it is re-evaluated from the
database on every tick, so a restart loses no series (only time the node listened counts as
quiet: :func:`promote_stable`), and a late instance simply re-opens the series (see
:mod:`dicom_node.receiving.ingest`). A series whose headers declare its size and that has fully
arrived is promoted at once (:func:`promote_complete`, :mod:`dicom_node.series.completeness`).
Jobs whose message was lost or whose worker died are re-queued here; the worker's claim makes
duplicates harmless.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import Instance, Job, JobState, Series, SeriesState
from dicom_node.series.completeness import CompletenessTracker

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


def _new_job(series: Series, now: float) -> Job:
    """A queued analysis job for the series' current generation."""
    return Job(
        id=str(uuid.uuid4()),
        series_instance_uid=series.series_instance_uid,
        generation=series.generation,
        state=JobState.QUEUED,
        created_at=now,
        updated_at=now,
    )


def promote_stable(
    sessions: sessionmaker[Session],
    quiet_seconds: float,
    *,
    now: float | None = None,
    listening_since: float = 0.0,
) -> list[str]:
    """Queue a job for every series quiet for ``quiet_seconds``; returns the new job ids.

    Quiet counts only while the node listens (since ``listening_since``): a sender cut off by
    a node crash or upgrade could not send, so after a restart it gets a whole quiet period to
    resume before a series it was sending is analysed half-received.
    """
    now = time.time() if now is None else now
    cutoff = now - quiet_seconds
    if listening_since > cutoff:
        return []
    job_ids: list[str] = []
    with sessions() as session:
        due = session.scalars(
            select(Series).where(
                Series.state == SeriesState.RECEIVING,
                Series.last_received_at <= cutoff,
            )
        ).all()
        # A study's SEG first: its diffusion series, due in the same tick, then find it done
        # instead of deferring for it.
        for series in sorted(due, key=lambda row: (row.modality != "SEG", row.last_received_at)):
            job = _new_job(series, now)
            session.add(job)
            series.state = SeriesState.QUEUED
            job_ids.append(job.id)
        session.commit()
    for job_id in job_ids:
        log.info("series stable; job queued", extra={"job_id": job_id})
    return job_ids


def promote_complete(
    sessions: sessionmaker[Session],
    tracker: CompletenessTracker,
    *,
    now: float | None = None,
) -> list[str]:
    """Queue a job for every receiving series its headers show complete; returns job ids.

    The promotion is conditional on the series being unchanged since it was assessed (same
    generation, instance count and last arrival), so an instance arriving meanwhile wins.
    """
    now = time.time() if now is None else now
    job_ids: list[str] = []
    watched: list[str] = []
    with sessions() as session:
        receiving = session.scalars(
            select(Series).where(Series.state == SeriesState.RECEIVING)
        ).all()
        for series in receiving:
            paths = list(
                session.scalars(
                    select(Instance.path)
                    .where(
                        Instance.series_instance_uid == series.series_instance_uid,
                        Instance.current.is_(True),
                    )
                    .order_by(Instance.id)
                )
            )
            watched.extend(paths)
            if len(paths) != series.instance_count:
                continue
            verdict = tracker.assess(paths)
            if not verdict.complete:
                continue
            promoted = session.execute(
                update(Series)
                .where(
                    Series.series_instance_uid == series.series_instance_uid,
                    Series.state == SeriesState.RECEIVING,
                    Series.generation == series.generation,
                    Series.instance_count == series.instance_count,
                    Series.last_received_at == series.last_received_at,
                )
                .values(state=SeriesState.QUEUED)
                .execution_options(synchronize_session=False)
            )
            if promoted.rowcount != 1:  # type: ignore[attr-defined]
                continue
            job = _new_job(series, now)
            session.add(job)
            session.commit()
            job_ids.append(job.id)
            log.info(
                "series complete by its headers; job queued",
                extra={
                    "job_id": job.id,
                    "series_uid": series.series_instance_uid,
                    "expected": verdict.expected,
                    "source": verdict.source.value if verdict.source else "",
                },
            )
        session.commit()
    tracker.forget_all_but(watched)
    return job_ids


def stale_jobs(
    sessions: sessionmaker[Session], *, requeue_after: float = 120.0, now: float | None = None
) -> list[str]:
    """Jobs to send again: queued too long without a worker claim, or running with a dead lease.

    The database is the job's state of record and the queue only wakes workers, so a message
    the queue lost (Redis restarted without persistence, a worker killed after taking it) is
    re-sent here. Rows are locked while decided (``FOR UPDATE SKIP LOCKED`` on PostgreSQL): a
    worker renewing its lease at that moment either wins or finds the job re-queued.
    """
    now = time.time() if now is None else now
    with sessions() as session:
        rows = session.scalars(
            select(Job)
            .where(
                or_(
                    (Job.state == JobState.QUEUED) & (Job.updated_at <= now - requeue_after),
                    (Job.state == JobState.RUNNING) & (Job.lease_expires_at < now),
                )
            )
            .with_for_update(skip_locked=True)
        ).all()
        ids = []
        for job in rows:
            if job.attempts >= MAX_ATTEMPTS:
                job.state = JobState.FAILED
                job.error = job.error or "gave up after repeated worker loss"
                series = session.get(Series, job.series_instance_uid)
                if series is not None and series.generation == job.generation:
                    series.state = SeriesState.FAILED
                    series.reason = job.error
                continue
            job.state = JobState.QUEUED
            job.updated_at = now
            ids.append(job.id)
        session.commit()
    return ids


def pending_jobs(sessions: sessionmaker[Session]) -> list[str]:
    """Every queued job: sent again at start-up in case the queue lost them."""
    with sessions() as session:
        return list(session.scalars(select(Job.id).where(Job.state == JobState.QUEUED)))


def run_forever(
    sessions: sessionmaker[Session],
    enqueue: Callable[[str], object],
    quiet_seconds: float,
    stop: Callable[[], bool],
    *,
    tick: float = 0.5,
    stale_every: float = 15.0,
    early_promotion: bool = True,
) -> None:
    """The node's housekeeping loop (a thread of ``her2low node``, started once it listens)."""
    listening_since = time.time()
    for job_id in pending_jobs(sessions):
        enqueue(job_id)
    last_stale = 0.0
    tracker = CompletenessTracker()
    while not stop():
        try:
            if early_promotion:
                for job_id in promote_complete(sessions, tracker):
                    enqueue(job_id)
            for job_id in promote_stable(sessions, quiet_seconds, listening_since=listening_since):
                enqueue(job_id)
            if time.monotonic() - last_stale >= stale_every:
                last_stale = time.monotonic()
                for job_id in stale_jobs(sessions):
                    log.warning("job re-queued", extra={"job_id": job_id})
                    enqueue(job_id)
        except Exception:  # keep the node alive; the next tick retries from the database
            log.exception("housekeeping tick failed")
        time.sleep(tick)


def reopen_series(
    sessions: sessionmaker[Session], series_uids: list[str], quiet_seconds: float
) -> None:
    """Make analysed series due again (e.g. a SEG for them arrived after their analysis)."""
    now = time.time()
    with sessions() as session:
        for series in session.scalars(
            select(Series).where(Series.series_instance_uid.in_(series_uids))
        ):
            if series.state in (SeriesState.DONE, SeriesState.FAILED):
                series.generation += 1
                series.state = SeriesState.RECEIVING
                series.last_received_at = min(series.last_received_at, now - quiet_seconds)
        session.commit()
