"""The node as a DICOMweb STOW-RS client: send result objects to one destination (PS3.18 10.5).

The HTTP twin of :mod:`dicom_node.jobs.export_scu`: one ``POST`` of a
``multipart/related; type="application/dicom"`` body per batch, the files as they are on disk,
and the Store Instances response read into the same :class:`SendResult` the C-STORE path
returns, so the export queue's backoff, dead letter and ``her2low export retry`` behave the
same for both. The outcome follows the response (PS3.18 Table 10.5.3-1):

- 200 OK: every instance stored. When the response lists the stored instances
  (ReferencedSOPSequence), an instance we sent that is missing from it is a failure too (Orthanc
  answers 200 to a body it could not read, with both sequences empty).
- 202 Accepted: some stored, some not: FAILED naming each instance of the FailedSOPSequence with
  its Failure Reason (a warning alone, WarningReason, still counts as stored, as a C-STORE
  warning does).
- 409 Conflict: none stored (FAILED, per-instance reasons as above).
- 401, 403, 404, 405, 406, 415: the endpoint does not take our request (REJECTED, like an
  association rejection); other 4xx and 5xx: FAILED. No connection, TLS failure or timeout:
  UNREACHABLE.

Messages name the HTTP status and, per instance, the SOP Instance UID and Failure Reason, never
patient data: the response body's free text is not copied, and the URL is shown without user
information or query. The bearer token is read from its file at each send (so a rotated token
is picked up) and only ever placed in the ``Authorization`` header.
"""

from __future__ import annotations

import json
import logging
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from pydicom.filereader import read_file_meta_info
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicom_node.analysis.outputs.identification import IMPLEMENTATION_VERSION_NAME
from dicom_node.jobs.export_scu import SendOutcome, SendResult
from her2low.core.settings import ConfigurationError

__all__ = [
    "StowResponse",
    "parse_stow_response",
    "public_url",
    "read_token",
    "reason_text",
    "stow_entry",
    "stow_files",
]

log = logging.getLogger(__name__)

_FAILED_SOP = "00081198"
_REFERENCED_SOP = "00081199"
_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"

#: Statuses that say this endpoint will not take the request as sent (wrong URL, method,
#: credentials or media type): a configuration problem, like a rejected association.
_REFUSED = frozenset({401, 403, 404, 405, 406, 415})
#: What nginx's own 400 pages say when ``ssl_verify_client`` refuses the client (known phrases
#: are matched; no response text is ever copied into an error), and what to do about it.
_CLIENT_CERT_PAGES = (
    (
        "No required SSL certificate was sent",
        "the front wants a client certificate and got none: give this destination tls_cert and "
        "tls_key (or set HER2LOW_NODE_TLS_CERT and HER2LOW_NODE_TLS_KEY)",
    ),
    (
        "The SSL certificate error",
        "the front did not accept the client certificate sent (not issued by a CA it trusts, "
        "or expired): check this destination's tls_cert",
    ),
)


_SETTING = "HER2LOW_NODE_EXPORT_DESTINATIONS"


def stow_entry(data: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """(name, URL, token file) of a configured STOW-RS entry, or a :class:`ConfigurationError`.

    The URL is ``http(s)://host[:port]/path`` without credentials; a token belongs in
    ``token_file``, so no secret sits in the settings text (or in anything that prints them).
    """
    url = str(data.get("stow_url") or "").strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"{_SETTING}: stow_url must be an http(s) URL, got {public_url(url)!r}"
        )
    if parts.username or parts.password or "token" in data or "bearer_token" in data:
        raise ConfigurationError(
            f"{_SETTING}: put the STOW-RS credentials in a token_file, not in the settings"
        )
    both = sorted(k for k in ("ae_title", "host", "port") if k in data)
    if both:
        raise ConfigurationError(
            f"{_SETTING}: a STOW-RS entry ({public_url(url)}) takes no {', '.join(both)}"
        )
    token_file = str(data["token_file"]) if data.get("token_file") else None
    name = str(data.get("name") or f"stow:{parts.hostname}{parts.path}")[:64]
    return name, url, token_file


def reason_text(code: int) -> str:
    """A Failure/Warning Reason (US) named from the Storage Service table (PS3.4 B.2.3)."""
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
    return f"{category} 0x{code:04X} {text}".strip()


