"""The worklist: every analysed series with whose case it is, its estimate, state and flags.

Filters, sorting and the board-date view are query-string parameters, and none of them holds
patient data (states, dates, a likelihood band, a lesion type): no name or MRN ever appears in
a URL, so none reaches a proxy log, a browser history or a ``Referer``. The page reads only the
light ``results`` columns the store keeps for it (one indexed query, one count, one group-by).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from urllib.parse import urlencode

from flask import render_template, request, url_for
from werkzeug.datastructures import MultiDict

from cds_service import display
from cds_service.case_state import CaseState
from cds_service.review import bp
from cds_service.review.auth import login_required
from cds_service.state import state
from cds_service.store import WorklistPage, WorklistQuery, WorklistRow, WorklistSort

PAGE_SIZE = 100


class LikelihoodBand(StrEnum):
    """Likelihood bands of the filter (the estimate's probability, 0–100 %)."""

    LOW = "0-25"
    LOW_MID = "25-50"
    HIGH_MID = "50-75"
    HIGH = "75-100"

    @property
    def bounds(self) -> tuple[float, float | None]:
        """[at least, below) as probabilities; None: no upper bound."""
        low, high = (int(x) for x in self.value.split("-"))
        return low / 100, (None if high == 100 else high / 100)

    @property
    def display(self) -> str:
        low, high = self.value.split("-")
        return f"{low}–{high} %"


LESION_FILTERS = (("mass", "Mass"), ("nme", "Non-mass enhancement"), ("unknown", "Not entered"))


@dataclass(frozen=True)
class ParsedFilters:
    """The worklist query read from a query string, with messages for what was not understood."""

    query: WorklistQuery
    args: dict[str, list[str]]  # the understood parameters, to rebuild links
    problems: list[str]


def _date(args: MultiDict[str, str], name: str, label: str, problems: list[str]) -> date | None:
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        problems.append(f"{label}: “{raw[:20]}” is not a date (YYYY-MM-DD); filter ignored.")
        return None


def parse_filters(args: MultiDict[str, str]) -> ParsedFilters:
    """Read the worklist filters; unknown values are reported and ignored, never guessed."""
    problems: list[str] = []
    kept: dict[str, list[str]] = {}
    states: list[CaseState] = []
    for raw in args.getlist("state"):
        try:
            states.append(CaseState(raw))
        except ValueError:
            problems.append("State: unknown value ignored.")
    if states:
        kept["state"] = [s.value for s in states]
    since = _date(args, "since", "From", problems)
    until = _date(args, "until", "To", problems)
    board = _date(args, "board", "Board date", problems)
    for name, value in (("since", since), ("until", until), ("board", board)):
        if value is not None:
            kept[name] = [value.isoformat()]
    low = high = None
    band_raw = args.get("band") or ""
    if band_raw:
        try:
            band = LikelihoodBand(band_raw)
            low, high = band.bounds
            kept["band"] = [band.value]
        except ValueError:
            problems.append("Likelihood band: unknown value ignored.")
    lesion = args.get("lesion") or None
    if lesion and lesion not in {v for v, _ in LESION_FILTERS}:
        problems.append("Lesion type: unknown value ignored.")
        lesion = None
    if lesion:
        kept["lesion"] = [lesion]
    discordant = args.get("discordant") == "1"
    if discordant:
        kept["discordant"] = ["1"]
    try:
        sort = WorklistSort(args.get("sort") or WorklistSort.STUDY_DATE)
    except ValueError:
        problems.append("Sort: unknown column ignored.")
        sort = WorklistSort.STUDY_DATE
    descending = (args.get("dir") or "desc") != "asc"
    if sort is not WorklistSort.STUDY_DATE or not descending:
        kept["sort"] = [sort.value]
        kept["dir"] = ["desc" if descending else "asc"]
    try:
        page = max(1, int(args.get("page") or 1))
    except ValueError:
        page = 1
    query = WorklistQuery(
        states=tuple(states),
        since=since,
        until=until,
        likelihood_at_least=low,
        likelihood_below=high,
        lesion_type=lesion,
        discordant_only=discordant,
        board_date=board,
        sort=sort,
        descending=descending,
        limit=PAGE_SIZE,
        offset=(page - 1) * PAGE_SIZE,
    )
    return ParsedFilters(query=query, args=kept, problems=problems)


def _link(args: dict[str, list[str]], **changes: str | None) -> str:
    """The worklist URL with ``args`` changed (None removes a parameter); no PHI by design."""
    merged = {k: list(v) for k, v in args.items()}
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = [value]
    query = urlencode([(k, v) for k, values in merged.items() for v in values])
    return url_for("review.worklist") + (f"?{query}" if query else "")


def _row(row: WorklistRow, cases: str = "/review/cases/") -> dict[str, object]:
    return {
        "id": row.result_id,
        "href": cases + row.result_id,  # one url_for per page, not per row
        "name": display_name(row.patient_name),
        "mrn": row.patient_id,
        "issuer": row.patient_issuer,
        "accession": row.accession_number or "—",
        "study_date": row.study_date.isoformat() if row.study_date else "—",
        "side": display.side(row.laterality, "—"),
        "lesion": {"mass": "Mass", "nme": "NME"}.get(row.lesion_type or "", "—"),
        "percent": row.likelihood * 100 if row.likelihood is not None else None,
        "above": bool(row.above_threshold),
        "state": row.state,
        "discordant": row.discordant,
        "board_date": row.board_date.isoformat() if row.board_date else "",
        "flag": row.review_flag,
        "model": row.scored_by,
    }


def display_name(name: str | None) -> str:
    """A DICOM PN (``Family^Given^Middle^Prefix^Suffix``) as "FAMILY, Given Middle"."""
    if not name:
        return "—"
    parts = [p.strip() for p in name.split("=")[0].split("^")]
    family = parts[0]
    given = " ".join(p for p in parts[1:3] if p)
    return f"{family}, {given}" if family and given else family or given or "—"


def _sort_links(parsed: ParsedFilters) -> dict[str, dict[str, str]]:
    """Per sortable column: its link (toggling the direction when it is the current one)."""
    links = {}
    for column in WorklistSort:
        current = parsed.query.sort is column
        direction = "asc" if current and parsed.query.descending else "desc"
        arrow = ("▼" if parsed.query.descending else "▲") if current else ""
        links[column.value] = {
            "href": _link(parsed.args, sort=column.value, dir=direction, page=None),
            "arrow": arrow,
            "aria": ("descending" if parsed.query.descending else "ascending")
            if current
            else "none",
        }
    return links


def render_worklist(parsed: ParsedFilters, page: WorklistPage) -> str:
    """The worklist page of one query (also used by the benchmark's timing)."""
    number = parsed.query.offset // PAGE_SIZE + 1
    return render_template(
        "review_worklist.html",
        rows=[_row(r, url_for("review.case", result_id="-").removesuffix("-")) for r in page.rows],
        page=page,
        total=page.total,
        counts=[(s, page.counts.get(s, 0)) for s in CaseState],
        count_links={s.value: _link(parsed.args, state=s.value, page=None) for s in CaseState},
        states=list(CaseState),
        bands=list(LikelihoodBand),
        lesions=LESION_FILTERS,
        sorts=_sort_links(parsed),
        q=parsed.query,
        selected_states={s.value for s in parsed.query.states},
        band=(parsed.args.get("band") or [""])[0],
        problems=parsed.problems,
        board_dates=state().store.board_dates(),
        board_link=lambda d: _link({}, board=d.isoformat(), sort="patient", dir="asc"),
        clear_link=url_for("review.worklist"),
        prev_link=_link(parsed.args, page=str(number - 1)) if number > 1 else None,
        next_link=_link(parsed.args, page=str(number + 1))
        if parsed.query.offset + PAGE_SIZE < page.total
        else None,
        page_number=number,
        reference=True,
    )


@bp.get("/", strict_slashes=False)
@login_required
def worklist() -> str:
    parsed = parse_filters(request.args)
    page = state().store.worklist_page(parsed.query)
    return render_worklist(parsed, page)


__all__ = ["LikelihoodBand", "display_name", "parse_filters", "render_worklist"]
