"""The review case page (issue 13 "Pages"): reading order, discordance banner, images served
from their own URL, descriptors limited to the lesion type, the likelihood change on saving,
ROI confirmation as its own audited act, and the board decision with a coded reason.

Flask's test client, signed in, against a fresh migrated database per test.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from PIL import Image
from test_cds_support import MASS_DESCRIPTORS
from test_review_worklist import HREF, make_app, post, publish, signed_in, store_of

from cds_service.accounts import Role
from dicom_node.analysis.previews import analysis_previews, orientation_labels


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    flask_app = make_app(
        tmp_path,
        review_viewer_url_template="https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}",
    )
    yield flask_app
    flask_app.extensions["her2low_cds"].engine.dispose()


def _order(html: str, *markers: str) -> list[int]:
    positions = [html.find(m) for m in markers]
    assert all(p >= 0 for p in positions), list(zip(markers, positions, strict=True))
    return positions


def test_reading_order_likelihood_before_evidence(app: Flask) -> None:
    rid = publish(app, previews=True)
    page = signed_in(app, Role.ONCOLOGIST).get(f"/review/cases/{rid}").text
    positions = _order(
        page,
        "DOE, JANE",
        'id="likelihood"',
        "likelihood of HER2-low",
        "Operating threshold",
        "Reference model, not clinically validated</strong>: trained",
        'id="evidence"',
        'id="histograms"',
        'id="features"',
        'id="contributions"',
        'id="qc"',
        'id="decision"',
    )
    assert positions == sorted(positions)
    assert "MRN-1 (HOSP)" in page and "Accession A123" in page
    assert "Inputs used:" in page and "model card" in page
    assert (
        'href="https://pacs.example/ohif/viewer?StudyInstanceUIDs=1.2.826.0.1.3680043.8.498.1"'
        in page
    )
    assert "Pathology HER2: not known" in page
    # QC flags in words, not only codes
    assert "at_bound: 3" in page and "stopped at a bound" in page
    # contributions as a chart (SVG, no inline style: the CSP forbids it)
    assert "<svg" in page and "log-odds" in page and "style=" not in page


def test_discordance_banner_only_when_it_applies(app: Flask) -> None:
    rid = publish(app)
    board = signed_in(app, Role.ONCOLOGIST)
    assert "Discordance:" not in board.get(f"/review/cases/{rid}").text
    store_of(app).record_call(None, [("ehr-user", "discordance-detected", rid, None)])
    page = board.get(f"/review/cases/{rid}").text
    banner, evidence = _order(page, "Discordance: the biopsy HER2 result is 0", 'id="evidence"')
    assert banner < evidence


def test_previews_served_from_their_own_url(app: Flask) -> None:
    rid = publish(app, previews=True)
    board = signed_in(app, Role.ONCOLOGIST)
    page = board.get(f"/review/cases/{rid}").text
    src = f"/review/cases/{rid}/previews/dwi_b800.png"
    assert f'src="{src}"' in page and "data:image" not in page
    image = board.get(src)
    assert image.status_code == 200 and image.mimetype == "image/png"
    assert image.data.startswith(b"\x89PNG")
    assert board.get(f"/review/cases/{rid}/previews/nope.png").status_code == 404
    anonymous = app.test_client().get(src)
    assert anonymous.status_code == 303  # images are patient data too


def test_slice_navigation_through_the_roi(app: Flask) -> None:
    shape = (6, 32, 32)
    roi = np.zeros(shape, dtype=bool)
    roi[2:5, 12:20, 12:20] = True
    maps = {name: np.full(shape, 1.0e-3) for name in ("adc", "dapp", "kapp")}
    fitted = np.ones(shape, dtype=bool)
    pngs = analysis_previews(
        maps,
        roi,
        roi_confirmed=False,
        underlay=np.full(shape, 100.0),
        high_b=np.full(shape, 40.0),
        shown=dict.fromkeys(maps, fitted),
        histogram_voxels=dict.fromkeys(maps, fitted),
        bin_widths={"adc": 2.5e-5, "dapp": 2.5e-5, "kapp": 0.025},
        bin_min=0.0,
        orientation=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    )
    for k in (2, 3, 4):
        for m in ("dwi", "adc", "dapp", "kapp"):
            assert f"{m}_slice_{k:03d}.png" in pngs
    assert "adc_slice_001.png" not in pngs  # only slices the ROI crosses
    assert Image.open(io.BytesIO(pngs["adc_slice_003.png"])).size[0] >= 600  # readable size
    previews = {
        name.removesuffix(".png"): base64.b64encode(png).decode() for name, png in pngs.items()
    }
    from test_cds_support import RESULTS_TOKEN, result_payload

    body = result_payload()
    body["previews"] = previews
    response = app.test_client().post(
        "/api/v1/results", json=body, headers={"Authorization": f"Bearer {RESULTS_TOKEN}"}
    )
    assert response.status_code == 201, response.text[:300]
    rid = response.json["result_id"]  # type: ignore[index]
    board = signed_in(app, Role.ONCOLOGIST)
    page = board.get(f"/review/cases/{rid}").text
    assert "ROI slices:" in page and 'aria-current="true">4<' in page  # middle ROI slice
    assert f"/review/cases/{rid}/previews/dapp_slice_003.png" in page
    first = board.get(f"/review/cases/{rid}?slice=2").text
    assert f"/review/cases/{rid}/previews/kapp_slice_002.png" in first
    assert 'rel="next"' in first and 'rel="prev"' not in first
    assert board.get(f"/review/cases/{rid}?slice=zz").status_code == 200


def test_orientation_labels() -> None:
    # axial, rows = patient's anterior→posterior, columns = right→left (LPS +x is left)
    assert orientation_labels((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)) == {
        "left": "R",
        "right": "L",
        "top": "A",
        "bottom": "P",
    }
    sagittal = orientation_labels((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
    assert sagittal == {"left": "A", "right": "P", "top": "H", "bottom": "F"}


def test_descriptors_restricted_to_the_lesion_type(app: Flask) -> None:
    rid = publish(app)
    radiologist = signed_in(app, Role.RADIOLOGIST)
    fresh = radiologist.get(f"/review/cases/{rid}").text
    # no lesion type yet: every field shown, each saying what it applies to
    assert 'name="mass_shape"' in fresh and 'name="nme_distribution"' in fresh
    assert "hidden disabled" not in fresh
    assert 'type="radio" id="d-lesion-mass" name="lesion_type"' in fresh
    assert '<label class="inline" for="d-lesion-mass">Mass</label>' in fresh
    assert '<label for="d-mass_shape">' in fresh and 'id="d-mass_shape"' in fresh
    assert "descriptors.js" in fresh
    assert (
        post(radiologist, f"/review/cases/{rid}/descriptors", MASS_DESCRIPTORS).status_code == 303
    )
    mass = radiologist.get(f"/review/cases/{rid}").text
    nme_block = mass[mass.find('<fieldset data-applies="nme"') :][:200]
    assert "hidden disabled" in nme_block
    mass_block = mass[mass.find('<fieldset data-applies="mass"') :][:200]
    assert "hidden" not in mass_block.split(">")[0]
    static = radiologist.get("/review/static/descriptors.js")
    assert static.status_code == 200 and b"lesion_type" in static.data


def test_saving_shows_the_likelihood_change(app: Flask) -> None:
    rid = publish(app)
    radiologist = signed_in(app, Role.RADIOLOGIST)
    before = store_of(app).case(rid).prediction.probability
    saved = post(radiologist, f"/review/cases/{rid}/descriptors", MASS_DESCRIPTORS)
    assert saved.status_code == 303 and saved.headers["Location"].endswith("#likelihood")
    page = radiologist.get(saved.headers["Location"]).text
    after = store_of(app).case(rid).prediction.probability
    assert before != after
    assert (
        f"Estimate recomputed: {before * 100:.0f} % → <strong>{after * 100:.0f} %</strong>" in page
    )
    again = radiologist.get(f"/review/cases/{rid}").text
    assert "Estimate recomputed" not in again  # shown once
    bad = post(radiologist, f"/review/cases/{rid}/descriptors", {"lesion_type": "mass"})
    assert bad.status_code == 422 and "Not entered: Mass shape" in bad.text


def test_roi_confirmation_is_its_own_audited_act(app: Flask) -> None:
    rid = publish(app)
    radiologist = signed_in(app, Role.RADIOLOGIST, "dr-rad")
    store = store_of(app)
    post(radiologist, f"/review/cases/{rid}/descriptors", MASS_DESCRIPTORS)
    actions = [a.action for a in store.audit_for(rid)]
    assert "descriptors-entered" in actions and "roi-confirmed" not in actions
    assert store.case(rid).prediction.observation_status == "preliminary"
    page = radiologist.get(f"/review/cases/{rid}").text
    assert f'action="/review/cases/{rid}/roi"' in page and "Confirm ROI" in page
    unticked = post(radiologist, f"/review/cases/{rid}/roi", {})
    assert unticked.status_code == 422 and "to confirm" in unticked.text
    assert (
        post(radiologist, f"/review/cases/{rid}/roi", {"roi_confirmed": "yes"}).status_code == 303
    )
    trail = [(a.actor, a.action) for a in store.audit_for(rid)]
    assert ("dr-rad", "roi-confirmed") in trail
    case = store.case(rid)
    assert case.descriptors.roi_confirmed and case.descriptors.values == MASS_DESCRIPTORS
    assert case.prediction.observation_status == "final"
    # saving descriptors again keeps the confirmation; an oncologist cannot confirm
    post(
        radiologist, f"/review/cases/{rid}/descriptors", {**MASS_DESCRIPTORS, "mass_shape": "oval"}
    )
    assert store.case(rid).descriptors.roi_confirmed
    oncologist = signed_in(app, Role.ONCOLOGIST)
    assert post(oncologist, f"/review/cases/{rid}/roi", {"roi_confirmed": "yes"}).status_code == 403


def test_decision_with_coded_reason(app: Flask) -> None:
    rid = publish(app)
    oncologist = signed_in(app, Role.ONCOLOGIST, "dr-onc")
    page = oncologist.get(f"/review/cases/{rid}").text
    for value in ("confirm", "amend", "entered-in-error"):
        assert f'type="radio" id="decision-{value}" name="decision" value="{value}"' in page
    assert '<label for="decision-reason">Reason</label>' in page
    missing = post(oncologist, f"/review/cases/{rid}/decision", {"decision": "amend"})
    assert missing.status_code == 422 and "Reason: choose a coded reason" in missing.text
    unknown = post(
        oncologist, f"/review/cases/{rid}/decision", {"decision": "amend", "reason": "because"}
    )
    assert unknown.status_code == 422 and "Reason: choose a coded reason" in unknown.text
    form = {"decision": "amend", "reason": "descriptors-corrected", "comment": "shape is oval"}
    assert post(oncologist, f"/review/cases/{rid}/decision", form).status_code == 303
    store = store_of(app)
    case = store.case(rid)
    assert case.result.observation_override == "amended" and case.result.board_decision == "amend"
    assert case.prediction.observation_status == "amended"
    event = next(a for a in store.audit_for(rid) if a.action == "board-amend")
    assert event.actor == "dr-onc"
    assert event.detail == {"reason": "descriptors-corrected", "comment": "shape is oval"}
    withdraw = {"decision": "entered-in-error", "reason": "wrong-lesion"}
    assert post(oncologist, f"/review/cases/{rid}/decision", withdraw).status_code == 303
    assert store.case(rid).result.state == "closed"


def test_pathology_result_and_reference_ranges_shown(app: Flask) -> None:
    from cds_service.store import Her2Pathology, PathologySource

    rid = publish(app)
    store = store_of(app)
    store.add_pathology(
        rid,
        Her2Pathology.LOW,
        score="1+",
        source=PathologySource.PATHOLOGIST,
        source_key="p-1",
        entered_by="dr-path",
        reported_at=store.case(rid).result.acquired_at,
    )
    pathologist = signed_in(app, Role.PATHOLOGIST)
    page = pathologist.get(f"/review/cases/{rid}").text
    assert "Pathology HER2: <strong>HER2-low (1+, or 2+ ISH not amplified)</strong>" in page
    assert f'href="/review/cases/{rid}/pathology"' in page


def test_case_page_urls_hold_no_phi(app: Flask) -> None:
    rid = publish(app, mrn="MRN-XYZ-1", name="HIDDEN^NAME", previews=True)
    page = signed_in(app, Role.RADIOLOGIST).get(f"/review/cases/{rid}").text
    assert "MRN-XYZ-1" in page
    for url in HREF.findall(page):
        assert "MRN-XYZ" not in url and "HIDDEN" not in url, url


def test_roi_confirmed_before_descriptors_stays_preliminary(app: Flask) -> None:
    rid = publish(app)
    radiologist = signed_in(app, Role.RADIOLOGIST)
    assert (
        post(radiologist, f"/review/cases/{rid}/roi", {"roi_confirmed": "yes"}).status_code == 303
    )
    case = store_of(app).case(rid)
    assert case.descriptors.roi_confirmed and case.descriptors.values == {}
    assert case.prediction.observation_status == "preliminary"
    assert case.prediction.basis["descriptors_entered"] is False
    assert case.result.state == "descriptors-needed"
    post(radiologist, f"/review/cases/{rid}/descriptors", MASS_DESCRIPTORS)
    case = store_of(app).case(rid)
    assert case.descriptors.roi_confirmed and case.prediction.observation_status == "final"
    assert case.result.state == "ready-for-board"