def public_url(url: str) -> str:
    """``url`` without user information, query or fragment: safe for logs and error text."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass
class StowResponse:
    """What a Store Instances response body said (PS3.18 10.5.3), as far as it said it."""

    #: SOP Instance UIDs in ReferencedSOPSequence; None when the body had no such attribute.
    stored: list[str] | None = None
    #: (SOP Instance UID, Failure Reason) per FailedSOPSequence item.
    failed: list[tuple[str, int | None]] = field(default_factory=list)
    #: (SOP Instance UID, Warning Reason) per stored instance with a warning.
    warnings: list[tuple[str, int]] = field(default_factory=list)


def _json_items(body: dict[str, Any], tag: str) -> list[dict[str, Any]] | None:
    element = body.get(tag)
    if not isinstance(element, dict):
        return None
    items = element.get("Value", [])
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _json_value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if isinstance(element, dict) and isinstance(element.get("Value"), list) and element["Value"]:
        return element["Value"][0]
    return None


def _from_json(text: str) -> StowResponse:
    body = json.loads(text)
    if isinstance(body, list) and body:  # some servers wrap the dataset in an array
        body = body[0]
    if not isinstance(body, dict):
        raise ValueError("not a DICOM JSON object")
    response = StowResponse()
    referenced = _json_items(body, _REFERENCED_SOP)
    if referenced is not None:
        response.stored = []
        for item in referenced:
            uid = str(_json_value(item, _SOP_INSTANCE) or "")
            response.stored.append(uid)
            warning = _json_value(item, _WARNING_REASON)
            if isinstance(warning, int):
                response.warnings.append((uid, warning))
    for item in _json_items(body, _FAILED_SOP) or []:
        reason = _json_value(item, _FAILURE_REASON)
        response.failed.append(
            (
                str(_json_value(item, _SOP_INSTANCE) or "?"),
                reason if isinstance(reason, int) else None,
            )
        )
    return response


def _xml_attribute(node: ET.Element, tag: str) -> ET.Element | None:
    for child in node:
        if child.tag.rsplit("}", 1)[-1] == "DicomAttribute" and child.get("tag") == tag:
            return child
    return None


def _xml_value(item: ET.Element, tag: str) -> str | None:
    attribute = _xml_attribute(item, tag)
    if attribute is None:
        return None
    for child in attribute:
        if child.tag.rsplit("}", 1)[-1] == "Value":
            return (child.text or "").strip()
    return None


def _xml_items(root: ET.Element, tag: str) -> list[ET.Element] | None:
    attribute = _xml_attribute(root, tag)
    if attribute is None:
        return None
    return [c for c in attribute if c.tag.rsplit("}", 1)[-1] == "Item"]


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _from_xml(text: str) -> StowResponse:
    """The Native DICOM Model (PS3.19 A.1), for servers that ignore our Accept header."""
    # A configured PACS answers here, not the internet; expat caps entity expansion.
    root = ET.fromstring(text)
    response = StowResponse()
    referenced = _xml_items(root, _REFERENCED_SOP)
    if referenced is not None:
        response.stored = []
        for item in referenced:
            uid = _xml_value(item, _SOP_INSTANCE) or ""
            response.stored.append(uid)
            warning = _int(_xml_value(item, _WARNING_REASON))
            if warning is not None:
                response.warnings.append((uid, warning))
    for item in _xml_items(root, _FAILED_SOP) or []:
        response.failed.append(
            (_xml_value(item, _SOP_INSTANCE) or "?", _int(_xml_value(item, _FAILURE_REASON)))
        )
    return response


def _read_body(text: str) -> StowResponse | None:
    """The response body as DICOM JSON or XML (sniffed: servers omit Content-Type), or None."""
    stripped = text.lstrip()
    try:
        if stripped.startswith(("{", "[")):
            return _from_json(stripped)
        if stripped.startswith("<"):
            return _from_xml(stripped)
    except (ValueError, ET.ParseError):
        return None
    return None


def _failures(failed: Sequence[tuple[str, int | None]]) -> str:
    shown = [
        f"{uid}: {reason_text(r) if r is not None else 'no reason given'}" for uid, r in failed
    ]
    more = f" (+{len(shown) - 5} more)" if len(shown) > 5 else ""
    return "; ".join(shown[:5]) + more


def parse_stow_response(status: int, reason: str, text: str, sent: Sequence[str]) -> SendResult:
    """The :class:`SendResult` of one STOW-RS response to a batch of ``sent`` instance UIDs."""
    head = f"HTTP {status} {reason}".strip()
    body = _read_body(text)
    if status in _REFUSED:
        return SendResult(SendOutcome.REJECTED, f"{head}: the endpoint refused the request")
    if status not in (200, 202, 409):
        kind = "server error" if status >= 500 else "request not accepted"
        if status == 400:
            kind = next((why for page, why in _CLIENT_CERT_PAGES if page in text), kind)
        return SendResult(SendOutcome.FAILED, f"{head}: {kind}")
    failed = list(body.failed) if body is not None else []
    stored = list(body.stored) if body is not None and body.stored is not None else None
    if stored is not None:
        acknowledged = set(stored)
        failed_uids = {uid for uid, _ in failed}
        failed += [(u, None) for u in sent if u not in acknowledged and u not in failed_uids]
    stored_ok = [u for u in sent if u not in {uid for uid, _ in failed}]
    if status == 409 or failed:
        if not failed:
            return SendResult(SendOutcome.FAILED, f"{head}: no instance stored")
        count = f"{len(failed)} of {len(sent)} instance(s) not stored"
        return SendResult(SendOutcome.FAILED, f"{head}: {count}: {_failures(failed)}", stored_ok)
    if body is not None:
        for uid, code in body.warnings:
            log.info(
                "STOW-RS stored with a warning", extra={"sop_uid": uid, "reason": reason_text(code)}
            )
    return SendResult(SendOutcome.SUCCESS, "", stored_ok)


def _multipart(paths: Sequence[Path], boundary: str) -> bytes:
    """The ``multipart/related`` body (RFC 2387): one ``application/dicom`` part per file."""
    parts: list[bytes] = []
    for path in paths:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"))
        parts.append(path.read_bytes())
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(parts)


def read_token(token_file: Path) -> str:
    """The bearer token: the file's first line, stripped (raises OSError or ValueError)."""
    lines = token_file.read_text(encoding="utf-8").splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ValueError("the token file is empty")
    return token


