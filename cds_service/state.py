"""Per-app service objects, kept in ``app.extensions`` (Flask's place for extension state)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import current_app
from sqlalchemy import Engine

from cds_service.auth import TokenVerifier
from cds_service.card_cache import CardCache
from cds_service.pathology import KnownSources
from cds_service.predictions import PredictionService, RuntimeProvider
from cds_service.store import Store
from cds_service.store.lookup_cache import HookLookupCache
from cds_service.writeback import FhirWriteback
from her2low.core.settings import Settings

EXTENSION_KEY = "her2low_cds"


@dataclass
class ServiceState:
    settings: Settings
    engine: Engine
    store: Store
    verifier: TokenVerifier
    runtime: RuntimeProvider
    predictions: PredictionService
    cards: CardCache = field(default_factory=CardCache)  # per process: rows are immutable
    lookups: HookLookupCache = field(default_factory=HookLookupCache)  # per process, checked
    pathology_sources: KnownSources = field(default_factory=KnownSources)  # rows append-only
    writeback: FhirWriteback | None = None  # made on first use (writeback.writer_for)

    @property
    def base_url(self) -> str:
        return self.settings.cds_public_base_url.rstrip("/")


def state() -> ServiceState:
    """The state of the current app."""
    value = current_app.extensions[EXTENSION_KEY]
    assert isinstance(value, ServiceState)
    return value
