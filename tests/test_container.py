"""The container image, built and run for real with podman (deploy/container/).

The image is built once by ``deploy/container/build.sh`` (a local Debian base made with
mmdebstrap, a wheelhouse built on the host, no network inside the build) and reused while its
content hash is unchanged: the base tar and the wheelhouse are cached in
``$HER2LOW_BUILD_CACHE`` (default /var/tmp/her2low-build), the image in podman's store. The
container runs ``her2low up`` with ``--network host`` on free ports; from the host a DCMTK
C-ECHO must succeed and ``her2low demo --json`` must get a card through it. The container is
removed in a ``finally`` (podman rm -f), so nothing it started outlives the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, require_tool
from tests.container_support import LIMITS, built_image, podman

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("container")]

IMAGE_USER = "10001"


@pytest.fixture(scope="module")
def image() -> str:
    """The image reference, built by build.sh once per test run (tests/container_support.py;
    ``HER2LOW_TEST_IMAGE`` names an already built image to test instead)."""
    return built_image()


@pytest.fixture
def container_name() -> Iterator[str]:
    """A unique container name; the container is removed (its processes killed) afterwards,
    with its anonymous volume (the image's VOLUME /var/lib/her2low)."""
    name = f"her2low-test-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        podman("rm", "--force", "--volumes", "--time", "5", name, timeout=60)


def dcmtk_echoscu() -> str:
    """DCMTK's echoscu (a Python package also installs one named echoscu into the venv)."""
    return "/usr/bin/echoscu" if os.path.exists("/usr/bin/echoscu") else require_tool("echoscu")


@pytest.mark.timeout(1800)
def test_image_is_non_root_with_health_check_and_her2low_entrypoint(image: str) -> None:
    inspected = podman("image", "inspect", image)
    assert inspected.returncode == 0, inspected.stderr
    data = json.loads(inspected.stdout)[0]
    config = data["Config"]
    assert config["User"].split(":")[0] == IMAGE_USER  # never root
    assert config["Entrypoint"] == ["her2low"]
    health = data.get("Healthcheck") or config.get("Healthcheck")  # podman / docker inspect
    assert health["Test"][-1] == "/usr/local/bin/her2low-healthcheck"
    assert config["Labels"]["org.her2low.content-hash"] == image.rsplit(":", 1)[1]
    # the shipped DCMTK and the app itself, without a network
    ran = podman(
        "run", "--rm", *LIMITS, "--network", "none", "--entrypoint", "sh", image, "-c",
        "id -u && her2low --version && /usr/bin/echoscu --version | head -1"
        " && python -c 'import psycopg, redis'",  # scaled mode's drivers (compose, Kubernetes)
    )  # fmt: skip
    if ran.returncode != 0 and "OCI runtime" in ran.stderr:
        pytest.skip(f"podman cannot run containers here: {ran.stderr.strip()}")
    assert ran.returncode == 0, ran.stderr
    uid, version, dcmtk = ran.stdout.splitlines()[:3]
    assert uid == IMAGE_USER
    assert version.startswith("her2low-cds ")
    assert "echoscu" in dcmtk.lower() or "dcmtk" in dcmtk.lower()


@pytest.mark.timeout(1800)
def test_container_answers_healthz_c_echo_and_gives_the_demo_card(
    image: str, container_name: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o750)
    if os.geteuid() == 0:
        os.chown(home, int(IMAGE_USER), int(IMAGE_USER))  # the image's user writes the home
    node_port, cds_port = free_port(), free_port()
    base = f"http://127.0.0.1:{cds_port}"
    settings = {
        "HER2LOW_HOME": str(home),
        "HER2LOW_NODE_PORT": str(node_port),
        "HER2LOW_NODE_QUIET_SECONDS": "2",
        "HER2LOW_CDS_PORT": str(cds_port),
        "HER2LOW_CDS_PUBLIC_BASE_URL": base,
        "HER2LOW_NODE_RESULTS_URL": base,
    }
    env_args = [arg for key, value in settings.items() for arg in ("--env", f"{key}={value}")]
    started = podman(
        "run", "--detach", "--name", container_name, "--network", "host", *LIMITS,
        "--volume", f"{home}:{home}", *env_args, image, "up",
    )  # fmt: skip
    if started.returncode != 0 and "OCI runtime" in started.stderr:
        pytest.skip(f"podman cannot run containers here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stderr

    def logs() -> str:
        return podman("logs", "--tail", "60", container_name).stdout

    deadline = time.monotonic() + 180
    while True:
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", container_name)
        assert state.stdout.strip() == "running", logs()
        assert time.monotonic() < deadline, "no /healthz in 180 s:\n" + logs()
        time.sleep(1)

    echo = subprocess.run(
        [dcmtk_echoscu(), "-aec", "HER2LOW", "127.0.0.1", str(node_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr + logs()

    demo = subprocess.run(
        [sys.executable, "-m", "her2low", "demo", "--json", "--timeout", "240"],
        env={**os.environ, **settings},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr[-3000:] + logs()
    card = json.loads(demo.stdout)["card"]
    assert card["summary"] and card["indicator"] in ("info", "warning"), card
    assert "HER2-low" in card["summary"], card  # the analysed demo study, as a card

    # the image's HEALTHCHECK, run by hand (podman's timers need systemd); retried like podman
    # does (--retries), since the worker may be busy analysing the demo study meanwhile
    for _ in range(3):
        health = podman("healthcheck", "run", container_name)
        if health.returncode == 0:
            break
        time.sleep(3)
    assert health.returncode == 0, health.stdout + health.stderr + logs()
    # everything inside runs as the image's user
    users = podman("top", container_name, "user")
    assert users.returncode == 0, users.stderr
    assert set(users.stdout.split()[1:]) <= {IMAGE_USER, "her2low"}, users.stdout
