"""The one reader of JSON request bodies, and the one parser of timestamps in them.

Every JSON endpoint (CDS Hooks call and feedback, results API, descriptors) reads its body with
``read_json``, so hostile input from an authenticated caller meets the same checks everywhere and
ends as a 4xx OperationOutcome, never a 500:

- size: at most ``MAX_BODY_BYTES`` (Flask's ``MAX_CONTENT_LENGTH`` → 413);
- ``Content-Type`` ``application/json`` or ``application/fhir+json`` (→ 415);
- UTF-8 only (RFC 8259 §8.1), strict JSON: no ``NaN``/``Infinity``, no number that overflows
  a double, no integer beyond 64 bits (RFC 8259 §6 interoperability) (→ 400);
- nesting at most ``MAX_DEPTH``, measured on the raw text *before* ``json.loads`` so neither the
  parser nor any later recursive code (pydantic, ``json.dumps``, SQLAlchemy's JSON type) can hit
  ``RecursionError`` (→ 400);
- no lone UTF-16 surrogate (``"\\ud800"``) in any key or string: it cannot be encoded as UTF-8,
  so it would fail later in a log line, a database write or the response (→ 400);
- an object at the top (→ 400).

``parse_timestamp`` turns an ISO 8601 string into an aware UTC ``datetime`` or refuses it, also
when converting to UTC overflows (``9999-12-31T23:59:59-23:59``).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any

from flask import Request, current_app

from cds_service.errors import ApiError, IssueType

MAX_BODY_BYTES = 16 * 1024 * 1024
#: Deepest nesting of arrays/objects accepted. A prefetched FHIR Bundle needs about ten levels;
#: anything this deep is an attack or a bug, and it keeps recursive code far from its limits.
MAX_DEPTH = 64
JSON_TYPES = ("application/json", "application/fhir+json")
_INT_LIMIT = 2**63

# A JSON string (escapes included; an unterminated one runs to the end) or a bracket. The
# unrolled loop matches each character once, so the scan is linear even on hostile text.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only these can make one from UTF-8


class JsonInputError(ValueError):
    """Input refused by the strict parser; the message is safe to show the caller.

    ``expression``: the offending element (``a.0.b``) when known.
    """

    def __init__(self, message: str, expression: str | None = None) -> None:
        super().__init__(message)
        self.expression = expression


def _reject_constant(token: str) -> Any:
    raise JsonInputError(f"{token} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonInputError(f"number out of range: {text[:32]}")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 20:  # cheaper than int() on thousands of digits
        raise JsonInputError(f"integer out of range: {text[:32]}…")
    value = int(text)
    if not -_INT_LIMIT <= value < _INT_LIMIT:
        raise JsonInputError(f"integer out of range: {text}")
    return value


def nesting_depth(text: str) -> int:
    """Deepest array/object nesting of JSON ``text``, without recursion (brackets in strings
    do not count). Exact for valid JSON; for invalid JSON an upper bound of what ``json.loads``
    reaches before it fails."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _lone_surrogate_path(value: Any) -> str | None:
    """The path of the first key or string holding a lone surrogate, iteratively (no recursion)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{path}.{key}" if path else str(key)
                if _SURROGATE.search(key):
                    return path or "body"
                stack.append((child_path, child))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), c) for i, c in enumerate(item))
    return None


def parse_json(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Strict JSON (RFC 8259) with the limits above. Raises JsonInputError."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8").removeprefix("\ufeff")  # a BOM MAY be ignored (§8.1)
        except UnicodeDecodeError as exc:
            raise JsonInputError(f"not UTF-8 (byte {exc.start})") from None
    else:
        text = data
    few_brackets = text.count("[") + text.count("{") <= max_depth  # the usual case: no scan
    if not few_brackets and nesting_depth(text) > max_depth:
        raise JsonInputError(f"nested deeper than {max_depth} levels")
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except JsonInputError:
        raise
    except RecursionError:  # not reachable after the depth check; kept as a last guard
        raise JsonInputError(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError and int()/float() errors
        raise JsonInputError(str(exc)) from None
    # Decoded UTF-8 holds no surrogate (the codec refuses one), so from bytes only a \u escape
    # can make one; a str may hold one as is. Neither: skip the walk.
    maybe = ("\\u" in text and _SURROGATE_ESCAPE.search(text)) or (
        not isinstance(data, bytes) and _SURROGATE.search(text)
    )
    path = _lone_surrogate_path(value) if maybe else None
    if path is not None:
        shown = path if len(path) <= 120 else path[:120] + "…"
        raise JsonInputError(f"{shown}: a lone UTF-16 surrogate is not a character", shown)
    return value


def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object, or ApiError 413 / 415 / 400 (see the module docstring)."""
    if request.mimetype not in JSON_TYPES:
        raise ApiError(
            415,
            f"Content-Type must be application/json, got {request.mimetype or 'none'}",
            code=IssueType.NOT_SUPPORTED,
        )
    limit = current_app.config.get("MAX_CONTENT_LENGTH") or MAX_BODY_BYTES
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, f"body larger than {limit} bytes")
    data = request.get_data(cache=True)  # Flask stops reading past MAX_CONTENT_LENGTH (413)
    if len(data) > limit:
        raise ApiError(413, f"body larger than {limit} bytes")
    try:
        body = parse_json(data)
    except JsonInputError as exc:
        raise ApiError(
            400, f"malformed JSON: {exc}", code=IssueType.STRUCTURE, expression=exc.expression
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code=IssueType.STRUCTURE)
    return body


def parse_timestamp(value: Any) -> datetime:
    """An ISO 8601 date-time string as an aware UTC datetime; naive means UTC.

    Raises ValueError (pydantic turns it into an error naming the field) for a non-string, a
    malformed string, or an instant outside what ``datetime`` holds in UTC.
    """
    if not isinstance(value, str):
        raise ValueError("expected an ISO 8601 date-time string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not an ISO 8601 date-time: {value[:64]!r}") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"date-time out of range in UTC: {value[:64]!r}") from None
