"""Application factory of the CDS service (Flask ``create_app`` pattern; nothing built at import).

``create_app`` refuses to start on an un-migrated database and on malformed trust settings, and
warns loudly when JWT checks are off (local development only).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

from flask import Flask, Request, Response, jsonify
from flask.sessions import SessionInterface, SessionMixin

from cds_service.auth import JwksCache, TokenVerifier, parse_trusted_issuers
from cds_service.cors import init_cors
from cds_service.db import MIGRATIONS
from cds_service.errors import register_error_handlers
from cds_service.metrics import init_app as init_metrics
from cds_service.predictions import PredictionService, Predictor, RuntimeProvider
from cds_service.qc_gate import QcThresholds
from cds_service.request_json import MAX_BODY_BYTES
from cds_service.state import EXTENSION_KEY, ServiceState
from cds_service.store import Store
from cds_service.store.lookup_cache import HookLookupCache
from her2low.core.database import make_engine, session_factory
from her2low.core.settings import Settings, load_settings

log = logging.getLogger(__name__)
RECOMPUTE_KEY = "her2low_recompute"  # the background re-scoring job (cds_service.recompute)


class AppPart(StrEnum):
    """Which endpoints an app serves: all (one port, the default), or one side of a split."""

    ALL = "all"
    HOOKS = "hooks"  # CDS Hooks + results API: what the EHR and the node call
    REVIEW = "review"  # the tumour-board web app: what clinicians' browsers open


def create_app(
    settings: Settings | None = None,
    *,
    runtime: Predictor | None = None,
    part: AppPart = AppPart.ALL,
) -> Flask:
    """Build the service app.

    ``runtime``: anything with ``predict(inputs) -> Prediction``; None loads
    ``models.runtime.ModelRuntime.load(settings.model_dir)`` on first use.
    ``part``: with ``review_port`` set, the hooks port and the review port each get their own app
    (``cds_service.wsgi``), so the hospital can expose one without the other.
    Raises ``her2low.core.database.NotMigratedError`` if the database is not at head.
    """
    settings = settings or load_settings()
    url = settings.cds_database_url
    engine = make_engine(url)
    try:
        MIGRATIONS.check_current(url, engine)
    except Exception:
        engine.dispose()
        raise
    policies = parse_trusted_issuers(settings.cds_trusted_issuers)
    if not settings.cds_auth_required:
        log.warning(
            "!!! CDS Hooks JWT authentication is DISABLED (HER2LOW_CDS_AUTH_REQUIRED=false): "
            "any caller can read cards. Local development only — never in production. !!!"
        )
    elif not policies:
        log.warning("no trusted CDS client issuers configured: every CDS Hooks call will get 401")
    store = Store(session_factory(engine))
    provider = RuntimeProvider(runtime, settings.model_dir)
    verifier = TokenVerifier(
        policies,
        max_lifetime=settings.cds_jwt_max_lifetime_seconds,
        leeway=settings.cds_jwt_leeway_seconds,
        cache=JwksCache(timeout=settings.cds_fhir_timeout_seconds),
    )
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, JSON_SORT_KEYS=False)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION_KEY] = ServiceState(
        settings=settings,
        engine=engine,
        store=store,
        verifier=verifier,
        runtime=provider,
        predictions=PredictionService(store, provider, QcThresholds.from_settings(settings)),
        lookups=HookLookupCache(settings.cds_hook_lookup_cache_size),
    )
    if settings.cds_recompute_on_model_change and part is not AppPart.REVIEW:
        from cds_service.recompute import RecomputeJob

        job = RecomputeJob(store, app.extensions[EXTENSION_KEY].predictions)
        app.extensions[RECOMPUTE_KEY] = job
        job.start()
    register_error_handlers(app)
    init_cors(app, settings.cds_cors_origins, ("/cds-services",))

    from cds_service.hooks import bp as hooks_bp
    from cds_service.results import bp as results_bp
    from cds_service.review import bp as review_bp

    if part is not AppPart.REVIEW:
        app.register_blueprint(hooks_bp)
        app.register_blueprint(results_bp)
    if part is not AppPart.HOOKS:
        app.register_blueprint(review_bp)  # brings sign-in, CSRF, host check (review.auth)
    app.session_interface = NoSessionUnder(app.session_interface, SESSIONLESS_PREFIXES)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    init_metrics(app)  # /readyz, /metrics (outside sign-in), hook latency (cds_service.metrics)

    return app


#: Paths whose callers authenticate by bearer token and never hold the review cookie.
SESSIONLESS_PREFIXES = ("/cds-services",)


class NoSessionUnder(SessionInterface):
    """The app's session interface, except that requests under ``prefixes`` get no session.

    Flask opens (and at the end considers saving) the cookie session on every request; a CDS
    Hooks call is authenticated by its JWT and must not set a cookie, so it gets Flask's
    ``NullSession`` (reading works and is empty, writing raises) and nothing is saved.
    """

    def __init__(self, inner: SessionInterface, prefixes: tuple[str, ...]) -> None:
        self.inner = inner
        self.prefixes = prefixes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        if request.path.startswith(self.prefixes):
            return None  # Flask falls back to make_null_session
        return self.inner.open_session(app, request)

    def make_null_session(self, app: Flask) -> Any:
        return self.inner.make_null_session(app)

    def is_null_session(self, obj: object) -> bool:
        return self.inner.is_null_session(obj)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        self.inner.save_session(app, session, response)


def state_of(app: Flask) -> Any:
    """The ServiceState of an app (tests, CLI)."""
    return app.extensions[EXTENSION_KEY]
