"""Prefetch templates and their resolution (CDS Hooks 2.0.1 §Prefetch).

The client may omit any key (it must omit, not null, what it could not fetch; ``null`` means the
query had no results). Missing keys are fetched from ``fhirServer`` with the client's bearer
token and a short timeout; when the data can be had neither way the call fails with 412. An
OperationOutcome in place of a resource counts as missing. The access token is never logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import requests

from cds_service.errors import ApiError, IssueType
from cds_service.request_json import JsonInputError, parse_json
from cds_service.schema import HookRequest

log = logging.getLogger(__name__)

HER2_LOINC_CODES = ("48676-1", "85319-2", "18474-7", "85318-4")


class PrefetchKey(StrEnum):
    """Keys of the service's prefetch templates."""

    PATIENT = "patient"
    HER2 = "her2"
    IMAGING = "imaging"


PREFETCH_TEMPLATES: dict[PrefetchKey, str] = {
    PrefetchKey.PATIENT: "Patient/{{context.patientId}}",
    PrefetchKey.HER2: "Observation?patient={{context.patientId}}&code="
    + ",".join(f"http://loinc.org|{code}" for code in HER2_LOINC_CODES),
    PrefetchKey.IMAGING: "ImagingStudy?patient={{context.patientId}}"
    "&modality=http://dicom.nema.org/resources/ontology/DCM|MR",
}

_local = threading.local()


def _session() -> requests.Session:
    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        _local.session = session
    return session


def render(template: str, request: HookRequest) -> str:
    """Replace ``{{context.X}}`` tokens with values from the hook context."""
    out = template
    for name, value in request.context.model_dump(exclude_none=True, by_alias=True).items():
        out = out.replace("{{context." + name + "}}", str(value))
    return out


def is_operation_outcome(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "OperationOutcome"


class PrefetchResolver:
    """Values of prefetch keys for one hook call: from the request, else from ``fhirServer``."""

    def __init__(self, request: HookRequest, timeout: float, allowlist: Sequence[str] = ()) -> None:
        self.request = request
        self.timeout = timeout
        self.allowlist = tuple(allowlist)

    def _server_allowed(self, server: str) -> bool:
        """SSRF guard: only configured FHIR servers, when an allow-list is configured."""
        return not self.allowlist or any(server.startswith(prefix) for prefix in self.allowlist)

    def get(self, key: PrefetchKey, *, required: bool = True) -> Any:
        """The resource/Bundle for ``key``; None = no results; 412 if required and unobtainable."""
        prefetch = self.request.prefetch or {}
        if key.value in prefetch:
            value = prefetch[key.value]
            if value is None:
                return None
            if isinstance(value, dict) and not is_operation_outcome(value):
                return value
        if self.request.fhir_server is None:
            if required:
                raise ApiError(
                    412,
                    f"prefetch '{key.value}' is missing and no fhirServer was given to fetch it",
                    code=IssueType.INCOMPLETE,
                    expression=f"prefetch.{key.value}",
                )
            return None
        return self._fetch(key, required)

    def _fetch(self, key: PrefetchKey, required: bool) -> Any:
        assert self.request.fhir_server is not None
        if not self._server_allowed(self.request.fhir_server):
            log.warning("fhirServer not in the allow-list", extra={"key": key.value})
            return self._unavailable(key, required)
        url = (
            self.request.fhir_server.rstrip("/")
            + "/"
            + render(PREFETCH_TEMPLATES[key], self.request)
        )
        headers = {"Accept": "application/fhir+json"}
        auth = self.request.fhir_authorization
        if auth is not None:
            headers["Authorization"] = f"Bearer {auth.access_token}"
        try:
            response = _session().get(
                url, headers=headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            log.warning(
                "prefetch fetch failed", extra={"key": key.value, "error_class": type(exc).__name__}
            )
            return self._unavailable(key, required)
        if response.status_code == 404 and key is PrefetchKey.PATIENT:
            return None
        if response.status_code != 200:
            log.warning(
                "prefetch fetch refused", extra={"key": key.value, "status": response.status_code}
            )
            return self._unavailable(key, required)
        try:  # the EHR's FHIR server is read as strictly as a request body
            value = parse_json(response.content)
        except JsonInputError:
            return self._unavailable(key, required)
        if not isinstance(value, dict) or is_operation_outcome(value):
            return self._unavailable(key, required)
        return value

    @staticmethod
    def _unavailable(key: PrefetchKey, required: bool) -> None:
        if required:
            raise ApiError(
                412,
                f"prefetch '{key.value}' is missing and could not be fetched from fhirServer",
                code=IssueType.INCOMPLETE,
                expression=f"prefetch.{key.value}",
            )
        return None


def fhir_list(value: Any) -> list[Any]:
    """A FHIR JSON array element as a list; a wrong type (a client's bug or attack) as empty.

    Prefetched resources are read leniently, element by element, so one malformed element
    costs that element, never the call (and never a 500)."""
    return value if isinstance(value, list) else []


def fhir_object(value: Any) -> dict[str, Any]:
    """A FHIR JSON object element as a dict; a wrong type as empty (see ``fhir_list``)."""
    return value if isinstance(value, dict) else {}


def bundle_resources(bundle: Any, resource_type: str) -> list[dict[str, Any]]:
    """Resources of a type in a searchset Bundle (outcome entries and others skipped)."""
    if not isinstance(bundle, dict):
        return []
    if bundle.get("resourceType") == resource_type:
        return [bundle]
    if bundle.get("resourceType") != "Bundle":
        return []
    found = []
    for entry in fhir_list(bundle.get("entry")):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == resource_type:
            found.append(resource)
    return found


def imaging_study_ids(bundle: Any) -> dict[str, str]:
    """StudyInstanceUID → ImagingStudy id of the ``imaging`` prefetch (FHIR R4 ImagingStudy:
    ``identifier`` ``system urn:dicom:uid``, ``value urn:oid:<StudyInstanceUID>``).

    A UID named by two different ImagingStudy resources is left out: which one the estimate
    came from would be a guess.
    """
    found: dict[str, str] = {}
    clashing: set[str] = set()
    for study in bundle_resources(bundle, "ImagingStudy"):
        study_id = study.get("id")
        if not isinstance(study_id, str) or not study_id:
            continue
        for ident in fhir_list(study.get("identifier")):
            if not isinstance(ident, dict) or ident.get("system") != "urn:dicom:uid":
                continue
            value = ident.get("value")
            if not isinstance(value, str):
                continue
            uid = value.removeprefix("urn:oid:")
            if found.get(uid, study_id) != study_id:
                clashing.add(uid)
            found[uid] = study_id
    return {uid: sid for uid, sid in found.items() if uid not in clashing}
