"""The audit page's filters and its CSV export (admins: ``Permission.READ_AUDIT``).

Filters come from the query string (``actor``, ``action``, ``since``/``until`` as dates, ``case``)
so a filtered view can be bookmarked and exported as it is shown; the export is itself audited
(who exported which filter). Cells starting with ``= + - @`` are prefixed with ``'`` so a
spreadsheet does not run them as formulas (OWASP CSV injection).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta

from flask import Response, request

from cds_service.accounts import Permission
from cds_service.audit import AuditAction
from cds_service.orm import AuditEvent
from cds_service.review import bp
from cds_service.review.auth import permission_required, signed_in_user
from cds_service.state import state
from cds_service.store import AuditQuery

CSV_LIMIT = 100_000
PAGE_LIMIT = 500
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _day(text: str | None) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        return None


def parse_query(args: Mapping[str, str]) -> tuple[AuditQuery, list[str]]:
    """The filters of a query string, and messages for the ones that could not be read."""
    errors = []
    action: AuditAction | None = None
    if args.get("action"):
        try:
            action = AuditAction(args["action"])
        except ValueError:
            errors.append("Action: choose one of the listed actions.")
    since, until = _day(args.get("since")), _day(args.get("until"))
    if args.get("since") and since is None:
        errors.append("From: enter a date as YYYY-MM-DD.")
    if args.get("until") and until is None:
        errors.append("To: enter a date as YYYY-MM-DD.")
    query = AuditQuery(
        actor=(args.get("actor") or "").strip()[:256] or None,
        action=action,
        since=datetime.combine(since, time(0), UTC) if since else None,
        until=datetime.combine(until + timedelta(days=1), time(0), UTC) if until else None,
        result_id=(args.get("case") or "").strip()[:36] or None,
    )
    return query, errors


def describe(query: AuditQuery) -> dict[str, str]:
    """The filters in force (audit detail of an export)."""
    out = {
        "actor": query.actor,
        "action": query.action.value if query.action else None,
        "since": query.since.date().isoformat() if query.since else None,
        "until": (query.until - timedelta(days=1)).date().isoformat() if query.until else None,
        "case": query.result_id,
    }
    return {k: v for k, v in out.items() if v}


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA) else text


def to_csv(events: list[AuditEvent]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["id", "at_utc", "actor", "action", "case", "detail"])
    for e in events:
        detail = json.dumps(e.detail, sort_keys=True, ensure_ascii=False) if e.detail else ""
        writer.writerow(
            [
                e.id,
                e.at.astimezone(UTC).isoformat(timespec="seconds"),
                _cell(e.actor),
                _cell(e.action),
                _cell(e.result_id),
                _cell(detail),
            ]
        )
    return out.getvalue()


@bp.get("/admin/audit.csv")
@permission_required(Permission.READ_AUDIT)
def audit_csv() -> Response:
    """The filtered audit trail as CSV (RFC 4180), newest first."""
    query, errors = parse_query(request.args)
    if errors:
        return Response("\n".join(errors) + "\n", status=400, mimetype="text/plain")
    st = state()
    events = st.store.audit_events(query, limit=CSV_LIMIT)
    st.store.audit(
        signed_in_user().username,
        AuditAction.AUDIT_EXPORTED,
        None,
        {"filters": describe(query), "rows": len(events)},
    )
    response = Response(to_csv(events), mimetype="text/csv")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response.headers["Content-Disposition"] = f'attachment; filename="audit-{stamp}.csv"'
    return response
