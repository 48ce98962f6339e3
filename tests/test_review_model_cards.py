"""Model cards as HTML (issue 13): every deployed version, plots served by name only, no raw
HTML from a card reaches the page."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cds_support import ReviewClient, Service, start_service, stop_service

from models.registry import reference_root

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path)
    yield svc
    stop_service(svc)


@pytest.fixture
def two_versions(tmp_path: Path) -> Iterator[Service]:
    """A registry with the reference 0.1.0 and a 0.2.0 whose card carries raw HTML."""
    root = tmp_path / "registry"
    shutil.copytree(reference_root(), root)
    src = root / "her2low-reference" / "0.1.0"
    dst = root / "her2low-reference" / "0.2.0"
    shutil.copytree(src, dst)
    for card_path in dst.glob("*/card.json"):
        card = json.loads(card_path.read_text())
        card["version"] = "0.2.0"
        card["intended_use"] = "Evil <script>alert(1)</script> <img src=x onerror=alert(2)>"
        card_path.write_text(json.dumps(card))
    svc = start_service(tmp_path, model_dir=root)
    yield svc
    stop_service(svc)


def test_versions_listed_and_card_rendered_as_html(service: Service) -> None:
    client = ReviewClient(service, "oncologist")
    index = client.get(service.url + "/review/models")
    assert index.status_code == 200
    assert "/review/models/her2low-reference/0.1.0" in index.text
    page = client.get(service.url + "/review/models/her2low-reference/0.1.0")
    assert page.status_code == 200
    html = page.text
    assert "<pre" not in html
    assert "<h1>Model card: her2low-reference 0.1.0 (combined)</h1>" in html
    assert "<table>" in html and "<th>AUC</th>" in html
    for variant in ("combined", "descriptors", "quantitative"):
        assert f'id="{variant}"' in html
    src = "/review/models/her2low-reference/0.1.0/combined/calibration.png"
    assert f'src="{src}"' in html
    plot = client.get(service.url + src)
    assert plot.status_code == 200
    assert plot.headers["Content-Type"] == "image/png"
    assert plot.content.startswith(PNG_MAGIC)
    # the old Markdown-in-<pre> URL now leads here
    old = client.get(service.url + "/review/model-card", allow_redirects=False)
    assert old.status_code == 303 and old.headers["Location"].endswith("/review/models")


@pytest.mark.parametrize(
    "path",
    [
        "/combined/card.json",
        "/combined/model.onnx",
        "/combined/..%2Fcombined%2Fcard.json",
        "/../0.1.0/combined/card.json",
        "/nope/calibration.png",
        "/combined/%2Fetc%2Fpasswd",
    ],
)
def test_plots_only_by_name(service: Service, path: str) -> None:
    client = ReviewClient(service, "pathologist")
    answer = client.get(service.url + "/review/models/her2low-reference/0.1.0" + path)
    assert answer.status_code == 404
    assert b"intended_use" not in answer.content and b"root:" not in answer.content


def test_unknown_version_and_anonymous(service: Service) -> None:
    client = ReviewClient(service, "board-coordinator")
    assert client.get(service.url + "/review/models/her2low-reference/9.9.9").status_code == 404
    assert client.get(service.url + "/review/models/..%2F..%2Fetc/0.1.0").status_code == 404
    import requests

    anon = requests.get(
        service.url + "/review/models/her2low-reference/0.1.0/combined/calibration.png",
        allow_redirects=False,
        timeout=10,
    )
    assert anon.status_code in (302, 303)
    assert "/review/sign-in" in anon.headers["Location"]


def test_every_version_and_raw_html_escaped(two_versions: Service) -> None:
    client = ReviewClient(two_versions, "radiologist")
    index = client.get(two_versions.url + "/review/models").text
    assert index.index("/review/models/her2low-reference/0.2.0") < index.index(
        "/review/models/her2low-reference/0.1.0"
    )  # newest first
    page = client.get(two_versions.url + "/review/models/her2low-reference/0.2.0").text
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    old = client.get(two_versions.url + "/review/models/her2low-reference/0.1.0").text
    assert "Evil" not in old
