#!/usr/bin/env python3
"""Regenerate the screenshots of docs/review.md: worklist, case page, meeting packet and more.

Runs the CDS service (shipped reference model) on a free port with a throw-away SQLite database
under a temporary folder, publishes synthetic cases through the results API (previews drawn by
the DICOM node's own renderer on a simulated lesion: no patient data), signs in with Playwright
driving Debian's headless Chromium (``/usr/bin/chromium``, never a downloaded browser) and
writes PNGs into ``docs/img/``. The packet's pages are rendered with ``pdftoppm`` (Debian
package ``poppler-utils``).

    .venv/bin/python scripts/review-screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cds_service.app import create_app  # noqa: E402
from cds_service.db import MIGRATIONS  # noqa: E402
from cds_service.store import Her2Pathology, PathologySource  # noqa: E402
from dicom_node.analysis.previews import analysis_previews  # noqa: E402
from her2low.core.settings import Settings  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "screenshot-results-token-0123456789"
PASSWORD = "screenshot-password-1"
ISSUER, SYSTEM = "HOSP", "urn:oid:1.2.3.4.5"
BOARD = date(2026, 12, 8)
PATIENTS = [  # (name, MRN, ADC mean, Kapp mean, side, scanner)
    ("Doe^Jane", "MRN-100231", 0.00092, 0.97, "L", ("SIEMENS", "MAGNETOM Prisma")),
    ("Roe^Mary", "MRN-100244", 0.00121, 0.81, "R", ("SIEMENS", "MAGNETOM Prisma")),
    ("Smith^Anna", "MRN-100257", 0.00078, 1.05, "L", ("GE MEDICAL SYSTEMS", "SIGNA Premier")),
    ("Jones^Lea", "MRN-100262", 0.00135, 0.74, "R", ("GE MEDICAL SYSTEMS", "SIGNA Premier")),
    ("Brown^Eva", "MRN-100270", 0.00101, 0.90, "L", ("Philips", "Ingenia 3.0T")),
]
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def _phantom(adc: float, kapp: float, seed: int) -> dict[str, bytes]:
    """Maps of a simulated breast slab with one lesion, drawn by the node's preview renderer."""
    rng = np.random.default_rng(seed)
    shape = (9, 96, 96)
    z, y, x = np.indices(shape)
    body = ((y - 48) / 44) ** 2 + ((x - 48) / 46) ** 2 < 1
    lesion = ((z - 4) / 3.2) ** 2 + ((y - 44) / 9) ** 2 + ((x - 58) / 11) ** 2 < 1
    noise = rng.normal(0, 1, shape)
    maps = {
        "adc": np.where(lesion, adc, 1.9e-3) + noise * 1.2e-4,
        "dapp": np.where(lesion, adc * 1.25, 2.2e-3) + noise * 1.4e-4,
        "kapp": np.where(lesion, kapp, 0.55) + noise * 0.06,
    }
    maps = {k: np.where(body, np.clip(v, 0, None), 0.0) for k, v in maps.items()}
    underlay = np.where(body, 900 + 150 * noise, 20.0) + np.where(lesion, 300, 0)
    high_b = np.where(body, 120 + 20 * noise, 5.0) + np.where(lesion, 260, 0)
    return analysis_previews(
        maps,
        lesion,
        roi_confirmed=True,
        underlay=underlay,
        high_b=high_b,
        orientation=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
        shown={k: body for k in maps},
        histogram_voxels={k: body for k in maps},
        bin_widths={"adc": 2.5e-5, "dapp": 2.5e-5, "kapp": 0.025},
        bin_min=0.0,
    )


def _payload(
    k: int, name: str, mrn: str, adc: float, kapp: float, side: str, scanner: tuple[str, str]
) -> dict[str, Any]:
    features = {
        "adc_mean": adc,
        "adc_median": adc * 0.98,
        "adc_p5": adc * 0.62,
        "adc_p95": adc * 1.38,
        "adc_skewness": 0.3,
        "adc_kurtosis": 0.5,
        "adc_entropy": 4.1,
        "dapp_mean": adc * 1.25,
        "dapp_median": adc * 1.22,
        "dapp_p5": adc * 0.85,
        "dapp_p95": adc * 1.7,
        "dapp_skewness": 0.2,
        "dapp_kurtosis": 0.4,
        "dapp_entropy": 4.3,
        "kapp_mean": kapp,
        "kapp_median": kapp * 0.99,
        "kapp_p5": kapp * 0.65,
        "kapp_p95": kapp * 1.4,
        "kapp_skewness": 0.1,
        "kapp_kurtosis": 0.2,
        "kapp_entropy": 3.9,
    }
    previews = {
        n.removesuffix(".png"): base64.b64encode(png).decode()
        for n, png in _phantom(adc, kapp, k).items()
    }
    return {
        "api_version": 1,
        "pipeline_version": "dki-2",
        "study_instance_uid": f"1.2.826.0.1.3680043.8.498.7{k}",
        "series_instance_uid": f"1.2.826.0.1.3680043.8.498.7{k}.1",
        "accession_number": f"A2026{k:04d}",
        "patient": {"id": mrn, "issuer": ISSUER, "name": name},
        "acquired_at": (datetime(2026, 11, 20, 9, tzinfo=UTC) + timedelta(days=k)).isoformat(),
        "laterality": side,
        "features": features,
        "provenance": {
            "b_values": [0, 50, 800, 1000, 1500, 2000],
            "fit": {  # the node's default (dki-2), which the reference model assumes
                "method": "nls_rician",
                "dki_bmin": 0,
                "bounds": {"dapp": [0, 0.0035], "kapp": [0, 3]},
                "denoise": "mppca",
            },
            "adc_b_values": [0, 800],
            "discretisation": {
                "bin_width": {"adc": 2.5e-05, "dapp": 2.5e-05, "kapp": 0.025},
                "bin_min": 0,
            },
            "statistics": {"kurtosis": "excess", "percentile_rule": "linear", "entropy_base": 2},
            "roi": {"source": "seg", "confirmed": True, "voxels": 812, "volume_ml": 2.4},
            "qc": {"flags": {"at_bound": 4, "low_signal": 0}, "problems": []},
            "scanner": {"manufacturer": scanner[0], "model": scanner[1]},
        },
        "previews": previews,
    }


