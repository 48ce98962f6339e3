"""Benchmark the review app's worklist and case page on 10,000 synthetic cases (issue 13 "Speed").

One run, in-process: the service app (real reference model, SQLite, migrated) and a bare Flask
app that renders the same worklist table from a Python list, both driven by Flask's test client,
so the timings are server time per page (routing, session and CSRF checks, queries, template) and
not the network. The database is filled with 10,000 cases by bulk inserts copying one case the
service itself ingested and scored (so every JSON column is what the service writes); 50 of them
carry realistic previews (slices through the ROI, histograms, ~20 PNGs) and are the case pages
measured, after one warm-up request per case so their images sit in the worker's cache.

Goals: worklist (filtered and sorted) p95 <= 150 ms, case page p95 <= 250 ms.

    .venv/bin/python benchmarks/bench_review.py [--cases 10000] [--requests 200] [--json]

Other pages (H13: the meeting packet) add a timing function to ``EXTRA_TIMINGS``; each gets the
:class:`Bench` context and returns ``{name: [seconds, ...]}`` or a dict of extra results.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / "tests"),
    str(Path(__file__).resolve().parent),
]

import numpy as np  # noqa: E402
from flask import Flask, render_template_string  # noqa: E402
from flask.testing import FlaskClient  # noqa: E402
from sqlalchemy import insert, select  # noqa: E402
from test_cds_support import (  # noqa: E402
    FULL_FEATURES,
    RESULTS_TOKEN,
    csrf_token,
    result_payload,
)

from cds_service.app import create_app  # noqa: E402
from cds_service.case_state import CaseState  # noqa: E402
from cds_service.db import MIGRATIONS  # noqa: E402
from cds_service.orm import PredictionRow, Result, ResultRevision  # noqa: E402
from dicom_node.analysis.previews import analysis_previews  # noqa: E402
from her2low.core.settings import Settings  # noqa: E402

GOAL_WORKLIST_P95 = 0.150
GOAL_CASE_P95 = 0.250
PASSWORD = "bench-password-long-enough"
FAMILY = ["MUELLER", "SCHMIDT", "ROSSI", "GARCIA", "NGUYEN", "SMITH", "KOWALSKI", "DUBOIS"]
GIVEN = ["ANNA", "MARIA", "LENA", "SOFIA", "EMMA", "JULIA", "CLARA", "IDA"]

#: The worklist queries timed: default, then filtered and sorted ones a board uses.
WORKLIST_QUERIES = (
    "/review/",
    "/review/?state=ready-for-board&sort=likelihood&dir=desc",
    "/review/?since=2026-01-01&until=2026-06-30&band=50-75&sort=patient&dir=asc",
    "/review/?lesion=mass&discordant=1&sort=study-date&dir=asc",
    "/review/?state=new&state=descriptors-needed&band=75-100",
    "/review/?board=2026-12-08&sort=patient&dir=asc",
)

BARE_TABLE = """<!doctype html><html><body><table>
<thead><tr><th>Patient</th><th>MRN</th><th>Accession</th><th>Study date</th><th>Side</th>
<th>Lesion</th><th>Likelihood</th><th>State</th><th>Flags</th><th>Board</th><th>Model</th>
<th></th></tr></thead><tbody>
{% for r in rows %}<tr><td>{{ r.name }}</td><td>{{ r.mrn }} ({{ r.issuer }})</td>
<td>{{ r.accession }}</td><td>{{ r.study_date }}</td><td>{{ r.side }}</td><td>{{ r.lesion }}</td>
<td>{{ '%.0f' % r.percent }} %</td><td>{{ r.state }}</td><td>{{ 'discordant' if r.discordant else '' }}</td>
<td>{{ r.board_date }}</td><td>{{ r.model }}</td><td><a href="/review/cases/{{ r.id }}">Open</a></td></tr>
{% endfor %}</tbody></table></body></html>"""


@dataclass
class Bench:
    """What a timing function gets: the apps, a signed-in client, the cases with previews."""

    app: Flask
    client: FlaskClient
    settings: Settings
    case_ids: list[str]
    all_ids: list[str]
    requests: int


#: Goal: the meeting packet of 20 cases, with their images, in at most 10 s.
GOAL_PACKET_SECONDS = 10.0
PACKET_CASES = 20


def time_packet(bench: Bench) -> dict[str, Any]:
    """The meeting packet PDF of 20 cases with previews, through the real POST route (3 runs)."""
    ids = bench.case_ids[:PACKET_CASES]
    form = bench.client.get("/review/packet?board_date=2026-12-08")
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        answer = bench.client.post(
            "/review/packet",
            data={"case": ids, "board_date": "2026-12-08", "csrf_token": csrf_token(form.text)},
        )
        seconds.append(time.perf_counter() - started)
        if answer.status_code != 200 or not answer.data.startswith(b"%PDF"):
            raise RuntimeError(f"packet export failed: {answer.status_code}")
    return {
        "packet_20_cases_s": {"median_s": statistics.median(seconds), "cases": len(ids)},
        "packet_goal_met": statistics.median(seconds) <= GOAL_PACKET_SECONDS,
    }


#: More pages to time in the same run (e.g. the meeting packet): see the module docstring.
EXTRA_TIMINGS: list[Callable[[Bench], dict[str, Any]]] = [time_packet]


def _previews() -> dict[str, str]:
    """Realistic previews of one analysis (a 12-slice 96×96 volume, ROI over 5 slices)."""
    shape = (12, 96, 96)
    rng = np.random.default_rng(1)
    roi = np.zeros(shape, dtype=bool)
    roi[4:9, 40:60, 38:58] = True
    maps = {
        "adc": rng.normal(1.1e-3, 2e-4, shape),
        "dapp": rng.normal(1.3e-3, 2e-4, shape),
        "kapp": rng.normal(0.9, 0.15, shape),
    }
    fitted = np.ones(shape, dtype=bool)
    pngs = analysis_previews(
        maps,
        roi,
        roi_confirmed=True,
        underlay=rng.uniform(50, 400, shape),
        high_b=rng.uniform(10, 90, shape),
        shown=dict.fromkeys(maps, fitted),
        histogram_voxels=dict.fromkeys(maps, fitted),
        bin_widths={"adc": 2.5e-5, "dapp": 2.5e-5, "kapp": 0.025},
        bin_min=0.0,
        orientation=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    )
    return {k.removesuffix(".png"): base64.b64encode(v).decode() for k, v in pngs.items()}


def _fill(app: Flask, n: int, with_previews: int) -> tuple[list[str], list[str]]:
    """Ingest and score one case through the API, then bulk-copy it to ``n`` cases."""
    client = app.test_client()
    body = dict(result_payload(), features=dict(FULL_FEATURES))
    body["patient"]["name"] = "TEMPLATE^CASE"
    body["study_date"] = "2026-11-25"
    body["previews"] = _previews()
    response = client.post(
        "/api/v1/results", json=body, headers={"Authorization": f"Bearer {RESULTS_TOKEN}"}
    )
    assert response.status_code == 201, response.text[:500]
    template_id = response.json["result_id"]  # type: ignore[index]
    st = app.extensions["her2low_cds"]
    engine = st.engine
    results, revisions, predictions = (
        Result.__table__,
        ResultRevision.__table__,
        PredictionRow.__table__,
    )
    with engine.connect() as conn:
        result = dict(
            conn.execute(select(results).where(results.c.id == template_id)).mappings().one()
        )
        revision = dict(
            conn.execute(select(revisions).where(revisions.c.result_id == template_id))
            .mappings()
            .one()
        )
        prediction = dict(
            conn.execute(select(predictions).where(predictions.c.result_id == template_id))
            .mappings()
            .first()
            or {}
        )
    assert prediction, "the template case was not scored"
    rng = random.Random(20261201)
    start = dt.date(2025, 1, 1)
    board_dates = [dt.date(2026, 12, 8), dt.date(2026, 12, 15), dt.date(2026, 12, 22)]
    states = list(CaseState)
    ids = [template_id]
    res_rows, rev_rows, pred_rows = [], [], []
    now = dt.datetime.now(dt.UTC)
    for k in range(1, n):
        rid = str(uuid.uuid4())
        ids.append(rid)
        p = rng.random()
        res_rows.append(
            {
                **result,
                "id": rid,
                "series_instance_uid": f"1.2.826.0.1.3680043.8.498.9{k}",
                "patient_id": f"MRN-{100000 + k}",
                "patient_name": f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}",
                "accession_number": f"ACC{200000 + k}",
                "study_date": start + dt.timedelta(days=rng.randrange(0, 700)),
                "laterality": rng.choice(["L", "R"]),
                "lesion_type": rng.choice(["mass", "nme", None]),
                "likelihood": p,
                "above_threshold": p >= 0.5,
                "state": rng.choice(states).value,
                "discordant": rng.random() < 0.05,
                "board_date": rng.choice(board_dates) if rng.random() < 0.02 else None,
                "created_at": now,
                "updated_at": now,
            }
        )
        rev_rows.append(
            {
                **{c: v for c, v in revision.items() if c != "id"},
                "result_id": rid,
                "previews": revision["previews"] if k < with_previews else None,
            }
        )
        pred_json = dict(prediction["prediction"] or {})
        pred_json["probability"] = p
        pred_rows.append(
            {
                **{c: v for c, v in prediction.items() if c != "id"},
                "result_id": rid,
                "probability": p,
                "prediction": pred_json,
                "card_uuid": str(uuid.uuid4()),
            }
        )
    with engine.begin() as conn:
        for chunk in range(0, len(res_rows), 1000):
            conn.execute(insert(results), res_rows[chunk : chunk + 1000])
            conn.execute(insert(revisions), rev_rows[chunk : chunk + 1000])
            conn.execute(insert(predictions), pred_rows[chunk : chunk + 1000])
    return ids[:with_previews], ids


def _signed_in(app: Flask) -> FlaskClient:
    app.extensions["her2low_review"].accounts.add_user("bench-onc", "oncologist", PASSWORD)
    client = app.test_client()
    page = client.get("/review/sign-in")
    signed = client.post(
        "/review/sign-in",
        data={"username": "bench-onc", "password": PASSWORD, "csrf_token": csrf_token(page.text)},
    )
    assert signed.status_code == 303, signed.text[:300]
    return client


def _time(client: FlaskClient, urls: list[str]) -> list[float]:
    out = []
    for url in urls:
        t0 = time.perf_counter()
        response = client.get(url)
        out.append(time.perf_counter() - t0)
        assert response.status_code == 200, (url, response.status_code)
    return out


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": statistics.median(ordered) * 1e3,
        "p95_ms": ordered[max(0, round(0.95 * len(ordered)) - 1)] * 1e3,
        "max_ms": ordered[-1] * 1e3,
    }


def _bare_app(rows: list[dict[str, Any]]) -> Flask:
    bare = Flask("bare")

    @bare.get("/")
    def table() -> str:
        return render_template_string(BARE_TABLE, rows=rows)

    return bare


def run(cases: int, requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp:
        home = Path(tmp)
        settings = Settings(
            home=home,
            cds_db_url=f"sqlite:///{home / 'cds.db'}",
            cds_public_base_url="http://127.0.0.1:8080",
            results_api_token=RESULTS_TOKEN,
            cds_patient_id_systems={"HOSP": "urn:oid:1.2.3.4.5"},
            review_viewer_url_template="https://pacs.example/viewer?StudyInstanceUIDs={study_uid}",
        )
        MIGRATIONS.upgrade(settings.cds_database_url)
        app = create_app(settings)
        t0 = time.perf_counter()
        with_previews, ids = _fill(app, cases, with_previews=50)
        fill_s = time.perf_counter() - t0
        client = _signed_in(app)
        bench = Bench(app, client, settings, with_previews, ids, requests)

        for url in WORKLIST_QUERIES:  # warm-up: templates compiled, statement caches filled
            client.get(url)
        worklist_urls = [WORKLIST_QUERIES[i % len(WORKLIST_QUERIES)] for i in range(requests)]
        worklist = _time(client, worklist_urls)

        for rid in with_previews:  # warm-up: the page once, and its images into the cache
            html = client.get(f"/review/cases/{rid}").get_data(as_text=True)
            for src in {s for s in html.split('src="')[1:]}:
                url = src.split('"', 1)[0]
                if "/previews/" in url:
                    client.get(url)
        case_urls = [
            f"/review/cases/{with_previews[i % len(with_previews)]}" for i in range(requests)
        ]
        case_pages = _time(client, case_urls)
        image_urls = [
            f"/review/cases/{with_previews[i % len(with_previews)]}/previews/adc_slice_006.png"
            for i in range(requests)
        ]
        images = _time(client, image_urls)

        # the bare page renders the same table: the rows of the default worklist page
        from werkzeug.datastructures import MultiDict

        from cds_service.review.worklist import _row, parse_filters

        with app.test_request_context("/review/"):
            page = app.extensions["her2low_cds"].store.worklist_page(
                parse_filters(MultiDict()).query
            )
            rows = [_row(r) for r in page.rows]
        for r in rows:
            r["state"] = r["state"].display  # type: ignore[attr-defined]
            r["percent"] = r["percent"] or 0.0
        bare_client = _bare_app(rows).test_client()
        bare_client.get("/")
        bare = _time(bare_client, ["/"] * requests)

        out: dict[str, Any] = {
            "cases": cases,
            "fill_seconds": round(fill_s, 1),
            "worklist": _stats(worklist),
            "case_page": _stats(case_pages),
            "preview_image": _stats(images),
            "bare_table": _stats(bare),
        }
        for extra in EXTRA_TIMINGS:
            for name, value in extra(bench).items():
                out[name] = _stats(value) if isinstance(value, list) else value
        out["ratio_worklist_to_bare_p95"] = out["worklist"]["p95_ms"] / out["bare_table"]["p95_ms"]
        out["ratio_case_to_bare_p95"] = out["case_page"]["p95_ms"] / out["bare_table"]["p95_ms"]
        out["goals"] = {
            "worklist_p95<=150ms": out["worklist"]["p95_ms"] <= GOAL_WORKLIST_P95 * 1e3,
            "case_page_p95<=250ms": out["case_page"]["p95_ms"] <= GOAL_CASE_P95 * 1e3,
        }
        app.extensions["her2low_cds"].engine.dispose()
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    out = run(args.cases, args.requests)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['cases']} cases (filled in {out['fill_seconds']} s)")
        for name in ("worklist", "case_page", "preview_image", "bare_table"):
            s = out[name]
            print(
                f"  {name:14} p50 {s['p50_ms']:7.1f} ms  p95 {s['p95_ms']:7.1f} ms"
                f"  max {s['max_ms']:7.1f} ms  (n={s['n']})"
            )
        print(f"  worklist / bare p95: {out['ratio_worklist_to_bare_p95']:.1f}x")
        print(f"  case page / bare p95: {out['ratio_case_to_bare_p95']:.1f}x")
        packet = out["packet_20_cases_s"]
        print(
            f"  packet of {packet['cases']} cases: {packet['median_s']:.2f} s median of 3"
            f" (goal <= {GOAL_PACKET_SECONDS:.0f} s: {'met' if out['packet_goal_met'] else 'NOT met'})"
        )
        for goal, ok in out["goals"].items():
            print(f"  {goal}: {'met' if ok else 'NOT met'}")
    return 0 if all(out["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
