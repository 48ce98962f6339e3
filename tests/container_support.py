"""The her2low image, built once per test run and shared by the container and compose tests.

``deploy/container/build.sh`` hashes its inputs and reuses an image with the same content
hash; :func:`built_image` also remembers the reference for the rest of the pytest process, so
tests/test_container.py and tests/test_compose.py (one xdist group) never build twice.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "deploy" / "container" / "build.sh"
LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """podman with the runc runtime (crun cannot set up cgroups on these machines)."""
    return subprocess.run(
        ["podman", "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout
    )


def build_cache() -> Path:
    return Path(os.environ.get("HER2LOW_BUILD_CACHE", "/var/tmp/her2low-build"))


def require_podman() -> None:
    """Skip, with the reason, where podman cannot run at all (not installed, no runtime)."""
    for tool in ("podman", "mmdebstrap"):
        require_tool(tool)
    probe = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run here: {probe.stderr.strip()}")


@functools.cache
def _build() -> str:
    env = {**os.environ, "HER2LOW_BUILD_CACHE": str(build_cache())}
    built = subprocess.run(
        ["bash", str(BUILD), "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert built.returncode == 0, built.stderr[-5000:]
    return built.stdout.strip().splitlines()[-1]


def built_image() -> str:
    """The image reference: ``HER2LOW_TEST_IMAGE`` if set, else built (once) by build.sh."""
    require_podman()
    if os.environ.get("HER2LOW_TEST_IMAGE"):
        return os.environ["HER2LOW_TEST_IMAGE"]
    return _build()
