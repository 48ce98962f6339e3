"""The tumour-board meeting packet: one PDF for a board date (ReportLab, pure Python).

Page 1 lists the cases; then one page per case in the order a board reads it: the likelihood
with its threshold and model, the reference-model warning, the stored image previews, the
features and the pathology result when known. Built in memory and sent with ``no-store``
(it holds patient data); every export is audited with who exported which cases for which date.

The form posts the case ids chosen on the packet page and the board date (free text, shown on
the packet; ``YYYY-MM-DD`` expected).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from xml.sax.saxutils import escape

from flask import Response, render_template, request
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import (
    Flowable,
    Image,
    PageBreak,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from cds_service import display
from cds_service.audit import AuditAction
from cds_service.review import bp, prediction_of
from cds_service.review.auth import login_required, signed_in_user
from cds_service.state import state
from cds_service.store import CaseSnapshot, Her2Pathology, Store, WorklistQuery
from models import schema as feature_schema

WARNING = (
    "Statistical estimate from breast MRI, not a pathology result: confirm HER2 status by "
    "IHC/ISH. Reference model, not clinically validated."
)
MAX_CASES = 100
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class PacketError(ValueError):
    """The form asked for no case, too many, or gave no board date (message safe to show)."""


@dataclass(frozen=True)
class PacketCase:
    """What the packet prints of one case."""

    case: CaseSnapshot
    pathology: str | None  # the full sentence (case page)
    short: str | None = None  # group and score (the list)


def _styles() -> dict[str, ParagraphStyle]:
    base = getSampleStyleSheet()
    return {
        "title": base["Title"],
        "h2": base["Heading2"],
        "body": base["BodyText"],
        "big": ParagraphStyle("big", parent=base["BodyText"], fontSize=20, leading=26),
        "warn": ParagraphStyle(
            "warn",
            parent=base["BodyText"],
            backColor=colors.HexColor("#fff4d6"),
            borderColor=colors.HexColor("#e0b84c"),
            borderWidth=0.5,
            borderPadding=4,
        ),
    }


def _p(text: str, style: ParagraphStyle) -> Paragraph:
    return Paragraph(escape(text), style)


def _table(
    rows: Sequence[Sequence[str | Flowable]], widths: Sequence[float] | None = None
) -> Table:
    table = Table(rows, colWidths=widths, repeatRows=1, hAlign="LEFT")
    table.setStyle(
        TableStyle(
            [
                ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
                ("FONTSIZE", (0, 0), (-1, -1), 8),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ]
        )
    )
    return table


def _likelihood(case: CaseSnapshot) -> str:
    prediction = prediction_of(case)
    if prediction is None:
        error = case.prediction.error if case.prediction else None
        return f"no estimate ({error})" if error else "no estimate"
    return f"{prediction.probability * 100:.0f} %"


def _person(name: str) -> str:
    """A DICOM PN (``Family^Given^Middle``) as people write it: "Family, Given Middle"."""
    family, _, rest = name.partition("^")
    rest = " ".join(p for p in rest.split("^") if p)
    return f"{family}, {rest}" if rest else family


def _patient(case: CaseSnapshot) -> str:
    name = _person(case.result.patient_name) if case.result.patient_name else None
    return f"{name}, MRN {_mrn(case)}" if name else f"MRN {_mrn(case)}"


def _mrn(case: CaseSnapshot) -> str:
    issuer = case.result.patient_issuer
    return f"{case.result.patient_id} ({issuer})" if issuer else case.result.patient_id


#: The maps a board page shows, at the ROI's largest cross-section (``dicom_node`` previews).
PACKET_MAPS = ("adc_slice", "dapp_slice", "kapp_slice")


def packet_previews(previews: dict[str, str]) -> list[tuple[str, str]]:
    """At most four previews for one page: the middle high-b DWI slice and the three maps
    (other names: the first four, sorted)."""
    dwi = sorted(n for n in previews if n.startswith("dwi_slice_"))
    chosen = ([dwi[len(dwi) // 2]] if dwi else []) + [n for n in PACKET_MAPS if n in previews]
    if not chosen:
        chosen = sorted(previews)[:4]
    return [(name, previews[name]) for name in chosen[:4]]


def _images(case: CaseSnapshot) -> list[Flowable]:
    """The stored PNG previews in one row, each with its name."""
    cells: list[Table] = []
    for name, data in packet_previews(dict(case.revision.previews or {})):
        try:
            raw = base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError):
            continue
        image = Image(io.BytesIO(raw), width=42 * mm, height=42 * mm, kind="proportional")
        cells.append(Table([[image], [_p(name.replace("_", " "), _styles()["body"])]]))
    if not cells:
        return [_p("No image previews were stored for this case.", _styles()["body"])]
    return [Table([cells], hAlign="LEFT")]


def _case_page(item: PacketCase, number: int, total: int) -> list[Flowable]:
    st = _styles()
    case = item.case
    prediction = prediction_of(case)
    flow: list[Flowable] = [
        _p(f"Case {number} of {total}: {_patient(case)}", st["h2"]),
        _p(
            f"Accession {case.result.accession_number or '-'}; study "
            f"{case.result.acquired_at:%Y-%m-%d}; {display.side(case.result.laterality)}",
            st["body"],
        ),
        _p(f"Likelihood of HER2-low: {_likelihood(case)}", st["big"]),
    ]
    if prediction is not None:
        flow.append(
            _p(
                f"Operating threshold {prediction.threshold * 100:.0f} % "
                f"({'at or above' if prediction.above_threshold else 'below'}); model "
                f"{prediction.model_name} {prediction.model_version}, "
                f"{display.VARIANT_TEXT[prediction.variant]}.",
                st["body"],
            )
        )
    flow += [Spacer(1, 3 * mm), _p(WARNING, st["warn"]), Spacer(1, 3 * mm)]
    flow.append(_p(f"Pathology HER2: {item.pathology or 'not known'}", st["body"]))
    flow += [_p("Images", st["h2"]), *_images(case), _p("Features", st["h2"])]
    rows = [["Feature", "Value"]]
    rows += [
        [display.label(n), display.format_value(n, case.features[n])]
        for n in feature_schema.QUANTITATIVE_NAMES
        if n in case.features
    ]
    values = case.descriptors.values if case.descriptors else {}
    rows += [
        [display.label(n), display.format_value(n, values[n])]
        for n in feature_schema.DESCRIPTOR_NAMES
        if values.get(n)
    ]
    half = (len(rows) + 2) // 2  # two columns of (feature, value): one page per case
    left, right = rows[:half], [["Feature", "Value"], *rows[half:]]
    right += [["", ""]] * (len(left) - len(right))
    flow.append(
        _table([[*a, *b] for a, b in zip(left, right, strict=True)], (50 * mm, 38 * mm) * 2)
    )
    return flow


def build_packet(board_date: str, cases: Sequence[PacketCase], *, exported_by: str) -> bytes:
    """The PDF bytes: the list, then one page per case."""
    st = _styles()
    out = io.BytesIO()
    doc = SimpleDocTemplate(
        out,
        pagesize=A4,
        title=f"Tumour board {board_date}",
        author="her2low-cds",
        leftMargin=15 * mm,
        rightMargin=15 * mm,
        topMargin=15 * mm,
        bottomMargin=15 * mm,
    )
    now = datetime.now(UTC)
    flow: list[Flowable] = [
        _p(f"Tumour board {board_date}: HER2-low MRI estimates", st["title"]),
        _p(WARNING, st["warn"]),
        Spacer(1, 4 * mm),
        _p(
            f"{len(cases)} case(s). Exported {now:%Y-%m-%d %H:%M} UTC by {exported_by}.",
            st["body"],
        ),
    ]
    rows = [["#", "Patient", "Accession", "Study date", "Side", "Likelihood", "Pathology"]]
    for k, item in enumerate(cases, 1):
        c = item.case
        rows.append(
            [
                str(k),
                _patient(c),
                c.result.accession_number or "-",
                f"{c.result.acquired_at:%Y-%m-%d}",
                display.side(c.result.laterality, "-"),
                _likelihood(c),
                item.short or "-",
            ]
        )
    small = ParagraphStyle("small", parent=st["body"], fontSize=8, leading=10)
    cells = [[_p(text, small) for text in row] for row in rows]
    flow.append(_table(cells, (8 * mm, 52 * mm, 24 * mm, 21 * mm, 20 * mm, 18 * mm, 37 * mm)))
    for k, item in enumerate(cases, 1):
        flow += [PageBreak(), *_case_page(item, k, len(cases))]
    doc.build(flow)
    return out.getvalue()


def packet_cases(store: Store, result_ids: Sequence[str]) -> list[PacketCase]:
    """The chosen cases in the order given (unknown ids are skipped)."""
    items = []
    for rid in dict.fromkeys(result_ids):
        case = store.case(rid)
        if case is None:
            continue
        reports = store.pathology_for(rid)
        text = short = None
        if reports:
            latest = reports[0]
            score = f", IHC {latest.score}" if latest.score else ""
            text = Her2Pathology(latest.her2).display + score
            short = {"zero": "HER2 0", "low": "HER2-low", "positive": "HER2-positive"}[
                latest.her2
            ] + score
        items.append(PacketCase(case, text, short))
    return items


def _checked(form_ids: list[str], board_date: str) -> tuple[list[str], str]:
    board_date = board_date.strip()
    if _day(board_date) is None:
        raise PacketError("Board date: enter it as YYYY-MM-DD.")
    if not form_ids:
        raise PacketError("Choose at least one case.")
    if len(form_ids) > MAX_CASES:
        raise PacketError(f"At most {MAX_CASES} cases per packet.")
    return form_ids, board_date


def _form(error: str | None, status: int, chosen: set[str], board_date: str) -> tuple[str, int]:
    """The packet form: the cases of ``board_date`` ticked, or the latest cases to choose from."""
    store = state().store
    day = _day(board_date)
    rows = []
    if day is not None:
        page = store.worklist_page(WorklistQuery(board_date=day, limit=MAX_CASES))
        ids = [r.result_id for r in page.rows]
        chosen = chosen or set(ids)
    else:
        ids = [c.result.id for c in store.worklist(limit=MAX_CASES)]
    for rid in ids:
        case = store.case(rid)
        if case is None:
            continue
        prediction = prediction_of(case)
        rows.append(
            {
                "id": rid,
                "name": case.result.patient_name or "—",
                "mrn": _mrn(case),
                "accession": case.result.accession_number or "—",
                "acquired": f"{case.result.acquired_at:%Y-%m-%d}",
                "likelihood": f"{prediction.probability * 100:.0f} %" if prediction else "—",
                "chosen": rid in chosen,
            }
        )
    html = render_template(
        "review_packet.html",
        rows=rows,
        error=error,
        board_date=board_date,
        board_dates=[(f"{d:%Y-%m-%d}", n) for d, n in store.board_dates()],
        reference=True,
    )
    return html, status


def _day(text: str) -> date | None:
    try:
        return date.fromisoformat(text.strip()) if _DATE.match(text.strip()) else None
    except ValueError:
        return None


@bp.get("/packet")
@login_required
def packet_form() -> tuple[str, int]:
    """Choose the cases and the board date of a meeting packet."""
    return _form(None, 200, set(), request.args.get("board_date", ""))


@bp.post("/packet")
@login_required
def packet_export() -> Response | tuple[str, int]:
    """The packet PDF for the chosen cases (audited: who exported which cases, for which date)."""
    ids = [i for i in request.form.getlist("case") if i][: MAX_CASES + 1]
    board_date = request.form.get("board_date", "")
    try:
        ids, board_date = _checked(ids, board_date)
    except PacketError as exc:
        return _form(str(exc), 422, set(ids), board_date[:32])
    st = state()
    user = signed_in_user().username
    cases = packet_cases(st.store, ids)
    if not cases:
        return _form("None of the chosen cases exists.", 422, set(), board_date)
    pdf = build_packet(board_date, cases, exported_by=user)
    st.store.audit(
        user,
        AuditAction.PACKET_EXPORTED,
        None,
        {"board_date": board_date, "cases": [c.case.result.id for c in cases]},
    )
    response = Response(pdf, mimetype="application/pdf")
    response.headers["Content-Disposition"] = (
        f'attachment; filename="tumour-board-{board_date}.pdf"'
    )
    return response
