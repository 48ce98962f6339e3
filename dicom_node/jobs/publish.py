"""Publish a series' results to the CDS service's results API (docs/results-api.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests

from models.contract import ResultPayload


class PublishError(RuntimeError):
    """Publishing failed. ``transient`` errors (service down, 5xx) are retried later."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Published:
    result_id: str
    status: str  # created | unchanged | updated


def results_api(
    method: str,
    base_url: str,
    path: str,
    token: str,
    *,
    json_body: Any = None,
    params: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    accept: tuple[int, ...] = (200, 201),
) -> requests.Response:
    """One call to the service's results API with the results token: the node's only HTTP client.

    Returns the response when its status is in ``accept``. Raises :class:`PublishError`:
    transient when the service is unreachable or answers 5xx/408/429, permanent otherwise.
    The publisher, the export-state reports and the assessment poll all go through here.
    """
    url = base_url.rstrip("/") + path
    try:
        response = requests.request(
            method,
            url,
            json=json_body,
            params=params,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except requests.RequestException as exc:
        raise PublishError(
            f"results API unreachable: {type(exc).__name__}", transient=True
        ) from exc
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise PublishError(f"results API answered {response.status_code}", transient=True)
    if response.status_code not in accept:
        raise PublishError(
            f"results API refused the request: {response.status_code} {response.text[:300]}",
            transient=False,
        )
    return response


def publish(
    base_url: str, token: str, payload: ResultPayload, *, timeout: float = 10.0
) -> Published:
    """POST one result in the contract's JSON form (the service validates it with the same class)."""
    response = results_api(
        "POST", base_url, "/api/v1/results", token, json_body=payload.to_json(), timeout=timeout
    )
    body = response.json()
    return Published(result_id=str(body["result_id"]), status=str(body.get("status", "")))
