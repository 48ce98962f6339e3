"""One documented list of every setting, read from ``HER2LOW_*`` variables and an optional TOML file.

Every field has a safe default so that ``her2low up`` runs with no configuration at all; the
scaled deployment changes only values here (database URLs, queue URL), never code.
The TOML file is named by ``HER2LOW_CONFIG`` (default ``$HER2LOW_HOME/her2low.toml`` when it
exists); environment variables win over the file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ConfigurationError(ValueError):
    """A setting is missing or invalid; the message names the ``HER2LOW_*`` variable."""


class Durability(StrEnum):
    """How far the node flushes a stored instance before answering C-STORE success."""

    #: fsync each file before the rename; lost renames are recovered at start.
    FILE = "file"
    #: also fsync the folder after the rename (a second device flush per instance).
    FULL = "full"


def _toml_path() -> Path | None:
    explicit = os.environ.get("HER2LOW_CONFIG")
    if explicit:
        return Path(explicit)
    home = Path(os.environ.get("HER2LOW_HOME", "var"))
    candidate = home / "her2low.toml"
    return candidate if candidate.is_file() else None


class Settings(BaseSettings):
    """All settings of node, worker and service. ``her2low config --show`` prints them."""

    model_config = SettingsConfigDict(
        env_prefix="HER2LOW_", extra="ignore", validate_default=True, frozen=True
    )

    # --- where things live -------------------------------------------------------------------
    home: Path = Field(Path("var"), description="Folder for databases, DICOM files, secrets, logs.")
    log_level: str = Field("INFO", description="Python log level name.")
    log_format: str = Field("json", description="'json' (one event per line) or 'text'.")

    # --- DICOM node ----------------------------------------------------------------------------
    node_ae_title: str = Field("HER2LOW", description="Called AE title the node answers to.")
    node_host: str = Field("0.0.0.0", description="Address the DICOM node listens on.")
    node_port: int = Field(11112, description="DICOM port.")
    node_reuse_port: bool = Field(
        False,
        description="Set SO_REUSEPORT on the DICOM listener, so several `her2low node` processes "
        "on one host can share node_port (the kernel spreads associations; give each its own "
        "node_metrics_port).",
    )
    node_allowed_calling_aets: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate (JSON list of 'AET' for any host or "
        "'AET@host', 'AET@ip' or 'AET@cidr'); empty allows any.",
    )
    node_db_url: str = Field(
        "", description="SQLAlchemy URL of the node database; default SQLite in home."
    )
    node_storage_dir: Path | None = Field(None, description="DICOM file store; default home/dicom.")
    node_metrics_host: str = Field(
        "127.0.0.1",
        description="Address of the node's and workers' HTTP side port (/healthz, /readyz "
        "without a credential, /metrics with HER2LOW_METRICS_TOKEN): keep it on loopback or the "
        "monitoring network.",
    )
    node_metrics_port: int = Field(
        11180, description="HTTP side port of `her2low node` (docs/operations.md); 0 = off."
    )
    worker_metrics_port: int = Field(
        11181,
        description="HTTP side port of one `her2low worker` process (job metrics); give each "
        "worker process on a host its own port; 0 = off.",
    )
    node_retention_days: float = Field(
        0.0,
        description="Delete a series' received DICOM files this many days after it was analysed "
        "or skipped (never while unfinished); 0 = keep forever.",
    )
    node_quiet_seconds: float = Field(
        10.0, description="Quiet period after the last instance before a series counts as stable."
    )
    node_durability: Durability = Field(
        Durability.FILE,
        description="'file': fsync each instance before success, recover lost renames at start; "
        "'full': also fsync the folder (a second device flush per instance).",
    )
    node_max_associations: int = Field(10, description="Concurrent associations accepted.")
    node_max_associations_per_aet: int = Field(
        4,
        ge=1,
        description="Concurrent associations accepted from one calling AE title; more are "
        "refused transiently (local limit exceeded), so one peer cannot take every slot.",
    )
    node_max_associations_per_host: int = Field(
        6,
        ge=1,
        description="Concurrent associations accepted from one peer address (any AE title).",
    )
    node_echo_idle_seconds: float = Field(
        60.0,
        gt=0,
        description="An association that has stored nothing for this long is aborted at its "
        "next C-ECHO: echoes alone do not keep an association slot.",
    )
    node_max_instance_bytes: int = Field(
        1 << 30,
        gt=0,
        description="Largest instance accepted, as received and once inflated (Deflated "
        "transfer syntax); larger ones get 0xA700. 1 GiB holds any breast MRI instance, "
        "enhanced multi-frame included.",
    )
    node_acse_timeout: float = Field(
        30.0, description="Seconds to wait for association request/release messages (ACSE)."
    )
    node_dimse_timeout: float = Field(
        60.0, description="Seconds to wait for the next DIMSE message of an association."
    )
    node_network_timeout: float = Field(
        60.0, description="Seconds an association may stay silent before it is aborted."
    )
    node_tls_cert: Path | None = Field(
        None, description="PEM certificate (chain) of the node; with node_tls_key turns on TLS."
    )
    node_tls_key: Path | None = Field(None, description="PEM private key of node_tls_cert.")
    node_tls_ca: Path | None = Field(
        None,
        description="PEM CA bundle; when set, peers must present a certificate it signed "
        "(mutual TLS).",
    )
    node_results_url: str = Field(
        "http://127.0.0.1:8080", description="Base URL of the CDS service's results API."
    )
    node_export_destinations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="JSON list of DICOM destinations for the result objects (SR, SEG, maps): "
        '[{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104, "tls": false, '
        '"calling_aets": ["MODALITY"]}]; an empty or missing calling_aets means every source. '
        'A DICOMweb STOW-RS entry has "stow_url" (https://pacs/dicom-web/studies) instead of '
        'ae_title/host/port, optional "tls_ca" and "token_file" (bearer token; docs/deploy.md). '
        'Either kind takes "tls_cert" and "tls_key" for a client certificate of its own.',
    )
    node_export_max_attempts: int = Field(
        6, description="Sends of one export before it is dead-lettered (`her2low export list`)."
    )
    node_export_backoff_seconds: float = Field(
        30.0, description="Wait before the first retry of a failed export; doubles each time."
    )
    node_export_backoff_max_seconds: float = Field(
        3600.0, description="Longest wait between two retries of an export."
    )
    node_export_timeout: float = Field(
        30.0, description="Seconds the export SCU waits for association and DIMSE responses."
    )
    node_assessment_poll_seconds: float = Field(
        30.0,
        ge=0.0,
        description="How often the worker asks the service for new assessments (descriptors, "
        "likelihood) to write into a revised SR for the PACS; 0 turns the poll off.",
    )

    # --- queue ---------------------------------------------------------------------------------
    queue_url: str = Field(
        "", description="'' for Huey on SQLite in home, or redis://host:port/db for Huey on Redis."
    )
    worker_count: int = Field(1, description="Worker threads of `her2low worker`.")
    worker_fit_method: str = Field(
        "",
        pattern="^(|wls|nls|nls_rician)$",
        description="DKI fit of the analysis ('wls', 'nls', 'nls_rician'; '' = the pipeline "
        "default, nls_rician, falling back to nls where the noise sigma cannot be estimated); "
        "recorded in each result, and the model scores only results computed as its training "
        "features were.",
    )
    worker_denoise: str = Field(
        "",
        pattern="^(|none|mppca)$",
        description="Denoising of the DWI before the fit ('none' or 'mppca', Marchenko-Pastur "
        "PCA; '' = the pipeline default, mppca); recorded like the fit method. The default "
        "mppca + nls_rician is the noise-robust choice (docs/benchmarks.md) the shipped "
        "reference model assumes.",
    )
    worker_lease_seconds: float = Field(
        20.0,
        gt=0,
        description="Lease a worker holds on a running job; its heartbeat renews it, so a "
        "worker that dies (kill -9, lost host) has its job re-queued once this runs out.",
    )
    worker_heartbeat_seconds: float = Field(
        5.0, gt=0, description="How often a worker renews the lease of the job it runs."
    )

    # --- shared secret between node and service -----------------------------------------------
    results_api_token: str = Field(
        "",
        description="Bearer token the node presents to the results API; default: generated once "
        "into home/secrets/results-api-token.",
    )
    metrics_token: str = Field(
        "",
        description="Bearer token a Prometheus scraper presents to /metrics (service and node/"
        "worker side ports); it cannot publish results. Default: generated once into "
        "home/secrets/metrics-token.",
    )

    # --- CDS service -------------------------------------------------------------------------
    cds_host: str = Field("127.0.0.1", description="Address the CDS service listens on.")
    cds_port: int = Field(8080, description="HTTP port of the CDS service.")
    cds_db_url: str = Field(
        "", description="SQLAlchemy URL of the service database; default SQLite."
    )
    cds_public_base_url: str = Field(
        "http://127.0.0.1:8080",
        description="Public base URL as the EHR calls it; JWT 'aud' is checked against it.",
    )
    cds_trusted_issuers: dict[str, Any] = Field(
        default_factory=dict,
        description="JSON: issuer -> JWKS path or URL, or {jwks, algorithms, tenants}.",
    )
    cds_auth_required: bool = Field(True, description="false only for local development.")
    cds_cors_origins: list[str] = Field(
        default_factory=lambda: ["*"], description="Allowed browser origins (JSON list) or ['*']."
    )
    cds_patient_id_systems: dict[str, str] = Field(
        default_factory=lambda: {"HER2LOW-DEMO": "urn:her2low:demo:mrn"},
        description="JSON: DICOM IssuerOfPatientID -> FHIR Identifier.system.",
    )
    cds_fhir_timeout_seconds: float = Field(3.0, description="Timeout of prefetch fetches.")
    cds_fhir_writeback: bool = Field(
        False,
        description="Write the card's FHIR resources (Observation, DiagnosticReport, Provenance, "
        "Device, model card) back to the EHR's fhirServer as one transaction, in the background.",
    )
    cds_fhir_writeback_attempts: int = Field(
        3, ge=1, le=10, description="Attempts per FHIR write-back (exponential backoff)."
    )
    cds_fhir_server_allowlist: list[str] = Field(
        default_factory=list,
        description="fhirServer URL prefixes the service may fetch missing prefetch data from "
        "(JSON list); empty allows the fhirServer named by any trusted CDS client.",
    )
    cds_jwt_max_lifetime_seconds: int = Field(300, description="Longest accepted exp - iat.")
    cds_jwt_leeway_seconds: int = Field(30, description="Clock skew allowed on exp/iat.")
    cds_hook_lookup_cache_size: int = Field(
        20_000,
        ge=0,
        description="Patients whose hook lookup each service process reuses while nothing has "
        "changed (checked against the database at every call); 0 turns reuse off.",
    )
    model_dir: Path | None = Field(
        None, description="Model registry folder; default: the shipped reference model."
    )
    cds_recompute_on_model_change: bool = Field(
        True,
        description="At start, re-score in the background the stored cases a different model "
        "version scored (cds_service.recompute).",
    )
    # QC gate (cds_service.qc_gate): a result failing one of these is stored but not scored.
    cds_qc_min_snr_high_b: float = Field(
        3.0,
        description="Lowest ROI SNR at the highest b (mean signal / noise sigma): below it the "
        "signal is near the noise floor and Kapp is biased; 0 disables the check.",
    )
    cds_qc_min_roi_voxels: int = Field(
        20,
        description="Fewest ROI voxels: fewer make the histogram features (P5, P95, skewness, "
        "kurtosis, entropy) unstable.",
    )
    cds_qc_max_fraction_at_bound: float = Field(
        0.25,
        description="Largest share of ROI voxels with Dapp or Kapp on a fit bound: more means "
        "the histogram is piled at the bound by noise; 1 disables the check.",
    )
    cds_qc_min_high_b: float = Field(
        1000.0,
        description="Lowest acceptable highest b-value (s/mm2): the kurtosis needs b >= ~1000.",
    )
    cds_qc_min_b_values: int = Field(
        4, description="Fewest distinct b-values (b=0 included) for a trustworthy DKI fit."
    )
    cds_qc_max_fit_residual: float = Field(
        0.15,
        description="Largest median RMS fit residual over S0 in the ROI: above it the signal "
        "does not follow the DKI model (motion, misregistration, artefact); 0 disables it.",
    )

    # --- review app (tumour board) -------------------------------------------------------------
    review_host: str = Field(
        "",
        description="Address of the review app when it has its own port; '' = cds_host.",
    )
    review_port: int = Field(
        0,
        description="Own HTTP port of the review app (the CDS Hooks port then serves no review "
        "pages, and this port no CDS Hooks); 0 = served on cds_port with everything else.",
    )
    review_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the review app answers to besides cds_public_base_url's (JSON "
        "list; '.example.org' matches subdomains). Other Host headers get 400 (DNS rebinding).",
    )
    review_secret_key: str = Field(
        "",
        description="Key signing the review app's CSRF cookie; default: generated once into "
        "home/secrets/review-secret-key (shared by every worker and instance using that home).",
    )
    review_session_idle_minutes: int = Field(
        30, description="A review sign-in ends after this many minutes without a request."
    )
    review_session_max_hours: float = Field(
        12.0, description="A review sign-in ends this many hours after it began, active or not."
    )
    review_signin_max_failures: int = Field(
        5, description="Failed sign-ins for one user name before it is locked for a while."
    )
    review_signin_max_failures_per_address: int = Field(
        20, description="Failed sign-ins from one client address before it is locked."
    )
    review_signin_lockout_minutes: int = Field(
        15, description="How long a locked user name or client address must wait."
    )
    review_viewer_url_template: str = Field(
        "",
        description=(
            "Link from a review case to the study in the PACS viewer; {study_uid} is replaced by"
            " the StudyInstanceUID, e.g. https://pacs.example/ohif/viewer?StudyInstanceUIDs="
            "{study_uid}. Empty: no link."
        ),
    )

    @field_validator("node_ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not value or len(value) > 16 or "\\" in value:
            raise ValueError("HER2LOW_NODE_AE_TITLE must be 1-16 characters without backslash")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # --- derived values --------------------------------------------------------------------------
    @property
    def storage_dir(self) -> Path:
        return self.node_storage_dir or self.home / "dicom"

    @property
    def node_database_url(self) -> str:
        return self.node_db_url or f"sqlite:///{(self.home / 'node.db').resolve()}"

    @property
    def cds_database_url(self) -> str:
        return self.cds_db_url or f"sqlite:///{(self.home / 'cds.db').resolve()}"

    @property
    def queue_path(self) -> Path:
        return self.home / "queue.db"

    def results_token(self) -> str:
        """The node/service shared token, generated once (0600) when not configured."""
        return self.results_api_token or generated_secret(self.home, "results-api-token")

    def metrics_scrape_token(self) -> str:
        """The scrapers' token for /metrics, generated once (0600) when not configured.

        A credential of its own: a scraper holding it can read metrics, never publish results.
        """
        if self.metrics_token and self.metrics_token == self.results_api_token:
            raise ConfigurationError(
                "HER2LOW_METRICS_TOKEN must differ from HER2LOW_RESULTS_API_TOKEN"
            )
        return self.metrics_token or generated_secret(self.home, "metrics-token")


def generated_secret(home: Path, name: str) -> str:
    """The secret in ``home/secrets/<name>``, written once (0600) on first use.

    Several processes sharing a home may start at once: the first creates the file, the others
    read what it wrote.
    """
    path = home / "secrets" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process won the race
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
    for _ in range(50):  # the winner may not have written yet
        text = path.read_text().strip()
        if text:
            return text
        time.sleep(0.02)
    raise RuntimeError(f"{path} is empty")


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning validation errors into a message that names the variable."""
    try:
        return Settings(**overrides)
    except Exception as exc:  # pydantic.ValidationError, TOML errors
        errors = getattr(exc, "errors", None)
        if callable(errors):
            parts = []
            for err in errors():
                loc = "_".join(str(p) for p in err.get("loc", ()))
                parts.append(f"HER2LOW_{loc.upper()}: {err.get('msg')}")
            raise ConfigurationError("; ".join(parts)) from exc
        message = str(exc)
        match = re.search(r'field "(\w+)"', message)
        if match:  # pydantic-settings names the field, not the variable, for unparsable JSON
            message = f"HER2LOW_{match.group(1).upper()}: value is not valid JSON ({message})"
        raise ConfigurationError(message) from exc


SECTIONS = ("floor", "node", "worker", "service", "model")
_SECTION_OF_PREFIX = {
    "node": "node",
    "queue": "worker",
    "worker": "worker",
    "cds": "service",
    "review": "service",
    "model": "model",
}


def section_of(name: str) -> str:
    """The component a setting belongs to, from its name (``node_*``, ``cds_*``, …); the flat
    ``HER2LOW_*`` names stay as they are, the grouping is only how they are shown."""
    return _SECTION_OF_PREFIX.get(name.split("_", 1)[0], "floor")


def describe(settings: Settings) -> list[dict[str, Any]]:
    """Rows for ``her2low config --show``: section, variable, value (secrets masked), description."""
    rows = []
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if ("token" in name or "secret" in name) and value:
            value = "***"
        if isinstance(value, Path):
            value = str(value)
        rows.append(
            {
                "section": section_of(name),
                "variable": f"HER2LOW_{name.upper()}",
                "value": json.loads(json.dumps(value, default=str)),
                "description": field.description or "",
            }
        )
    return rows
