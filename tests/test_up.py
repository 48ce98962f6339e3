"""``her2low up`` as a new user runs it: everything starts and the demo study yields a card."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_up_loads_the_demo_and_demo_json_gives_integrators_what_they_need(tmp_path: Path) -> None:
    cds_port = free_port()
    env = {
        **os.environ,
        "HER2LOW_HOME": str(tmp_path / "var"),
        "HER2LOW_NODE_PORT": str(free_port()),
        "HER2LOW_NODE_QUIET_SECONDS": "2",
        "HER2LOW_CDS_PORT": str(cds_port),
        "HER2LOW_CDS_PUBLIC_BASE_URL": f"http://127.0.0.1:{cds_port}",
        "HER2LOW_NODE_RESULTS_URL": f"http://127.0.0.1:{cds_port}",
    }
    env.pop("HER2LOW_CDS_TRUSTED_ISSUERS", None)
    out = open(tmp_path / "up.out", "wb")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "-m", "her2low", "up"], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline and "press Ctrl-C" not in text:
            assert up.poll() is None, (tmp_path / "up.out").read_text()
            time.sleep(0.5)
            text = (tmp_path / "up.out").read_text()
        assert "press Ctrl-C" in text, text
        assert "NOT clinically validated" in text
        assert f"http://127.0.0.1:{cds_port}/cds-services" in text
        assert "card [info]" in text or "card [warning]" in text, text  # the demo produced a card

        demo = subprocess.run(
            [sys.executable, "-m", "her2low", "demo", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stderr
        info = json.loads(demo.stdout)
        for key in ("cds_base_url", "service_id", "patient_id", "prefetch", "review_url", "card"):
            assert info[key], key
        assert info["prefetch"]["patient"]["id"] == info["patient_id"]
        assert (
            info["card"]["suggestions"][0]["actions"][0]["resource"]["resourceType"]
            == "Observation"
        )
        page = requests.get(info["review_url"], timeout=10)
        assert page.status_code == 200 and "not clinically validated" in page.text.lower()
        # discovery is protected like every CDS call: no token, no service list
        assert requests.get(info["cds_base_url"], timeout=10).status_code == 401
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
    for name in ("node", "worker", "service"):
        assert (tmp_path / "var" / "logs" / f"{name}.log").exists()
