"""Process entry points: ``her2low node`` (SCP + housekeeping) and ``her2low worker``."""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from dicom_node.db import MIGRATIONS, VERSION_TABLE, make_engine, make_sessionmaker
from dicom_node.jobs import scheduler
from dicom_node.jobs.taskqueue import make_huey, register
from dicom_node.receiving import scp
from dicom_node.receiving.ingest import Ingestor, recover
from dicom_node.receiving.storage import FileStore
from her2low.migrate import check_current
from her2low.settings import Settings

if TYPE_CHECKING:
    from dicom_node.jobs.pipeline import PipelineSettings

log = logging.getLogger(__name__)


def _sessions(settings: Settings) -> Any:
    check_current(MIGRATIONS, settings.node_database_url, what="node", version_table=VERSION_TABLE)
    return make_sessionmaker(make_engine(settings.node_database_url))


def pipeline_settings(settings: Settings) -> PipelineSettings:
    from dicom_node.jobs.pipeline import PipelineSettings

    return PipelineSettings(
        results_url=settings.node_results_url,
        results_token=settings.results_token(),
        quiet_seconds=settings.node_quiet_seconds,
    )


def run_node(settings: Settings, stop: threading.Event | None = None) -> None:
    """Listen for DICOM and turn stable series into queued jobs until ``stop`` (or a signal)."""
    stop = stop or threading.Event()
    sessions = _sessions(settings)
    store = FileStore(settings.storage_dir, dir_fsync=settings.node_durability == "full")
    ingestor = Ingestor(store, sessions)
    recover(ingestor)
    huey = make_huey(settings)
    task = register(huey, lambda job_id: None)  # producer side: only enqueues
    server = scp.start(settings, ingestor)
    _install_signal_handlers(stop)
    log.info(
        "dicom node listening",
        extra={
            "ae_title": settings.node_ae_title,
            "port": settings.node_port,
            "storage": str(settings.storage_dir),
        },
    )
    housekeeping = threading.Thread(
        target=scheduler.run_forever,
        args=(sessions, task, settings.node_quiet_seconds, stop.is_set),
        name="housekeeping",
        daemon=True,
    )
    housekeeping.start()
    try:
        stop.wait()
    finally:
        server.shutdown()
        housekeeping.join(timeout=5)
        log.info("dicom node stopped")


def run_worker(settings: Settings) -> None:
    """Consume analysis jobs (threads; run more processes or hosts to scale)."""
    from dicom_node.jobs.runner import run_job

    sessions = _sessions(settings)
    huey = make_huey(settings)
    config = pipeline_settings(settings)

    def work(job_id: str) -> None:
        run_job(sessions, config, job_id)

    register(huey, work)
    consumer = huey.create_consumer(
        workers=settings.worker_count,
        worker_type="thread",
        periodic=False,
        initial_delay=0.1,
        backoff=1.15,
        max_delay=0.5,  # queue polling interval at rest: bounds the wait for a new job
    )
    log.info("worker started", extra={"workers": settings.worker_count})
    consumer.run()


def _install_signal_handlers(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
