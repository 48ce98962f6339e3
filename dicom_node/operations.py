"""What operators run beside the DICOM node: the HTTP side port and the retention step.

The **side port** (``node_metrics_host``:``node_metrics_port`` for ``her2low node``,
``worker_metrics_port`` for each ``her2low worker`` process; 0 turns it off) is a tiny threaded
WSGI server in a daemon thread, apart from the DICOM port:

* ``GET /healthz`` — the process is alive (200, always).
* ``GET /readyz`` — the node database answers, the queue answers, the DICOM store is writable,
  and for a worker its runner's heartbeat is recent (a queue poll or a lease renewal within
  ``worker_lease_seconds``: a worker alive with a stalled runner is not ready): 200 with every
  check, or 503 naming the failing one(s). Probes need no credential.
* ``GET /metrics`` — Prometheus text (:mod:`dicom_node.metrics`), for the bearer token
  ``HER2LOW_METRICS_TOKEN`` only (home/secrets/metrics-token by default; not the results API
  token, which could publish results). The node adds the gauges read from its database; a
  worker serves only what its own jobs counted, so Prometheus sums workers without counting
  the database twice.

Workers are separate processes, and each serves its own counters on its own port (rather than
prometheus_client's multiprocess mode): workers may run on other hosts, a killed worker leaves
no stale files behind, and every target is one process Prometheus can see go down.

**Retention** (``node_retention_days``; 0 keeps everything, the default): once an hour the node
deletes the received DICOM files of series whose analysis finished (done or skipped) more than N
days ago. It never touches a series still receiving, queued, analysing or failed, nor a file that
arrived after the cut-off (a late instance re-opens its series), nor anything outside the store.
The index rows stay (the audit of what was received); a re-sent identical instance is then
acknowledged as a duplicate without being analysed again.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import Instance, Job, JobState, Series, SeriesState
from dicom_node.metrics import NodeStateCollector
from her2low.core.readiness import Check, Pulse, pulse_check, readiness
from her2low.core.settings import Settings

log = logging.getLogger(__name__)

RETENTION_EVERY_SECONDS = 3600.0
#: Finished series: their files are no longer needed for analysis.
FINISHED = (SeriesState.DONE, SeriesState.SKIPPED)


# --- readiness checks ---------------------------------------------------------------------------


def database_check(sessions: sessionmaker[Session]) -> Check:
    """The node database answers (and, for SQLite, its file is still there)."""

    def check() -> None:
        engine = sessions.kw["bind"]
        url = engine.url
        is_file = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
        if is_file and not Path(str(url.database)).exists():
            raise RuntimeError("database file missing")
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    return check


def queue_check(huey: Any) -> Check:
    """The Huey storage (SQLite file or Redis) answers."""

    def check() -> None:
        huey.pending_count()

    return check


def storage_check(folder: Path) -> Check:
    """A file can be created and removed in the DICOM store (disk mounted, not read-only)."""

    def check() -> None:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".readyz-"):
            pass

    return check


# --- the side port ------------------------------------------------------------------------------


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up a probe or the process exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log; nothing here is an event."""


def side_app(
    checks: dict[str, Check], registries: Iterable[Any], token: str
) -> Callable[..., Iterable[bytes]]:
    """The WSGI app of the side port: /healthz, /readyz, /metrics (``token`` only), 404 else."""
    registries = tuple(registries)
    expected = f"Bearer {token}".encode()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _send(start_response, "405 Method Not Allowed", {"error": "GET only"})
        if path == "/healthz":
            return _send(start_response, "200 OK", {"status": "ok"})
        if path == "/readyz":
            ready, body = readiness(checks)
            return _send(start_response, "200 OK" if ready else "503 Service Unavailable", body)
        if path == "/metrics":
            presented = environ.get("HTTP_AUTHORIZATION", "").encode()
            if not token or not hmac.compare_digest(presented, expected):
                return _send(
                    start_response,
                    "401 Unauthorized",
                    {"error": "/metrics needs the metrics bearer token (HER2LOW_METRICS_TOKEN)"},
                    [("WWW-Authenticate", "Bearer")],
                )
            payload = b"".join(generate_latest(r) for r in registries)
            start_response(
                "200 OK",
                [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(payload)))],
            )
            return [payload]
        return _send(start_response, "404 Not Found", {"error": "not found"})

    return app


def _send(
    start_response: Callable[..., Any],
    status: str,
    body: dict[str, Any],
    headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            *headers,
        ],
    )
    return [data]


@dataclass
class SidePort:
    """The running side port (or none) and the node's retention thread; ``close()`` stops them."""

    server: WSGIServer | None = None
    thread: threading.Thread | None = None
    retention: threading.Thread | None = None
    stop: threading.Event | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_port) if self.server is not None else 0

    def close(self) -> None:
        if self.stop is not None:
            self.stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.retention is not None:
            self.retention.join(timeout=5)


