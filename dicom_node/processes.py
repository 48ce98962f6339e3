"""Process entry points: ``her2low node`` (SCP + housekeeping) and ``her2low worker``."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from dicom_node import operations
from dicom_node.db import MIGRATIONS
from dicom_node.jobs import scheduler
from dicom_node.jobs.taskqueue import make_huey, register
from dicom_node.receiving import scp
from dicom_node.receiving.ingest import Ingestor, recover
from dicom_node.receiving.storage import FileStore
from her2low.core.database import make_engine, session_factory
from her2low.core.private_files import check_private, private_umask
from her2low.core.settings import Durability, Settings

if TYPE_CHECKING:
    from dicom_node.jobs.pipeline import PipelineSettings

log = logging.getLogger(__name__)


def _private_home(settings: Settings) -> None:
    """New files 0640 / folders 0750, and what an older run left world-readable tightened."""
    private_umask()
    check_private(settings.home, extra=(settings.storage_dir,))


def _sessions(settings: Settings) -> Any:
    MIGRATIONS.check_current(settings.node_database_url)
    return session_factory(make_engine(settings.node_database_url))


def pipeline_settings(settings: Settings) -> PipelineSettings:
    from dicom_node.analysis.series_analysis import analysis_settings
    from dicom_node.jobs.export import ExportConfig
    from dicom_node.jobs.pipeline import PipelineSettings

    return PipelineSettings(
        results_url=settings.node_results_url,
        results_token=settings.results_token(),
        quiet_seconds=settings.node_quiet_seconds,
        analysis=analysis_settings(settings.worker_fit_method, settings.worker_denoise),
        export=ExportConfig.from_settings(settings) if settings.node_export_destinations else None,
    )


def run_node(settings: Settings, stop: threading.Event | None = None) -> None:
    """Listen for DICOM and turn stable series into queued jobs until ``stop`` (or a signal)."""
    stop = stop or threading.Event()
    _private_home(settings)
    sessions = _sessions(settings)
    store = FileStore(settings.storage_dir, dir_fsync=settings.node_durability is Durability.FULL)
    ingestor = Ingestor(store, sessions, max_instance_bytes=settings.node_max_instance_bytes)
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
        # a dead worker's lease is noticed within a quarter lease of running out
        kwargs={"stale_every": min(15.0, settings.worker_lease_seconds / 4)},
        name="housekeeping",
        daemon=True,
    )
    housekeeping.start()
    side = operations.start_node(settings, sessions, huey, stop)  # /healthz /readyz /metrics
    try:
        stop.wait()
    finally:
        side.close()
        server.shutdown()
        housekeeping.join(timeout=5)
        log.info("dicom node stopped")


def run_worker(settings: Settings) -> None:
    """Consume analysis jobs (threads; run more processes or hosts to scale)."""
    from dicom_node.jobs.runner import PULSE, run_job, watch_queue

    _private_home(settings)
    sessions = _sessions(settings)
    huey = make_huey(settings)
    config = pipeline_settings(settings)

    def work(job_id: str) -> None:
        run_job(
            sessions,
            config,
            job_id,
            lease_seconds=settings.worker_lease_seconds,
            heartbeat_seconds=settings.worker_heartbeat_seconds,
        )

    register(huey, work)
    watch_queue(huey)  # every poll beats the runner's pulse: readiness sees a stalled runner
    operations.start_worker(settings, sessions, huey, PULSE)  # job metrics, readiness
    if config.export is not None:  # sends run beside the queue: a dead PACS blocks no analysis
        from dicom_node.jobs.export import run_forever as run_exports

        threading.Thread(
            target=run_exports,
            args=(sessions, config.export.destinations, config.export.policy, lambda: False),
            name="exports",
            daemon=True,
        ).start()
        from dicom_node.jobs import results_sync  # export states → service, assessments → SR

        results_sync.start_thread(sessions, settings, config.export)
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


NODE_HELP = "run the DICOM node: the C-STORE SCP and its series stability timers"
NODE_DESCRIPTION = (
    "Listen for DICOM associations (C-ECHO, C-STORE) and turn each stable series into a queued "
    "analysis job. Everything is configured by HER2LOW_* settings (`her2low config --show`, "
    "section [node]); the database must be migrated first (`her2low db upgrade`)."
)
WORKER_HELP = "run analysis workers: DKI fit, ROI, features, publishing to the CDS service"
WORKER_DESCRIPTION = (
    "Take analysis jobs from the queue (HER2LOW_QUEUE_URL) and publish results to the CDS "
    "service's results API (HER2LOW_NODE_RESULTS_URL). Run more processes, or hosts, to scale; "
    "HER2LOW_WORKER_COUNT sets the threads of this one."
)


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The node takes no options: every setting is a HER2LOW_* variable (one place, documented)."""


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker takes no options either (HER2LOW_WORKER_COUNT, HER2LOW_QUEUE_URL)."""


def run_node_command(args: argparse.Namespace) -> int:
    """``her2low node`` / ``python -m dicom_node node``: run until SIGTERM or Ctrl-C (exit 0)."""
    import errno
    import sys

    from her2low.core.commands import configured_settings

    settings = configured_settings()
    try:
        run_node(settings)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        print(
            f"her2low node: error: port {settings.node_port} (HER2LOW_NODE_PORT) is already in "
            "use; is another node running?",
            file=sys.stderr,
        )
        return 1
    return 0


def run_worker_command(args: argparse.Namespace) -> int:
    """``her2low worker`` / ``python -m dicom_node worker``."""
    from her2low.core.commands import configured_settings

    run_worker(configured_settings())
    return 0


COMMANDS = {
    "node": (NODE_HELP, NODE_DESCRIPTION, add_node_arguments, run_node_command),
    "worker": (WORKER_HELP, WORKER_DESCRIPTION, add_worker_arguments, run_worker_command),
}


def main(argv: list[str] | None = None) -> int:
    """``python -m dicom_node [node|worker]``: one node process, without the CDS service's code."""
    from her2low.core.commands import Parser, run_guarded

    parser = Parser(
        prog="python -m dicom_node",
        description="The DICOM node: the C-STORE SCP with its stability timers, or an analysis "
        "worker (the same as `her2low node` and `her2low worker`).",
    )
    sub = parser.add_subparsers(dest="process", metavar="PROCESS")
    for name, (help_, description, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=description)
        add_arguments(p)
        p.set_defaults(func=run)
    args = parser.parse_args(argv)
    if args.process is None:  # `python -m dicom_node` alone runs the node, as before
        args = parser.parse_args(["node"])
    return run_guarded(parser.prog, args.func, args)
