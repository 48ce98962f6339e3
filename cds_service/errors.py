"""Errors as FHIR R4 OperationOutcome JSON, never HTML or a stack trace.

CDS Hooks 2.0.1 leaves error bodies open; the project answers every error with an
OperationOutcome (FHIR R4 §2.36) so EHR integrators get one machine-readable shape. Handlers are
registered on the app (not blueprints) so routing 404/405 are covered too (Flask errorhandling).
"""

from __future__ import annotations

import logging
import traceback
from enum import StrEnum
from typing import Any

from flask import Flask, Response, has_request_context, jsonify, request
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class IssueType(StrEnum):
    """FHIR R4 IssueType codes used here (http://hl7.org/fhir/issue-type)."""

    INVALID = "invalid"
    STRUCTURE = "structure"
    REQUIRED = "required"
    VALUE = "value"
    SECURITY = "security"
    LOGIN = "login"
    NOT_FOUND = "not-found"
    NOT_SUPPORTED = "not-supported"
    INCOMPLETE = "incomplete"
    EXCEPTION = "exception"
    CONFLICT = "conflict"
    TRANSIENT = "transient"


_DEFAULT_CODES: dict[int, IssueType] = {
    400: IssueType.INVALID,
    401: IssueType.LOGIN,
    403: IssueType.SECURITY,
    404: IssueType.NOT_FOUND,
    405: IssueType.NOT_SUPPORTED,
    409: IssueType.CONFLICT,
    412: IssueType.INCOMPLETE,
    413: IssueType.STRUCTURE,
    415: IssueType.NOT_SUPPORTED,
    422: IssueType.INVALID,
}


class ApiError(Exception):
    """An error with an HTTP status and an OperationOutcome body.

    ``expression`` names the offending element (FHIRPath-like, e.g. ``context.patientId``).
    """

    def __init__(
        self,
        status: int,
        diagnostics: str,
        *,
        code: IssueType | str | None = None,
        expression: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.code = (
            IssueType(code) if code is not None else _DEFAULT_CODES.get(status, IssueType.EXCEPTION)
        )
        self.expression = expression
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return operation_outcome(self.diagnostics, self.code, self.expression)


def operation_outcome(
    diagnostics: str | None, code: IssueType, expression: str | None = None
) -> dict[str, Any]:
    """A one-issue OperationOutcome; empty fields omitted (FHIR JSON: no empty values)."""
    issue: dict[str, Any] = {"severity": "error", "code": code.value}
    if diagnostics:
        issue["diagnostics"] = diagnostics
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.mimetype = "application/json"
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Install app-level handlers: ApiError, any HTTPException, a database outage (503), and
    the last-resort 500."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return _json(exc.to_dict(), exc.status, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _DEFAULT_CODES.get(status, IssueType.EXCEPTION)
        headers: dict[str, str] = {}
        if status == 405:
            allow = exc.get_response().headers.get("Allow")
            if allow:
                headers["Allow"] = allow
        text = exc.description if status != 401 else None
        return _json(operation_outcome(text, code), status, headers)

    @app.errorhandler(OperationalError)
    def _database_unavailable(exc: OperationalError) -> Response:
        """The database dropped the connection, is restarting or is locked: retry, not a bug.

        Logged without the message, which holds the statement and may hold its values.
        """
        log.warning(
            "database unavailable",
            extra={
                "exc_class": type(exc.orig).__name__,
                "endpoint": request.endpoint if has_request_context() else None,
            },
        )
        body = operation_outcome("the database is unavailable; retry", IssueType.TRANSIENT)
        return _json(body, 503, {"Retry-After": "1"})

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        """A bug, not bad input (bad input is refused as a 4xx where it is read).

        The caller sees no detail; the log names the exception class, the endpoint and where it
        was raised (file:line) so the bug can be found, but not the message, which may hold
        request values (patient identifiers).
        """
        log.error(
            "unhandled error",
            extra={
                "exc_class": type(exc).__name__,
                "endpoint": request.endpoint if has_request_context() else None,
                "raised_at": _raised_at(exc),
            },
            exc_info=False,
        )
        return _json(operation_outcome("internal error", IssueType.EXCEPTION), 500)


def _raised_at(exc: BaseException) -> str | None:
    """``path:line`` of the innermost frame of the traceback (no values, no message)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    last = frames[-1]
    return f"{last.filename}:{last.lineno}"
