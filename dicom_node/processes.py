"""Process entry points: ``her2low node`` (SCP + housekeeping) and ``her2low worker``."""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from dicom_node.db import MIGRATIONS
from dicom_node.jobs import scheduler
from dicom_node.jobs.taskqueue import make_huey, register
from dicom_node.receiving import scp
from dicom_node.receiving.ingest import Ingestor, recover
from dicom_node.receiving.storage import FileStore
from her2low.core.database import make_engine, session_factory
from her2low.core.settings import Settings

if TYPE_CHECKING:
    from dicom_node.jobs.pipeline import PipelineSettings

log = logging.getLogger(__name__)


def _sessions(settings: Settings) -> Any:
    MIGRATIONS.check_current(settings.node_database_url)
    return session_factory(make_engine(settings.node_database_url))


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


def main(argv: list[str] | None = None) -> int:
    """``python -m dicom_node [node|worker]``: one node process, without the CDS service's code."""
    import argparse
    import sys

    from her2low.core.database import NotMigratedError
    from her2low.core.logs import configure
    from her2low.core.settings import ConfigurationError, load_settings

    parser = argparse.ArgumentParser(
        prog="python -m dicom_node",
        description="The DICOM node: the C-STORE SCP with its stability timers, or an analysis "
        "worker (the same as `her2low node` and `her2low worker`).",
    )
    parser.add_argument(
        "process",
        nargs="?",
        choices=["node", "worker"],
        default="node",
        help="which process to run (default: node)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        configure(settings.log_level, settings.log_format)
        (run_node if args.process == "node" else run_worker)(settings)
    except ConfigurationError as exc:
        print(f"{parser.prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    except NotMigratedError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    return 0
