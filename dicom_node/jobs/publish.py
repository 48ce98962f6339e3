"""Publish a series' results to the CDS service's results API (docs/results-api.md)."""

from __future__ import annotations

from dataclasses import dataclass

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


def publish(
    base_url: str, token: str, payload: ResultPayload, *, timeout: float = 10.0
) -> Published:
    """POST one result in the contract's JSON form (the service validates it with the same class)."""
    url = base_url.rstrip("/") + "/api/v1/results"
    try:
        response = requests.post(
            url,
            json=payload.to_json(),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except requests.RequestException as exc:
        raise PublishError(
            f"results API unreachable: {type(exc).__name__}", transient=True
        ) from exc
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise PublishError(f"results API answered {response.status_code}", transient=True)
    if response.status_code not in (200, 201):
        raise PublishError(
            f"results API refused the result: {response.status_code} {response.text[:300]}",
            transient=False,
        )
    body = response.json()
    return Published(result_id=str(body["result_id"]), status=str(body.get("status", "")))
