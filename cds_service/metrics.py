"""Operations endpoints of the CDS service: readiness and Prometheus metrics, defined here once.

* ``GET /healthz`` (in :mod:`cds_service.app`): the process answers.
* ``GET /readyz``: the database answers and the model is loaded — 200 with each check, or 503
  naming the failing one. The service has no queue (only the node and its workers do), so
  there is no queue check here; the node's side port checks its queue.
* ``GET /metrics``: Prometheus text. It tells how busy the service is and which model it runs,
  so it is not public: the caller presents the metrics bearer token (``HER2LOW_METRICS_TOKEN``,
  or home/secrets/metrics-token; Prometheus sends it with ``authorization: credentials_file``).
  It is not the results API token: a scraper holding that could publish results. A loopback
  exception would be worthless behind nginx, where every request comes from loopback.

Under gunicorn (``cds_service.wsgi.serve``) each worker is its own process: metrics then use
prometheus_client's multiprocess mode (:func:`enable_multiprocess`: one folder per service
instance under the home, emptied at start) and a scrape sums every worker, whichever answers.

Label values are bounded: a Flask endpoint name and an HTTP status, never a path or a patient.
"""

from __future__ import annotations

import hmac
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, jsonify, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import text

from cds_service.auth import bearer_token
from cds_service.errors import ApiError, IssueType
from cds_service.state import state
from her2low.core.readiness import readiness

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Flask endpoints timed by :data:`HOOK_SECONDS` (the CDS Hooks blueprint).
HOOK_ENDPOINTS = {"hooks.discovery", "hooks.call", "hooks.feedback"}
RESULTS_ENDPOINT = "results.publish"

HOOK_SECONDS = Histogram(
    "her2low_cds_hook_seconds",
    "CDS Hooks request latency (discovery, patient-view call, feedback) by endpoint and status",
    ["endpoint", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
RESULTS_RECEIVED = Counter(
    "her2low_cds_results_received",
    "Results posted by the node to /api/v1/results, by HTTP status (201 new, 200 repeat or "
    "revision, 4xx refused)",
    ["status"],
)
# Predictions refused for mismatched fit or discretisation settings are counted by
# cds_service.predictions.NOT_SCORED (her2low_results_not_scored_total{reason}).


def enable_multiprocess(folder: Path) -> None:
    """Switch this process (and the gunicorn workers it forks) to multiprocess metrics.

    Called by ``serve()`` before the workers start. The folder is emptied: files of an earlier
    run would otherwise be summed into this one. Metric values made after this call are kept
    in per-process files (prometheus_client picks its value class at import, so it is set here
    too); the service's metrics all have labels, so none holds a value made before.
    """
    from prometheus_client import values

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(folder)
    values.ValueClass = values.MultiProcessValue()


def exposition() -> bytes:
    """The metrics text: every worker's (multiprocess mode) or this process', plus the model."""
    model = CollectorRegistry(auto_describe=True)
    model.register(ModelCollector())
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry) + generate_latest(model)
    return generate_latest(REGISTRY) + generate_latest(model)


class ModelCollector:
    """``her2low_model_info{name,version,variant,reference}`` and ``her2low_model_loaded``,
    read from the scraping worker's runtime (the same files in every worker)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loaded = GaugeMetricFamily("her2low_model_loaded", "1 when the model runtime is loaded")
        info = GaugeMetricFamily(
            "her2low_model_info",
            "The model the service scores with (always 1): name, version, variant, reference",
            labels=["name", "version", "variant", "reference"],
        )
        try:
            runtime: Any = state().runtime.get()
        except Exception:
            loaded.add_metric([], 0.0)
            yield loaded
            return
        loaded.add_metric([], 1.0)
        yield loaded
        for variant in getattr(runtime, "variants", ()):
            try:
                model = runtime.model(variant)
                entry = model.entry
                info.add_metric(
                    [
                        str(entry.name),
                        str(entry.version),
                        str(getattr(variant, "value", variant)),
                        "true" if model.reference else "false",
                    ],
                    1.0,
                )
            except Exception:  # an injected predictor without a card: nothing to name
                continue
        yield info


def _database_ready() -> None:
    engine = state().engine
    url = engine.url
    is_file = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
    if is_file and not Path(str(url.database)).exists():
        raise RuntimeError("database file missing")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _model_ready() -> None:
    state().runtime.get()


READY_CHECKS = {"database": _database_ready, "model": _model_ready}


def init_app(app: Flask) -> None:
    """Add /readyz and /metrics and time the CDS Hooks endpoints (called by ``create_app``).

    Both routes sit on the app, outside every blueprint and sign-in: a probe or a scraper has
    no session.
    """

    @app.before_request
    def _start_clock() -> None:
        g.her2low_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = request.endpoint or ""
        if endpoint in HOOK_ENDPOINTS:
            started = g.get("her2low_started")
            if started is not None:
                HOOK_SECONDS.labels(endpoint.split(".", 1)[1], str(response.status_code)).observe(
                    time.perf_counter() - started
                )
        elif endpoint == RESULTS_ENDPOINT:
            RESULTS_RECEIVED.labels(str(response.status_code)).inc()
        return response

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        ready, body = readiness(READY_CHECKS)
        response = jsonify(body)
        response.headers["Cache-Control"] = "no-store"
        return response, 200 if ready else 503

    @app.get("/metrics")
    def metrics() -> Response:
        presented = bearer_token(request.headers.get("Authorization")) or ""
        # its own credential (HER2LOW_METRICS_TOKEN): a scraper cannot publish results
        expected = state().settings.metrics_scrape_token()
        if not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
            raise ApiError(
                401,
                "/metrics needs the metrics bearer token (HER2LOW_METRICS_TOKEN)",
                code=IssueType.LOGIN,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return Response(exposition(), mimetype=None, content_type=CONTENT_TYPE_LATEST)