def stow_files(
    paths: Sequence[Path],
    *,
    url: str,
    token_file: Path | None = None,
    tls_ca: Path | None = None,
    client_cert: tuple[Path, Path] | None = None,
    timeout: float = 30.0,
) -> SendResult:
    """POST ``paths`` to the STOW-RS ``url`` in one request; SUCCESS only when all were stored."""
    shown = public_url(url)
    try:
        sent = [str(read_file_meta_info(p).MediaStorageSOPInstanceUID) for p in paths]
        body = _multipart(paths, boundary := f"her2low-{secrets.token_hex(16)}")
    except OSError as exc:
        return SendResult(SendOutcome.FAILED, f"object files unreadable: {type(exc).__name__}")
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        "User-Agent": IMPLEMENTATION_VERSION_NAME,
    }
    if token_file is not None:
        try:
            headers["Authorization"] = f"Bearer {read_token(token_file)}"
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return SendResult(SendOutcome.FAILED, f"bearer token file {token_file}: {reason}")
    try:
        response = requests.post(
            url,
            data=body,
            headers=headers,
            timeout=timeout,
            verify=str(tls_ca) if tls_ca is not None else True,
            cert=(str(client_cert[0]), str(client_cert[1])) if client_cert else None,
            allow_redirects=False,
        )
    except requests.exceptions.SSLError:
        return SendResult(SendOutcome.UNREACHABLE, f"TLS failed with {shown}")
    except requests.exceptions.Timeout:
        return SendResult(SendOutcome.UNREACHABLE, f"no answer from {shown} within {timeout:g} s")
    except requests.exceptions.ConnectionError:
        return SendResult(SendOutcome.UNREACHABLE, f"no connection to {shown}")
    except requests.RequestException as exc:
        return SendResult(SendOutcome.FAILED, f"{type(exc).__name__} sending to {shown}")
    with response:
        result = parse_stow_response(
            response.status_code, response.reason or "", response.text, sent
        )
    if result.outcome is not SendOutcome.SUCCESS:
        result.message = f"{result.message} ({shown})"
    return result
