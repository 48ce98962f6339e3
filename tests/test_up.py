"""``her2low up`` as a new user runs it: everything starts, the demo study yields a card, and a
stop (Ctrl-C or SIGTERM) takes node, worker and service down with it and exits 0.

Every ``up`` runs in its own process group, killed whole in a ``finally`` even when the test
fails, so no node, worker or service outlives the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.conftest import free_port
from tests.system import group_alive, popen_group, stop_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    cds_port = free_port()
    env = {
        **os.environ,
        "HER2LOW_HOME": str(tmp_path / "var"),
        "HER2LOW_NODE_PORT": str(free_port()),
        "HER2LOW_NODE_METRICS_PORT": str(free_port()),  # side ports: never the fixed defaults
        "HER2LOW_WORKER_METRICS_PORT": "0",
        "HER2LOW_NODE_QUIET_SECONDS": "2",
        "HER2LOW_CDS_PORT": str(cds_port),
        "HER2LOW_CDS_PUBLIC_BASE_URL": f"http://127.0.0.1:{cds_port}",
        "HER2LOW_NODE_RESULTS_URL": f"http://127.0.0.1:{cds_port}",
    }
    env.pop("HER2LOW_CDS_TRUSTED_ISSUERS", None)
    env.update(extra)
    return env


@contextmanager
def running_up(
    tmp_path: Path, env: dict[str, str], *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``her2low up`` in its own process group; whatever is left of the group is killed after."""
    with open(tmp_path / "up.out", "wb") as out:
        up = popen_group(
            [sys.executable, "-m", "her2low", "up", *args], env=env, stdout=out, stderr=out
        )
    try:
        yield up
    finally:
        stop_group(up, sig=signal.SIGTERM, timeout=40)


def _output(tmp_path: Path) -> str:
    return (tmp_path / "up.out").read_text(errors="replace")