def _signed_in(url: str, username: str) -> requests.Session:
    http = requests.Session()
    page = http.get(url + "/review/sign-in", timeout=10)
    token = _CSRF.search(page.text)
    assert token, "no CSRF token on the sign-in page"
    answer = http.post(
        url + "/review/sign-in",
        data={"username": username, "password": PASSWORD, "csrf_token": token.group(1)},
        timeout=10,
        allow_redirects=False,
    )
    answer.raise_for_status()
    return http


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not Path(CHROMIUM).exists() or shutil.which("pdftoppm") is None:
        print("needs /usr/bin/chromium and pdftoppm (apt-get install chromium poppler-utils)")
        return 2
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        server = make_server("127.0.0.1", 0, None, threaded=True)  # type: ignore[arg-type]
        url = f"http://127.0.0.1:{server.server_port}"
        settings = Settings(
            home=Path(tmp),
            cds_db_url=f"sqlite:///{tmp}/cds.db",
            cds_public_base_url=url,
            results_api_token=TOKEN,
            cds_patient_id_systems={ISSUER: SYSTEM},
        )
        MIGRATIONS.upgrade(settings.cds_database_url)
        app = create_app(settings)
        server.app = app  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            accounts = app.extensions["her2low_review"].accounts
            accounts.add_user("dr-lind", "radiologist", PASSWORD, "Dr. A. Lind")
            accounts.add_user("coord-berg", "board-coordinator", PASSWORD, "M. Berg")
            st = app.extensions["her2low_cds"]
            ids = []
            for k, (name, mrn, adc, kapp, side, scanner) in enumerate(PATIENTS):
                answer = requests.post(
                    url + "/api/v1/results",
                    json=_payload(k, name, mrn, adc, kapp, side, scanner),
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=60,
                )
                answer.raise_for_status()
                ids.append(answer.json()["result_id"])
            descriptors = {
                "lesion_type": "mass",
                "mass_shape": "irregular",
                "mass_margin": "spiculated",
                "mass_internal_enhancement": "heterogeneous",
                "t2_hyperintensity": "no",
                "peritumoral_edema": "yes",
            }
            for rid in ids[:3]:
                st.store.add_descriptors(rid, descriptors, True, "dr-lind")
                st.predictions.recompute(rid)
            for rid in ids[:4]:
                st.store.set_board_date(rid, BOARD, "coord-berg")
            for rid, her2, score in (
                (ids[0], Her2Pathology.LOW, "1+"),
                (ids[1], Her2Pathology.ZERO, "0"),
                (ids[3], Her2Pathology.POSITIVE, "3+"),
            ):
                st.store.add_pathology(
                    rid,
                    her2,
                    score=score,
                    source=PathologySource.PATHOLOGIST,
                    source_key=f"screenshot-{rid}",
                    entered_by="dr-path",
                    reported_at=datetime(2026, 11, 30, tzinfo=UTC),
                )

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url + "/review/sign-in")
                page.fill("input[name=username]", "dr-lind")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_load_state("networkidle")
                shots = {
                    "review-worklist.png": "/review/",
                    "review-case.png": f"/review/cases/{ids[0]}",
                    "review-concordance.png": "/review/concordance",
                    "review-model-card.png": "/review/models/her2low-reference/0.1.0",
                }
                for filename, path in shots.items():
                    page.goto(url + path)
                    page.wait_for_load_state("networkidle")
                    page.screenshot(
                        path=str(out / filename), full_page=filename != "review-model-card.png"
                    )
                    print("wrote", out / filename)
                browser.close()

            http = _signed_in(url, "coord-berg")
            form = http.get(url + f"/review/packet?board_date={BOARD}", timeout=10).text
            token = _CSRF.search(form)
            assert token
            pdf = http.post(
                url + "/review/packet",
                data={"board_date": str(BOARD), "case": ids[:4], "csrf_token": token.group(1)},
                timeout=60,
            )
            pdf.raise_for_status()
            pdf_path = Path(tmp) / "packet.pdf"
            pdf_path.write_bytes(pdf.content)
            subprocess.run(
                [
                    "pdftoppm",
                    "-png",
                    "-r",
                    "70",
                    "-f",
                    "1",
                    "-l",
                    "2",
                    str(pdf_path),
                    str(Path(tmp) / "packet"),
                ],
                check=True,
            )
            for k, produced in enumerate(sorted(Path(tmp).glob("packet-*.png")), 1):
                target = out / f"review-packet-{k}.png"
                shutil.copyfile(produced, target)
                print("wrote", target)
        finally:
            server.shutdown()
            server.server_close()
            st_engine = app.extensions["her2low_cds"].engine
            st_engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