def _serve(host: str, port: int, app: Callable[..., Iterable[bytes]], what: str) -> SidePort:
    if port == 0:
        return SidePort()
    try:
        server = make_server(
            host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
    except OSError as exc:  # metrics are never a reason to stop receiving or analysing
        log.warning(
            "side port not started", extra={"what": what, "port": port, "err": str(exc)[:200]}
        )
        return SidePort()
    thread = threading.Thread(target=server.serve_forever, name=f"{what}-side-port", daemon=True)
    thread.start()
    log.info("side port listening", extra={"what": what, "host": host, "port": port})
    return SidePort(server=server, thread=thread)


def start_node(
    settings: Settings, sessions: sessionmaker[Session], huey: Any, stop: threading.Event
) -> SidePort:
    """The node's side port (with the database gauges) and its retention thread."""
    state = CollectorRegistry(auto_describe=True)
    state.register(NodeStateCollector(sessions))
    checks = {
        "database": database_check(sessions),
        "queue": queue_check(huey),
        "storage": storage_check(settings.storage_dir),
    }
    side = _serve(
        settings.node_metrics_host,
        settings.node_metrics_port,
        side_app(checks, (REGISTRY, state), settings.metrics_scrape_token()),
        "node",
    )
    side.stop = threading.Event()
    if settings.node_retention_days > 0:
        side.retention = threading.Thread(
            target=retention_forever,
            args=(sessions, settings.storage_dir, settings.node_retention_days),
            kwargs={"stop": lambda: stop.is_set() or bool(side.stop and side.stop.is_set())},
            name="retention",
            daemon=True,
        )
        side.retention.start()
    return side


def start_worker(
    settings: Settings, sessions: sessionmaker[Session], huey: Any, pulse: Pulse | None = None
) -> SidePort:
    """A worker's side port: its own job metrics, and its readiness.

    ``pulse`` is the runner's heartbeat (``dicom_node.jobs.runner.PULSE``, beaten by queue polls
    and lease renewals): ready only while it beat within a lease, so a worker process that is
    alive but whose runner stalled is taken out of rotation and restarted by its orchestrator.
    """
    checks = {
        "database": database_check(sessions),
        "queue": queue_check(huey),
        "storage": storage_check(settings.storage_dir),
    }
    if pulse is not None:
        checks["runner"] = pulse_check(pulse, settings.worker_lease_seconds, "runner heartbeat")
    return _serve(
        settings.node_metrics_host,
        settings.worker_metrics_port,
        side_app(checks, (REGISTRY,), settings.metrics_scrape_token()),
        "worker",
    )


# --- retention ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetentionReport:
    """What one retention pass removed."""

    series: int = 0
    files: int = 0
    bytes: int = 0


def _finished_before(session: Session, cutoff: float) -> list[tuple[str, int]]:
    """(series UID, generation) of finished series whose last job ended before ``cutoff``."""
    finished_at = (
        select(Job.series_instance_uid, Job.generation, func.max(Job.updated_at).label("at"))
        .where(Job.state == JobState.DONE)
        .group_by(Job.series_instance_uid, Job.generation)
        .subquery()
    )
    rows = session.execute(
        select(Series.series_instance_uid, Series.generation)
        .join(
            finished_at,
            (finished_at.c.series_instance_uid == Series.series_instance_uid)
            & (finished_at.c.generation == Series.generation),
        )
        .where(
            Series.state.in_(FINISHED),
            finished_at.c.at <= cutoff,
            Series.last_received_at <= cutoff,
        )
    ).all()
    return [(str(uid), int(gen)) for uid, gen in rows]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def apply_retention(
    sessions: sessionmaker[Session],
    storage_dir: Path,
    days: float,
    *,
    now: float | None = None,
) -> RetentionReport:
    """Delete the files of series finished more than ``days`` ago; 0 days deletes nothing."""
    if days <= 0:
        return RetentionReport()
    now = time.time() if now is None else now
    cutoff = now - days * 86400.0
    series_count = files = size = 0
    with sessions() as session:
        candidates = _finished_before(session, cutoff)
    for uid, generation in candidates:
        with sessions() as session:
            series = session.get(Series, uid)
            # Re-checked just before deleting: an instance arriving meanwhile re-opens the series.
            if series is None or series.state not in FINISHED or series.generation != generation:
                continue
            paths = session.scalars(
                select(Instance.path).where(
                    Instance.series_instance_uid == uid, Instance.received_at <= cutoff
                )
            ).all()
        removed = 0
        for name in paths:
            path = Path(name)
            if not _inside(path, storage_dir):
                log.warning(
                    "retention: path outside the store left alone", extra={"series_uid": uid}
                )
                continue
            try:
                length = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning(
                    "retention: file not deleted", extra={"series_uid": uid, "err": str(exc)}
                )
                continue
            removed += 1
            size += length
            _prune_empty(path.parent, storage_dir)
        if removed:
            series_count += 1
            files += removed
            log.info("retention: series files deleted", extra={"series_uid": uid, "files": removed})
    return RetentionReport(series=series_count, files=files, bytes=size)


def _prune_empty(folder: Path, root: Path) -> None:
    """Remove the emptied series folder, then its study folder, never the store itself."""
    root = root.resolve()
    for current in _parents_until(folder.resolve(), root):
        try:
            os.rmdir(current)
        except OSError:
            return


def _parents_until(folder: Path, root: Path) -> Iterator[Path]:
    while folder != root and root in folder.parents:
        yield folder
        folder = folder.parent


def retention_forever(
    sessions: sessionmaker[Session],
    storage_dir: Path,
    days: float,
    *,
    stop: Callable[[], bool],
    every: float = RETENTION_EVERY_SECONDS,
) -> None:
    """The retention step of the node's housekeeping: one pass now, then one every ``every`` s."""
    next_run = 0.0
    while not stop():
        if time.monotonic() >= next_run:
            next_run = time.monotonic() + every
            try:
                report = apply_retention(sessions, storage_dir, days)
                if report.files:
                    log.info(
                        "retention pass",
                        extra={
                            "series": report.series,
                            "files": report.files,
                            "bytes": report.bytes,
                        },
                    )
            except Exception:  # the next pass retries; receiving is never affected
                log.exception("retention pass failed")
        time.sleep(0.5)