def _wait_for(tmp_path: Path, up: subprocess.Popen[bytes], text: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = _output(tmp_path)
        if text in output:
            return output
        assert up.poll() is None, output
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not printed in {timeout:.0f} s:\n{_output(tmp_path)}")


def _stopped_cleanly(up: subprocess.Popen[bytes], sig: int, tmp_path: Path) -> None:
    """``sig`` to ``up`` alone: it exits 0 and none of its children is left."""
    up.send_signal(sig)
    assert up.wait(timeout=60) == 0, _output(tmp_path)
    deadline = time.monotonic() + 10
    while group_alive(up.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(up.pid), "node, worker or service outlived `her2low up`"


def test_up_loads_the_demo_and_demo_json_gives_integrators_what_they_need(tmp_path: Path) -> None:
    env = _env(tmp_path)
    cds_port = env["HER2LOW_CDS_PORT"]
    with running_up(tmp_path, env) as up:
        # a second demo while up's own is still loading: each run writes in its own folder
        _wait_for(tmp_path, up, "loading the synthetic demo study")
        demo = subprocess.Popen(
            [sys.executable, "-m", "her2low", "demo", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            stdout, stderr = demo.communicate(timeout=240)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
        assert demo.returncode == 0, stderr
        assert "FileExistsError" not in stderr and "sending" in stderr  # progress on stderr
        info = json.loads(stdout)  # stdout: the one JSON object
        for key in ("cds_base_url", "service_id", "patient_id", "prefetch", "review_url", "card"):
            assert info[key], key
        assert info["prefetch"]["patient"]["id"] == info["patient_id"]
        assert (
            info["card"]["suggestions"][0]["actions"][0]["resource"]["resourceType"]
            == "Observation"
        )

        text = _wait_for(tmp_path, up, "press Ctrl-C")
        assert "NOT clinically validated" in text
        assert f"http://127.0.0.1:{cds_port}/cds-services" in text
        assert f"HER2LOW@{socket.gethostname()}:{env['HER2LOW_NODE_PORT']}" in text
        assert "card [info]" in text or "card [warning]" in text, text  # the demo produced a card

        page = requests.get(info["review_url"], timeout=10)
        assert page.status_code == 200  # the case page, or its sign-in page
        assert "not clinically validated" in page.text.lower() or "sign in" in page.text.lower()
        _review_as_demo_user(info, text)
        # discovery is protected like every CDS call: no token, no service list
        assert requests.get(info["cds_base_url"], timeout=10).status_code == 401

        # `her2low demo token` is what docs/cds-hooks.md's curl line uses
        token = subprocess.run(
            [sys.executable, "-m", "her2low", "demo", "token"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert token.returncode == 0, token.stderr
        hook = f"{info['cds_base_url']}/{info['service_id']}"
        answer = requests.post(
            hook,
            json={
                "hookInstance": "d1b5c1c4-3f7c-4b89-9a61-0c3c2e6f7a01",
                "hook": "patient-view",
                "context": {"userId": "Practitioner/1", "patientId": info["patient_id"]},
                "prefetch": info["prefetch"],
            },
            headers={"Authorization": f"Bearer {token.stdout.strip()}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["cards"]

        _stopped_cleanly(up, signal.SIGINT, tmp_path)  # Ctrl-C: exit 0, nothing left
    for name in ("node", "worker", "service"):
        assert (tmp_path / "var" / "logs" / f"{name}.log").exists()


def test_sigterm_stops_everything_and_the_demo_is_trusted_beside_configured_issuers(
    tmp_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="site-1", alg="ES384", use="sig")
    jwks = tmp_path / "site-jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    env = _env(
        tmp_path,
        HER2LOW_CDS_TRUSTED_ISSUERS=json.dumps({"https://ehr.site.test": str(jwks)}),
    )
    with running_up(tmp_path, env) as up:
        text = _wait_for(tmp_path, up, "press Ctrl-C")
        assert "WARNING" in text and "urn:her2low:demo-ehr" in text, text
        assert "card [info]" in text or "card [warning]" in text, text
        # The demo's own error line, not a bare "401": those digits also turn up inside the
        # random case UUIDs and log timestamps printed above.
        assert "Traceback" not in text and "her2low demo: error" not in text, text
        _stopped_cleanly(up, signal.SIGTERM, tmp_path)
        ports = [int(env["HER2LOW_NODE_PORT"]), int(env["HER2LOW_CDS_PORT"])]
        for port in ports:
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_second_up_names_the_port_and_its_setting(tmp_path: Path) -> None:
    env = _env(tmp_path)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", int(env["HER2LOW_NODE_PORT"])))
        taken.listen()
        with running_up(tmp_path, env, "--no-demo") as up:
            assert up.wait(timeout=120) == 1
        text = _output(tmp_path)
    assert f"port {env['HER2LOW_NODE_PORT']} (HER2LOW_NODE_PORT) is already in use" in text, text
    assert "her2low is up" not in text and "Traceback" not in text


def _review_as_demo_user(info: dict[str, Any], up_output: str) -> None:
    """The case page needs a sign-in; `up` made (and printed) one demo account per role."""
    assert "DEMO review-app accounts" in up_output
    roles = {"radiologist", "oncologist", "pathologist", "board-coordinator", "admin"}
    assert set(info["demo_users"]) == roles
    anonymous = requests.get(info["review_url"], timeout=10, allow_redirects=False)
    assert anonymous.status_code == 303 and "/review/sign-in" in anonymous.headers["Location"]
    browser = requests.Session()
    sign_in_url = urljoin(info["review_url"], anonymous.headers["Location"])
    token = re.search(
        r'name="csrf_token" value="([^"]+)"', browser.get(sign_in_url, timeout=10).text
    )
    assert token
    page = browser.post(
        urljoin(info["review_url"], "/review/sign-in"),
        data={
            **info["demo_users"]["oncologist"],
            "csrf_token": token.group(1),
            "next": urlsplit(info["review_url"]).path,
        },
        timeout=10,
    )
    assert page.status_code == 200 and "Signed in as" in page.text
    assert page.url == info["review_url"] and "not clinically validated" in page.text.lower()
