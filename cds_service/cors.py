"""CORS for browser-based CDS clients (CDS Hooks 2.0.1 §CORS).

Preflight ``OPTIONS`` is answered here, before routing and without auth; actual responses carry
the allowed origin too. ``*`` in Allow-Headers does not cover Authorization, so it is named.
"""

from __future__ import annotations

from collections.abc import Sequence

from flask import Flask, Response, request

ALLOW_HEADERS = "Authorization, Content-Type"
ALLOW_METHODS = "GET, POST, OPTIONS"


def _allowed_origin(origins: Sequence[str], origin: str | None) -> str | None:
    if "*" in origins:
        return "*"
    if origin and origin in origins:
        return origin
    return None


def init_cors(app: Flask, origins: Sequence[str], prefixes: Sequence[str]) -> None:
    """Add CORS to paths under ``prefixes`` (the CDS Hooks endpoints)."""
    allowed = tuple(origins)
    scoped = tuple(prefixes)

    def _in_scope() -> bool:
        return request.path.startswith(scoped)

    @app.before_request
    def _preflight() -> Response | None:
        if request.method != "OPTIONS" or not _in_scope():
            return None
        response = Response(status=204)
        origin = _allowed_origin(allowed, request.headers.get("Origin"))
        if origin:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            response.headers["Access-Control-Max-Age"] = "600"
        if origin != "*":
            response.headers["Vary"] = "Origin"
        return response

    @app.after_request
    def _origin(response: Response) -> Response:
        if not _in_scope() or request.method == "OPTIONS":
            return response
        origin = _allowed_origin(allowed, request.headers.get("Origin"))
        if origin:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Content-Type"
        if origin != "*":
            response.headers.add("Vary", "Origin")
        return response
