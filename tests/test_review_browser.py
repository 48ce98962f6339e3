"""The review app in a real browser: Playwright driving Debian's headless Chromium.

The service runs under a real werkzeug server on a free port (``test_cds_support``); the
browser signs in, fails a wrong password, opens the case from the worklist, enters descriptors,
and is refused a POST without the CSRF token. Every request the page makes is recorded: nothing
may load from outside the service, and the CSP must not have to block anything. Never
``playwright install``: the browser is ``/usr/bin/chromium`` (scripts/system-deps.sh).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cds_support import (
    REVIEW_PASSWORD,
    Service,
    add_review_user,
    result_payload,
    start_service,
    stop_service,
)

from tests.conftest import require_tool

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path)
    yield svc
    stop_service(svc)


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = require_tool("chromium")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Recorder:
    """Every URL a page requested and every console message (CSP reports land there)."""

    def __init__(self, page: Any) -> None:
        self.urls: list[str] = []
        self.console: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("console", lambda message: self.console.append(message.text))

    def outside(self, base: str) -> list[str]:
        return [u for u in self.urls if not (u.startswith(base + "/") or u.startswith("data:"))]


def sign_in(page: Any, username: str, password: str) -> None:
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def test_sign_in_open_case_enter_descriptors_csrf(service: Service, browser: Any) -> None:
    rid = service.publish(result_payload(patient_id="MRN-4711", previews=True)).json()["result_id"]
    add_review_user(service.app, "dr-rad", "radiologist")
    add_review_user(service.app, "dr-path", "pathologist")
    context = browser.new_context()
    page = context.new_page()
    seen = Recorder(page)

    page.goto(service.url + "/review/")
    assert "/review/sign-in" in page.url  # anonymous: sent to the sign-in form
    sign_in(page, "dr-rad", "a wrong password!!")
    assert page.locator("[role=alert]").inner_text().startswith("Wrong user name or password")
    assert "/review/sign-in" in page.url
    sign_in(page, "dr-rad", REVIEW_PASSWORD)
    assert page.url.rstrip("/").endswith("/review")
    assert "Signed in as" in page.inner_text("header")

    page.click(f"a[href='/review/cases/{rid}']")
    assert page.url.endswith(f"/review/cases/{rid}")
    assert "likelihood of HER2-low" in page.inner_text("main")
    assert page.locator("img[alt=dwi_b800]").count() == 1

    # descriptors: the lesion type first (radio group); the local script then shows only the
    # descriptors of a mass; choose the controlled values with the labelled selects, save
    before = page.inner_text("#likelihood .big")
    page.check("#d-lesion-mass")
    assert page.locator("select[name=nme_distribution]").is_hidden()
    assert page.locator("select[name=mass_shape]").is_visible()
    for name, value in {
        "mass_shape": "irregular",
        "mass_margin": "spiculated",
        "mass_internal_enhancement": "heterogeneous",
        "t2_hyperintensity": "no",
        "peritumoral_edema": "yes",
    }.items():
        page.select_option(f"select[name={name}]", value)
    page.click("form.descriptors button[type=submit]")
    assert "Descriptors saved" in page.inner_text("#descriptors")
    assert "entered by dr-rad" in page.inner_text("#descriptors")
    assert "combined" in page.inner_text("main")
    change = page.inner_text("#likelihood [role=status]")  # the likelihood change, old → new
    assert change.startswith(f"Estimate recomputed: {before} →"), (change, before)
    assert page.inner_text("#likelihood .big") in change

    # confirming the ROI is its own act (its own form and button)
    page.check("#roi-confirmed")
    page.click("#roi button[type=submit]")
    assert "The ROI was confirmed" in page.inner_text("#roi")

    # a POST without the CSRF token, from this signed-in browser, is refused
    forged = context.request.post(
        f"{service.url}/review/cases/{rid}/decision",
        form={"decision": "entered-in-error", "reason": "wrong-lesion"},
    )
    assert forged.status == 400
    assert service.app.extensions["her2low_cds"].store.case(rid).result.observation_override is None

    # override with a coded reason and a comment (radiologists may record board decisions)
    page.check("#decision-amend")
    page.select_option("#decision-reason", "descriptors-corrected")
    page.fill("#decision-comment", "margin re-read at the board")
    page.click("#decision button[type=submit]")
    assert "Observation status amended" in page.inner_text("#decision")

    # sign out: the case page asks for a sign-in again
    page.click("header button[type=submit]")
    assert "/review/sign-in" in page.url
    page.goto(f"{service.url}/review/cases/{rid}")
    assert "/review/sign-in" in page.url

    # a pathologist reads the case but gets no decision form
    sign_in(page, "dr-path", REVIEW_PASSWORD)
    assert page.url.endswith(f"/review/cases/{rid}")
    assert page.locator("input[name=decision]").count() == 0
    assert "recorded by an oncologist or a radiologist" in page.inner_text("#decision")

    assert seen.outside(service.url) == [], seen.outside(service.url)
    assert not [m for m in seen.console if "Content Security Policy" in m], seen.console
    context.close()


def test_anonymous_post_and_foreign_origin_refused(service: Service, browser: Any) -> None:
    rid = service.publish(result_payload()).json()["result_id"]
    context = browser.new_context()
    anonymous = context.request.post(
        f"{service.url}/review/cases/{rid}/decision",
        form={"decision": "entered-in-error", "reason": "wrong-lesion"},
    )
    assert anonymous.status == 400
    page = context.new_page()
    page.goto(service.url + "/review/sign-in")
    headers = page.evaluate(
        "async () => { const r = await fetch(location.href); return [r.status, "
        "r.headers.get('content-security-policy'), r.headers.get('x-frame-options')]; }"
    )
    assert headers[0] == 200 and "frame-ancestors 'none'" in headers[1] and headers[2] == "DENY"
    context.close()
