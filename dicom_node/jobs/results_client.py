"""The node's client of the service's results API, and what the results-sync loop needs.

Both directions of :mod:`dicom_node.jobs.results_sync` speak through :class:`ResultsClient`,
which calls :func:`dicom_node.jobs.publish.results_api` (the publisher's client) with the
results token.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from dicom_node.jobs.export import ExportConfig
from dicom_node.jobs.publish import PublishError, results_api
from her2low.core.settings import Settings
from models.contract import ExportReport

__all__ = ["ResultsClient", "SyncConfig"]


@dataclass(frozen=True)
class ResultsClient:
    """The service's results API, called with the results token (the publisher's client)."""

    base_url: str
    token: str
    timeout: float = 10.0

    def put_exports(self, report: ExportReport) -> None:
        results_api(
            "PUT",
            self.base_url,
            "/api/v1/exports",
            self.token,
            json_body=report.model_dump(mode="json"),
            timeout=self.timeout,
            accept=(200, 201, 204),
        )

    def get_assessments(self, since: dt.datetime, limit: int) -> Any:
        """The page's JSON as sent (parsed by :func:`parse_page`, which trusts nothing)."""
        response = results_api(
            "GET",
            self.base_url,
            "/api/v1/assessments",
            self.token,
            params={"since": since.isoformat().replace("+00:00", "Z"), "limit": str(limit)},
            timeout=self.timeout,
            accept=(200,),
        )
        try:
            return response.json()
        except ValueError as exc:
            raise PublishError("assessments: the answer is not JSON", transient=True) from exc


@dataclass(frozen=True)
class SyncConfig:
    """What the sync loop needs: the service, the destinations, the poll interval."""

    client: ResultsClient
    export: ExportConfig
    #: Seconds between assessment polls; 0 = no polling (export states are still reported).
    poll_seconds: float = 30.0
    page_size: int = 50

    @classmethod
    def from_settings(cls, settings: Settings, export: ExportConfig) -> SyncConfig:
        return cls(
            client=ResultsClient(settings.node_results_url, settings.results_token()),
            export=export,
            poll_seconds=settings.node_assessment_poll_seconds,
        )
